"""The fused lm_head + loss gives the dense loss's values and gradients without materialising logits."""

import pytest
import torch
import torch.nn.functional as F

from distil import losses
from distil.errors import DistilError
from distil.fused import fused_distillation_loss, teacher_from_hidden
from distil.losses import DIVERGENCES, distillation_loss

N, H, H_T, V = 23, 8, 12, 31


def make(dtype=torch.float32, bias=True):
    h = torch.randn(N, H, dtype=dtype).requires_grad_()
    w = (torch.randn(V, H) / 2).to(dtype).requires_grad_()
    b = (torch.randn(V) / 2).to(dtype).requires_grad_() if bias else None
    h_t, w_t = torch.randn(N, H_T, dtype=dtype), (torch.randn(V, H_T) / 2).to(dtype)
    y = torch.randint(0, V, (N,))
    y[[0, 1, 2, 10, 22]] = -100  # masked prompt / padding rows, including a chunk edge
    return h, w, b, h_t, w_t, y


def assert_same(fp32, a, b, g_a=(), g_b=()):
    """Fused and dense are two fp32 computations of one loss: values agree to a few ulps of the summands' size
    times sqrt(N * V) terms, gradients elementwise with the reductions over V (softmax) and N (head weights)."""
    scale = sum(abs(float(x.detach())) for x in (b.loss, b.kd, b.ce))
    for name in ("loss", "kd", "ce"):
        fp32.assert_close(getattr(a, name), getattr(b, name), terms=N * V, scale=scale, msg=name)
    for x, y in zip(g_a, g_b, strict=True):
        fp32.assert_close(x, y, terms=N + V)


def grads(*tensors):
    out = [None if x is None else x.grad.clone() for x in tensors]
    for x in tensors:
        if x is not None:
            x.grad = None
    return out


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fused_equals_dense(kind, alpha, monkeypatch, fp32):
    monkeypatch.setattr(losses, "_BLOCK_ROWS", 3)  # row blocks inside each chunk, a ragged last one included
    h, w, b, h_t, w_t, y = make()
    kw = dict(kind=kind, alpha=alpha, temperature=2.0, beta=0.3, skew_alpha=0.2, num_items=40)
    dense = distillation_loss(F.linear(h, w, b), F.linear(h_t, w_t), y, chunk_size=None, **kw)
    dense.loss.backward()
    g_dense = grads(h, w, b)
    for chunk_size in (4, 7, 1024):
        fused = fused_distillation_loss(
            h, w, y, teacher_from_hidden(h_t, w_t), lm_head_bias=b, chunk_size=chunk_size, **kw
        )
        fused.loss.backward()
        assert fused.n_tokens == dense.n_tokens == N - 5
        assert_same(fp32, fused, dense, grads(h, w, b), g_dense)


def test_cached_teacher_logits_are_read_not_modified_and_grad_output_scales(fp32):
    h, w, _, h_t, w_t, y = make(bias=False)
    cache = F.linear(h_t, w_t)
    before = cache.clone()
    calls = []

    def teacher(start, end):
        calls.append((start, end))
        return cache[start:end]

    dense = distillation_loss(h @ w.T, cache, y, kind="reverse_kl", chunk_size=None)
    dense.loss.backward()
    g_dense = grads(h, w)
    fused = fused_distillation_loss(h, w, y, teacher, kind="reverse_kl", chunk_size=8)
    (2.5 * fused.loss).backward()
    assert torch.equal(cache, before)
    assert calls == [(0, 8), (8, 16), (16, 23)]
    assert_same(fp32, fused, dense, grads(h, w), [2.5 * g for g in g_dense])


def test_all_masked_is_zero_and_never_calls_the_teacher():
    h, w, b, *_ = make()

    def teacher(start, end):
        raise AssertionError("teacher called for a fully masked chunk")

    out = fused_distillation_loss(h, w, torch.full((N,), -100), teacher, lm_head_bias=b, alpha=0.5)
    assert out.loss.item() == 0 and out.n_tokens == 0
    out.loss.backward()
    assert all((g == 0).all() for g in (h.grad, w.grad, b.grad))


def test_frozen_lm_head_and_no_grad_mode(fp32):
    h, w, _, h_t, w_t, y = make(bias=False)
    w.requires_grad_(False)
    out = fused_distillation_loss(h, w, y, teacher_from_hidden(h_t, w_t), kind="tvd", chunk_size=5)
    out.loss.backward()
    assert h.grad is not None and w.grad is None
    with torch.no_grad():
        again = fused_distillation_loss(h, w, y, teacher_from_hidden(h_t, w_t), kind="tvd", chunk_size=5)
    assert not again.loss.requires_grad
    assert_same(fp32, again, out)


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_bf16_is_finite_and_close_to_fp32(kind):
    h, w, b, h_t, w_t, y = make(dtype=torch.bfloat16)
    out = fused_distillation_loss(
        h, w, y, teacher_from_hidden(h_t, w_t), lm_head_bias=b, kind=kind, alpha=0.5, chunk_size=6
    )
    out.loss.backward()
    g16 = grads(h, w, b)
    assert [g.dtype for g in g16] == [torch.bfloat16] * 3 and all(torch.isfinite(g).all() for g in g16)
    h32, w32, b32 = (x.detach().float().requires_grad_() for x in (h, w, b))
    ref = distillation_loss(F.linear(h32, w32, b32), F.linear(h_t.float(), w_t.float()), y, kind=kind, alpha=0.5)
    ref.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=2e-2, atol=2e-2)
    for g, g_ref in zip(g16, grads(h32, w32, b32)):
        torch.testing.assert_close(g.float(), g_ref, rtol=5e-2, atol=5e-3)


def test_vocab_mismatch_is_a_clear_error():
    h, w, _, h_t, _, y = make(bias=False)
    with pytest.raises(DistilError, match="31 != teacher vocab size 40"):
        fused_distillation_loss(h, w, y, teacher_from_hidden(h_t, torch.randn(40, H_T)))


def test_fused_backward_runs_once():
    h, w, _, h_t, w_t, y = make(bias=False)
    out = fused_distillation_loss(h, w, y, teacher_from_hidden(h_t, w_t))
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        out.loss.backward()
