"""Fused lm_head + sparse top-k cache loss: equal to sparse_kd_loss on materialised logits, values and gradients."""

import pytest
import torch

from distil.errors import DistilError
from distil.sparse import fused_sparse_kd_loss, sparse_kd_loss


def _targets(t_logits, labels, k, temperature=1.0):
    """What the cache stores (fp32): top-k ids/log-probs and log tail mass at the valid rows, in order."""
    z = t_logits[labels != -100].float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    top, ids = torch.topk(z, k, dim=-1)
    rest = z.scatter(1, ids, float("-inf"))
    return ids, top - lse, torch.logsumexp(rest, -1) - lse.squeeze(1)


def _assert_same(fp32, a, b, terms):
    """Two fp32 computations of one loss: a few ulps of the summands' size, times sqrt(terms summed)."""
    scale = sum(abs(float(x.detach())) for x in (b.loss, b.kd, b.ce))
    for name in ("loss", "kd", "ce"):
        fp32.assert_close(getattr(a, name), getattr(b, name), terms=terms, scale=scale, msg=name)


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


CASES = [(tail, t, a) for tail in ("renorm", "tail_term") for t in (1.0, 2.0) for a in (0.0, 0.5, 1.0)]


@pytest.mark.parametrize("tail,temperature,alpha", CASES)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
def test_fused_sparse_equals_sparse_on_materialised_logits(tail, temperature, alpha, chunk_size, fp32):
    torch.manual_seed(0)
    n, h, v, k = 23, 8, 17, 5
    hidden, weight, bias = torch.randn(n, h), torch.randn(v, h) * 0.7, torch.randn(v) * 0.3
    labels = torch.randint(0, v, (n,))
    labels[:5] = -100  # a whole leading chunk masked at chunk_size 4 (skipped: offsets must still line up)
    labels[[9, 12, 13, 22]] = -100  # partly masked chunks, and the last row
    cache_t = temperature if tail == "tail_term" else 1.0  # tail_term needs the cache's T; renorm re-tempers
    ids, lp, lt = _targets(torch.randn(n, v) * 2, labels, k, cache_t)
    kw = dict(tail=tail, temperature=temperature, cache_temperature=cache_t, alpha=alpha, num_items=30)

    h1, w1, b1 = _leaves(hidden, weight, bias)
    fused = fused_sparse_kd_loss(h1, w1, ids, lp.half(), lt, labels, lm_head_bias=b1, chunk_size=chunk_size, **kw)
    h2, w2, b2 = _leaves(hidden, weight, bias)
    plain = sparse_kd_loss(h2 @ w2.T + b2, ids, lp.half(), lt, labels, chunk_size=chunk_size, **kw)
    _assert_same(fp32, fused, plain, n * v)
    assert fused.n_tokens == plain.n_tokens == int((labels != -100).sum())
    assert not fused.kd.requires_grad and not fused.ce.requires_grad
    (2.5 * fused.loss).backward()  # a non-unit incoming gradient is applied too
    (2.5 * plain.loss).backward()
    for a, b in ((h1, h2), (w1, w2), (b1, b2)):  # reductions over the vocabulary (h) and the tokens (w, b)
        fp32.assert_close(a.grad, b.grad, terms=n + v)
    assert h1.grad[labels == -100].abs().max() == 0


def test_fused_sparse_batched_shapes_no_bias_no_grad_and_errors(fp32):
    torch.manual_seed(1)
    b, s, h, v, k = 2, 6, 4, 11, 3
    hidden, weight = torch.randn(b, s, h), torch.randn(v, h)
    labels = torch.randint(0, v, (b, s))
    labels[1, 4:] = -100
    ids, lp, lt = _targets(torch.randn(b, s, v), labels, k)
    w1 = weight.clone().requires_grad_(True)  # only the head trains (frozen hidden states)
    fused = fused_sparse_kd_loss(hidden, w1, ids, lp, lt, labels, alpha=0.7, chunk_size=5)
    w2 = weight.clone().requires_grad_(True)
    plain = sparse_kd_loss(hidden @ w2.T, ids, lp, lt, labels, alpha=0.7, chunk_size=5)
    _assert_same(fp32, fused, plain, b * s * v)
    fused.loss.backward()
    plain.loss.backward()
    fp32.assert_close(w1.grad, w2.grad, terms=b * s + v)
    with torch.no_grad():
        nograd = fused_sparse_kd_loss(hidden, w1, ids, lp, lt, labels, alpha=0.7, chunk_size=5)
    _assert_same(fp32, nograd, plain, b * s * v)
    with pytest.raises(DistilError, match="one target row per valid label"):
        fused_sparse_kd_loss(hidden, weight, ids[1:], lp[1:], lt[1:], labels)
    with pytest.raises(DistilError, match="hidden \\[N, H\\]"):
        fused_sparse_kd_loss(hidden[:, 1:], weight, ids, lp, lt, labels)
    with pytest.raises(DistilError, match="outside the student's vocabulary"):
        fused_sparse_kd_loss(hidden, weight[:2], ids, lp, lt, labels)
    with pytest.raises(DistilError, match="tail_term"):
        fused_sparse_kd_loss(hidden, weight, ids, lp, lt, labels, temperature=2.0)
    allmasked = torch.full_like(labels, -100)
    empty = fused_sparse_kd_loss(hidden, weight, ids[:0], lp[:0], lt[:0], allmasked)
    assert empty.loss.item() == 0 and empty.n_tokens == 0
