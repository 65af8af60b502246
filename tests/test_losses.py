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


def kl_scale(p, q, t=1.0):
    """The size of the summands of a divergence between p and q (nats): what its fp32 rounding error scales with.
    A divergence can be far smaller than its terms (cancellation), so a tolerance relative to the value alone is
    not one that holds at fp32 precision."""
    return t * t * sum((pi + qi) * (abs(math.log(pi)) + abs(math.log(qi))) for pi, qi in zip(p, q))


def rand_pair(n=24, v=17, scale=3.0):
    s = (torch.randn(n, v) * scale).requires_grad_()
    t = torch.randn(n, v) * scale
    return s, t


# ---- per-token divergences ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_identical_inputs_give_zero(kind, fp32):
    z = torch.randn(8, 13) * 4
    lp = F.log_softmax(z.double(), -1)
    scale = float((-lp.exp() * lp).sum(-1).max()) + 1.0  # the entropy: the size of the summands
    fp32.assert_close(token_divergence(z, z.clone(), kind), torch.zeros(8), terms=13, scale=scale)
    out = distillation_loss(z, z.clone(), torch.zeros(8, dtype=torch.long), kind=kind)
    assert out.kd.item() == fp32.approx(0.0, terms=8 * 13, scale=scale)


def test_jsd_nonnegative_and_tvd_at_most_one(fp32):
    s, t = rand_pair(64, 9, scale=6.0)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        assert (token_divergence(s, t, "jsd", beta=beta) >= 0).all()
    tvd = token_divergence(s, t, "tvd")
    assert (tvd >= 0).all() and (tvd <= 1 + fp32.rel(terms=9)).all()
    # disjoint supports reach the bound: TVD = 1
    a, b = torch.tensor([[30.0, -30.0]]), torch.tensor([[-30.0, 30.0]])
    assert token_divergence(a, b, "tvd").item() == fp32.approx(1.0, terms=2)


def test_beta_endpoints_equal_kl_div_both_directions(fp32):
    s, t = rand_pair()
    # references in float64: KL(p_T || p_S) and KL(p_S || p_T)
    ls, lt = F.log_softmax(s.detach().double(), -1), F.log_softmax(t.double(), -1)
    forward = F.kl_div(ls, lt, reduction="none", log_target=True).sum(-1)
    reverse = F.kl_div(lt, ls, reduction="none", log_target=True).sum(-1)
    scale = float(((ls.exp() + lt.exp()) * (ls.abs() + lt.abs())).sum(-1).max())  # the summands' size
    close = dict(terms=17, scale=scale)
    fp32.assert_close(token_divergence(s, t, "jsd", beta=0.0), forward, **close)
    fp32.assert_close(token_divergence(s, t, "jsd", beta=1.0), reverse, **close)
    fp32.assert_close(token_divergence(s, t, "forward_kl"), forward, **close)
    fp32.assert_close(token_divergence(s, t, "reverse_kl"), reverse, **close)
    # skew with a = 0 is the plain KL; with a = 1 it compares a distribution with itself
    fp32.assert_close(token_divergence(s, t, "skew_forward_kl", skew_alpha=0.0), forward, **close)
    fp32.assert_close(token_divergence(s, t, "skew_reverse_kl", skew_alpha=0.0), reverse, **close)
    fp32.assert_close(token_divergence(s, t, "skew_forward_kl", skew_alpha=1.0), torch.zeros(24), **close)


def test_jsd_half_is_symmetric(fp32):
    s, t = rand_pair()
    lp = F.log_softmax(torch.cat([s.detach(), t]).double(), -1)
    scale = 2 * float((lp.exp() * lp.abs()).sum(-1).max())  # the summands' size (entropies)
    fp32.assert_close(token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5),
                      terms=17, scale=scale)
    # and beta <-> 1 - beta swaps the roles in general
    fp32.assert_close(token_divergence(s, t, "jsd", beta=0.2), token_divergence(t, s, "jsd", beta=0.8),
                      terms=17, scale=scale)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("t", [1.0, 2.0])
def test_golden_values_2x3x5(kind, t, fp32):
    got = token_divergence(torch.tensor(STUDENT), torch.tensor(TEACHER), kind, temperature=t, beta=0.3, skew_alpha=0.2)
    assert got.shape == (2, 3)
    for b in range(2):
        for i in range(3):
            ps, pt = softmax(STUDENT[b][i], t), softmax(TEACHER[b][i], t)
            expected = t * t * reference(kind, ps, pt, beta=0.3, a=0.2)
            assert got[b, i].item() == fp32.approx(expected, terms=5, scale=kl_scale(pt, ps, t)), (b, i)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_golden_batch_loss_with_mask_alpha_and_temperature(chunk_size, fp32):
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
    kd_sum = ce_sum = kd_scale = 0.0
    n = 0
    for b in range(2):
        for i in range(3):
            y = LABELS[b][i]
            if y == -100:
                continue
            n += 1
            kd_sum += t * t * kl(softmax(TEACHER[b][i], t), softmax(STUDENT[b][i], t))
            kd_scale += kl_scale(softmax(TEACHER[b][i], t), softmax(STUDENT[b][i], t), t)
            ce_sum += -math.log(softmax(STUDENT[b][i])[y])  # the hard term is at T = 1
    assert out.n_tokens == n == 4
    tol = dict(terms=n * 5, scale=(kd_scale + ce_sum) / n)
    assert out.loss.item() == fp32.approx((alpha * kd_sum + (1 - alpha) * ce_sum) / n, **tol)
    assert out.kd.item() == fp32.approx(kd_sum / n, **tol)
    assert out.ce.item() == fp32.approx(ce_sum / n, **tol)


@pytest.mark.parametrize("t", [0.5, 2.0, 8.0])
def test_temperature_squared_scaling(t, fp32):
    s, te = rand_pair(6, 11)
    got = distillation_loss(s, te, torch.zeros(6, dtype=torch.long), temperature=t, chunk_size=4).loss
    zs, zt = s.detach().double().numpy() / t, te.double().numpy() / t
    ls = zs - np.log(np.exp(zs).sum(-1, keepdims=True))
    lt = zt - np.log(np.exp(zt).sum(-1, keepdims=True))
    expected = t**2 * (np.exp(lt) * (lt - ls)).sum(-1).mean()
    scale = t**2 * (np.exp(lt) * (np.abs(lt) + np.abs(ls))).sum(-1).mean()
    assert got.item() == fp32.approx(expected, terms=6 * 11, scale=scale)


# ---- distillation_loss: chunking, masking, reduction ------------------------------------------------------------


def assert_same(fp32, out, ref, terms, g=None, g_ref=None, v=None):
    """Two fp32 computations of one loss (e.g. chunked and whole) agree to fp32 precision: values to a few ulps of
    the summands' size times sqrt(terms summed); gradients elementwise, the softmax over the vocabulary v."""
    scale = sum(abs(float(x.detach())) for x in (ref.loss, ref.kd, ref.ce))
    for name in ("loss", "kd", "ce"):
        fp32.assert_close(getattr(out, name), getattr(ref, name), terms=terms, scale=scale, msg=name)
    if g is not None:
        fp32.assert_close(g, g_ref, terms=v)


def loss_and_grad(s, t, y, **kw):
    s = s.detach().clone().requires_grad_()
    out = distillation_loss(s, t, y, **kw)
    out.loss.backward()
    return out, s.grad


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_chunked_equals_unchunked(kind, alpha, fp32):
    s, t = torch.randn(2, 13, 29) * 3, torch.randn(2, 13, 29) * 3
    y = torch.randint(0, 29, (2, 13))
    y[0, :4] = -100  # a masked prompt
    kw = dict(kind=kind, alpha=alpha, temperature=1.5, beta=0.3, skew_alpha=0.2)
    ref, g_ref = loss_and_grad(s, t, y, chunk_size=None, **kw)
    for chunk_size in (1, 5, 7, 1024):  # 22 valid tokens: sizes that do not divide it
        out, g = loss_and_grad(s, t, y, chunk_size=chunk_size, **kw)
        assert_same(fp32, out, ref, 22 * 29, g, g_ref, 29)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_row_blocks_inside_a_chunk(kind, monkeypatch, fp32):
    # the analytic gradient walks each chunk in blocks of rows; make blocks tiny so they (and a ragged one) occur
    monkeypatch.setattr(losses, "_BLOCK_ROWS", 3)
    s, t = torch.randn(20, 11) * 3, torch.randn(20, 11) * 3
    y = torch.randint(0, 11, (20,))
    y[5] = -100
    for alpha, temperature in ((0.0, 1.0), (0.5, 2.0), (1.0, 1.0)):
        kw = dict(kind=kind, alpha=alpha, temperature=temperature, beta=0.3, skew_alpha=0.2)
        ref, g_ref = loss_and_grad(s, t, y, chunk_size=None, **kw)
        out, g = loss_and_grad(s, t, y, chunk_size=8, **kw)
        assert_same(fp32, out, ref, 19 * 11, g, g_ref, 11)


def test_chunked_accepts_shifted_views_and_scales_grad_output(fp32):
    full_s, full_t = torch.randn(3, 9, 16), torch.randn(3, 9, 16)
    y = torch.randint(0, 16, (3, 8))
    s = full_s.requires_grad_()
    distillation_loss(s[:, :-1], full_t[:, :-1], y, chunk_size=None).loss.backward()
    g_ref = s.grad.clone()
    s.grad = None
    (3.0 * distillation_loss(s[:, :-1], full_t[:, :-1], y, chunk_size=5).loss).backward()
    fp32.assert_close(s.grad, 3.0 * g_ref, terms=16)
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
    # the same computation on the same valid rows, in one process: bit for bit
    assert out2.loss.item() == out.loss.item() and out2.n_tokens == out.n_tokens == 6
    assert torch.equal(g2, g)
    assert (g2[[1, 4, 5, 9]] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_micro_batches_with_global_num_items_equal_one_batch(chunk_size, fp32):
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
    scale = abs(whole.loss.item()) + abs(whole.kd.item()) + abs(whole.ce.item())
    assert total == fp32.approx(whole.loss.item(), terms=num_items * 10, scale=scale)
    fp32.assert_close(torch.cat(grads), g_whole, terms=10)


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_alpha_zero_is_cross_entropy(chunk_size, fp32):
    s, t = torch.randn(12, 20), torch.randn(12, 20)
    y = torch.randint(0, 20, (12,))
    y[:3] = -100
    out, g = loss_and_grad(s, t, y, alpha=0.0, temperature=3.0, chunk_size=chunk_size)
    s_ref = s.clone().requires_grad_()
    ce = F.cross_entropy(s_ref, y, ignore_index=-100)
    ce.backward()
    fp32.assert_close(out.loss, ce.detach(), terms=9 * 20)
    fp32.assert_close(g, s_ref.grad, terms=20)
    fp32.assert_close(hard_ce(s, y), F.cross_entropy(s, y, ignore_index=-100, reduction="none"), terms=20)
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
def test_minus_inf_vocab_entries_are_ignored(kind, fp32):
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
        assert_same(fp32, out, ref, 9 * 8)
        fp32.assert_close(g[:, :8], g_ref, terms=8)
        assert (g[:, 8:] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs_are_finite_and_close_to_fp32(kind, fp32):
    s, t = torch.randn(16, 64) * 3, torch.randn(16, 64) * 3
    y = torch.randint(0, 64, (16,))
    s16, t16 = s.bfloat16(), t.bfloat16()
    ref, g_ref = loss_and_grad(s16.float(), t16.float(), y, kind=kind, alpha=0.5)
    for chunk_size in (None, 5):
        out, g = loss_and_grad(s16, t16, y, kind=kind, alpha=0.5, chunk_size=chunk_size)
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert out.kd.item() >= 0
        assert_same(fp32, out, ref, 16 * 64)  # the same bf16 values, softmaxes run in fp32
        torch.testing.assert_close(g.float(), g_ref, rtol=1e-2, atol=1e-4)


def test_no_gradient_reaches_the_teacher_and_no_grad_mode_works(fp32):
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    y = torch.randint(0, 8, (6,))
    out = distillation_loss(s, t, y, kind="jsd")
    out.loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        for chunk_size in (None, 4):
            out2 = distillation_loss(s, t, y, kind="jsd", chunk_size=chunk_size)
            assert not out2.loss.requires_grad
            assert_same(fp32, out2, out, 6 * 8)


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
