"""Loss math: golden values from the definitions, endpoints, symmetry, chunking, masking, reduction."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distil import losses
from distil.errors import DistilError
from distil.losses import DIVERGENCES, distillation_loss, hard_ce, token_divergence

# A fixed [2, 3, 5] pair of logits (batch 2, 3 positions, vocab 5) for the hand-computed values.
STUDENT = [
    [[0.1, -1.2, 2.0, 0.5, 0.0], [1.5, 0.3, -0.7, 2.2, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]],
    [[-2.0, 1.0, 0.5, 0.3, 1.1], [3.0, -1.0, 0.2, 0.0, -0.5], [0.7, 0.7, -0.3, 1.9, 0.4]],
]
TEACHER = [
    [[0.5, -0.2, 1.0, 0.9, -1.0], [2.5, 0.1, -1.7, 1.2, 0.0], [1.0, -1.0, 0.5, 0.0, 2.0]],
    [[-1.0, 2.0, 0.1, 0.3, 0.0], [1.0, -2.0, 1.2, 0.4, -0.5], [0.2, 1.7, -0.3, 0.9, 0.0]],
]
LABELS = [[2, -100, 4], [1, 0, -100]]


# ---- reference implementations in plain Python, straight from the definitions -------------------------------


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def mix(w_a, a, w_b, b):
    return [w_a * x + w_b * y for x, y in zip(a, b)]


def reference(kind, ps, pt, beta=0.5, a=0.1):
    if kind == "forward_kl":
        return kl(pt, ps)
    if kind == "reverse_kl":
        return kl(ps, pt)
    if kind == "jsd":
        m = mix(1 - beta, ps, beta, pt)
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(pt, ps))
    if kind == "skew_forward_kl":
        return kl(pt, mix(a, pt, 1 - a, ps))
    if kind == "skew_reverse_kl":
        return kl(ps, mix(1 - a, pt, a, ps))
    raise ValueError(kind)


def rand_pair(n=24, v=17, scale=3.0):
    s = (torch.randn(n, v) * scale).requires_grad_()
    t = torch.randn(n, v) * scale
    return s, t


# ---- per-token divergences ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_inputs_give_zero(kind):
    z = torch.randn(8, 13) * 4
    assert token_divergence(z, z.clone(), kind).abs().max() < 1e-6
    out = distillation_loss(z, z.clone(), torch.zeros(8, dtype=torch.long), kind=kind)
    assert abs(out.kd.item()) < 1e-6


def test_jsd_nonnegative_and_tvd_at_most_one():
    s, t = rand_pair(64, 9, scale=6.0)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert (token_divergence(s, t, "jsd", beta=beta) >= 0).all()
    tvd = token_divergence(s, t, "tvd")
    assert (tvd >= 0).all() and (tvd <= 1 + 1e-6).all()
    # disjoint supports reach the bound: TVD = 1
    a, b = torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]])
    assert token_divergence(a, b, "tvd").item() == pytest.approx(1.0, abs=1e-6)


def test_beta_endpoints_equal_kl_div_both_directions():
    s, t = rand_pair()
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    forward = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)  # KL(p_T || p_S)
    reverse = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)  # KL(p_S || p_T)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.0), forward)
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=1.0), reverse)
    torch.testing.assert_close(token_divergence(s, t, "forward_kl"), forward)
    torch.testing.assert_close(token_divergence(s, t, "reverse_kl"), reverse)
    # skew with a = 0 is the plain KL; with a = 1 it compares a distribution with itself
    torch.testing.assert_close(token_divergence(s, t, "skew_forward_kl", skew_alpha=0.0), forward)
    torch.testing.assert_close(token_divergence(s, t, "skew_reverse_kl", skew_alpha=0.0), reverse)
    assert token_divergence(s, t, "skew_forward_kl", skew_alpha=1.0).abs().max() < 1e-6


def test_jsd_half_is_symmetric():
    s, t = rand_pair()
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5))
    # and beta <-> 1 - beta swaps the roles in general
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.2), token_divergence(t, s, "jsd", beta=0.8))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_golden_values_2x3x5(kind, t):
    got = token_divergence(torch.tensor(STUDENT), torch.tensor(TEACHER), kind, temperature=t, beta=0.3, skew_alpha=0.2)
    assert got.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            ps, pt = softmax(STUDENT[b][i], t), softmax(TEACHER[b][i], t)
            expected = t * t * reference(kind, ps, pt, beta=0.3, a=0.2)
            assert got[b, i].item() == pytest.approx(expected, rel=1e-5, abs=1e-7), (b, i)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_golden_batch_loss_with_mask_alpha_and_temperature(chunk_size):
    t, alpha = 2.0, 0.3
    out = distillation_loss(
        torch.tensor(STUDENT),
        torch.tensor(TEACHER),
        torch.tensor(LABELS),
        kind="forward_kl",
        alpha=alpha,
        temperature=t,
        chunk_size=chunk_size,
    )
    kd_sum = ce_sum = 0.0
    n = 0
    for b in range(2):
        for i in range(3):
            y = LABELS[b][i]
            if y == -100:
                continue
            n += 1
            kd_sum += t * t * kl(softmax(TEACHER[b][i], t), softmax(STUDENT[b][i], t))
            ce_sum += -math.log(softmax(STUDENT[b][i])[y])  # the hard term is at T = 1
    assert out.n_tokens == n == 4
    assert out.loss.item() == pytest.approx((alpha * kd_sum + (1 - alpha) * ce_sum) / n, rel=1e-5)
    assert out.kd.item() == pytest.approx(kd_sum / n, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce_sum / n, rel=1e-5)


@pytest.mark.parametrize("t", [0.5, 2.0, 8.0])
def test_temperature_squared_scaling(t):
    s, te = rand_pair(6, 11)
    got = distillation_loss(s, te, torch.zeros(6, dtype=torch.long), temperature=t, chunk_size=4).loss
    zs, zt = s.detach().double().numpy() / t, te.double().numpy() / t
    ls = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    lt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    expected = t**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ---- distillation_loss: chunking, masking, reduction ------------------------------------------------------------


def loss_and_grad(s, t, y, **kw):
    s = s.detach().clone().requires_grad_()
    out = distillation_loss(s, t, y, **kw)
    out.loss.backward()
    return out, s.grad


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_chunked_equals_unchunked(kind, alpha):
    s, t = torch.randn(2, 13, 29) * 3, torch.randn(2, 13, 29) * 3
    y = torch.randint(0, 29, (2, 13))
    y[0, :4] = -100  # a masked prompt
    kw = dict(kind=kind, alpha=alpha, temperature=1.5, beta=0.3, skew_alpha=0.2)
    ref, g_ref = loss_and_grad(s, t, y, chunk_size=None, **kw)
    for chunk_size in (1, 5, 7, 1024):  # 22 valid tokens: sizes that do not divide it
        out, g = loss_and_grad(s, t, y, chunk_size=chunk_size, **kw)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(out.kd, ref.kd)
        torch.testing.assert_close(out.ce, ref.ce)
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_row_blocks_inside_a_chunk(kind, monkeypatch):
    # the analytic gradient walks each chunk in blocks of rows; make blocks tiny so they (and a ragged one) occur
    monkeypatch.setattr(losses, "_BLOCK_ROWS", 3)
    s, t = torch.randn(20, 11) * 3, torch.randn(20, 11) * 3
    y = torch.randint(0, 11, (20,))
    y[5] = -100
    for alpha, temperature in ((0.0, 1.0), (0.5, 2.0), (1.0, 1.0)):
        kw = dict(kind=kind, alpha=alpha, temperature=temperature, beta=0.3, skew_alpha=0.2)
        ref, g_ref = loss_and_grad(s, t, y, chunk_size=None, **kw)
        out, g = loss_and_grad(s, t, y, chunk_size=8, **kw)
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(g, g_ref)


def test_chunked_accepts_shifted_views_and_scales_grad_output():
    full_s, full_t = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    y = torch.randint(0, 16, (3, 8))
    s = full_s.requires_grad_()
    distillation_loss(s[:, :-1], full_t[:, :-1], y, chunk_size=None).loss.backward()
    g_ref = s.grad.clone()
    s.grad = None
    (3.0 * distillation_loss(s[:, :-1], full_t[:, :-1], y, chunk_size=5).loss).backward()
    torch.testing.assert_close(s.grad, 3.0 * g_ref)
    assert (s.grad[:, -1] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_masked_tokens_change_nothing(chunk_size):
    s, t = torch.randn(10, 12), torch.randn(10, 12)
    y = torch.randint(0, 12, (10,))
    y[[1, 4, 5, 9]] = -100
    out, g = loss_and_grad(s, t, y, kind="jsd", alpha=0.5, chunk_size=chunk_size)
    s2, t2 = s.clone(), t.clone()
    s2[[1, 4, 5, 9]] = float("nan")  # whatever sits in masked rows, even NaN
    t2[[1, 4]] = float("inf")
    out2, g2 = loss_and_grad(s2, t2, y, kind="jsd", alpha=0.5, chunk_size=chunk_size)
    assert out2.loss.item() == out.loss.item() and out2.n_tokens == out.n_tokens == 6
    torch.testing.assert_close(g2, g)
    assert (g2[[1, 4, 5, 9]] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_micro_batches_with_global_num_items_equal_one_batch(chunk_size):
    s, t = torch.randn(4, 6, 10), torch.randn(4, 6, 10)
    y = torch.randint(0, 10, (4, 6))
    y[0, :5] = -100  # micro-batches with different valid counts
    y[2, :2] = -100
    kw = dict(kind="reverse_kl", alpha=0.7, temperature=2.0, chunk_size=chunk_size)
    whole, g_whole = loss_and_grad(s, t, y, **kw)
    num_items = int((y != -100).sum())
    total, grads = 0.0, []
    for i in range(4):  # 4 gradient-accumulation micro-batches of one sequence each
        out, g = loss_and_grad(s[i : i + 1], t[i : i + 1], y[i : i + 1], num_items=num_items, **kw)
        total += out.loss.item()
        grads.append(g)
    assert total == pytest.approx(whole.loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat(grads), g_whole)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_alpha_zero_is_cross_entropy(chunk_size):
    s, t = torch.randn(12, 20), torch.randn(12, 20)
    y = torch.randint(0, 20, (12,))
    y[:3] = -100
    out, g = loss_and_grad(s, t, y, alpha=0.0, temperature=3.0, chunk_size=chunk_size)
    s_ref = s.clone().requires_grad_()
    ce = F.cross_entropy(s_ref, y, ignore_index=-100)
    ce.backward()
    torch.testing.assert_close(out.loss, ce.detach())
    torch.testing.assert_close(g, s_ref.grad)
    torch.testing.assert_close(hard_ce(s, y), F.cross_entropy(s, y, ignore_index=-100, reduction="none"))
    assert (hard_ce(s, y)[:3] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_all_masked_gives_zero_and_zero_grads(chunk_size, kind):
    s = torch.randn(2, 5, 7, requires_grad=True)
    y = torch.full((2, 5), -100)
    out = distillation_loss(s, torch.randn(2, 5, 7), y, kind=kind, alpha=0.5, chunk_size=chunk_size)
    assert out.loss.item() == 0 and out.n_tokens == 0 and out.kd.item() == 0 and out.ce.item() == 0
    out.loss.backward()
    assert s.grad is not None and (s.grad == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_minus_inf_vocab_entries_are_ignored(kind):
    # vocab entries both models mask with -inf (e.g. padded embedding rows) behave as if absent
    s, t = torch.randn(9, 12) * 2, torch.randn(9, 12) * 2
    y = torch.randint(0, 8, (9,))
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, 8:] = float("-inf")
    t_inf[:, 8:] = float("-inf")
    kw = dict(kind=kind, alpha=0.5, beta=0.4, skew_alpha=0.3)
    ref, g_ref = loss_and_grad(s[:, :8], t[:, :8], y, chunk_size=None, **kw)
    for chunk_size in (None, 4):
        out, g = loss_and_grad(s_inf, t_inf, y, chunk_size=chunk_size, **kw)
        assert torch.isfinite(g).all()
        torch.testing.assert_close(out.loss, ref.loss)
        torch.testing.assert_close(g[:, :8], g_ref)
        assert (g[:, 8:] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs_are_finite_and_close_to_fp32(kind):
    s, t = torch.randn(16, 64) * 3, torch.randn(16, 64) * 3
    y = torch.randint(0, 64, (16,))
    s16, t16 = s.bfloat16(), t.bfloat16()
    ref, g_ref = loss_and_grad(s16.float(), t16.float(), y, kind=kind, alpha=0.5)
    for chunk_size in (None, 5):
        out, g = loss_and_grad(s16, t16, y, kind=kind, alpha=0.5, chunk_size=chunk_size)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert out.kd.item() >= 0
        torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)  # softmaxes run in fp32
        torch.testing.assert_close(g.float(), g_ref, rtol=1e-2, atol=1e-4)


def test_no_gradient_reaches_the_teacher_and_no_grad_mode_works():
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 8, (6,))
    out = distillation_loss(s, t, y, kind="jsd")
    out.loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        for chunk_size in (None, 4):
            out2 = distillation_loss(s, t, y, kind="jsd", chunk_size=chunk_size)
            assert not out2.loss.requires_grad
            torch.testing.assert_close(out2.loss, out.loss.detach())


def test_bad_input_raises_distil_error():
    s, y = torch.randn(4, 10), torch.zeros(4, dtype=torch.long)
    with pytest.raises(DistilError, match="forward_kl"):
        distillation_loss(s, s, y, kind="kl")
    with pytest.raises(DistilError, match="10 != teacher vocab size 12"):
        distillation_loss(s, torch.randn(4, 12), y)
    with pytest.raises(DistilError, match="temperature"):
        distillation_loss(s, s, y, temperature=0)
    with pytest.raises(DistilError, match="beta"):
        token_divergence(s, s, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="num_items=2 is below"):  # a trainer bug, not user input
        distillation_loss(s, s, y, num_items=2)


def test_chunked_backward_runs_once():
    s = torch.randn(6, 8, requires_grad=True)
    out = distillation_loss(s, torch.randn(6, 8), torch.randint(0, 8, (6,)), chunk_size=4)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):  # the stored gradient was handed over, not copied
        out.loss.backward()
