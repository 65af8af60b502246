"""Logit distillation losses: every divergence between teacher and student next-token distributions.

Notation (per token position, over the vocabulary V):
    z_S, z_T          student / teacher logits
    p = softmax(z/T)  the temperature-softened distributions p_S, p_T (always computed in fp32)
    KL(P||Q)          = sum_v P_v (log P_v - log Q_v), with 0 * log 0 := 0

Divergences (`kind`), all >= 0 and 0 when p_S == p_T:
    forward_kl       KL(p_T || p_S)        mode-covering: the student must put mass wherever the teacher does
    reverse_kl       KL(p_S || p_T)        mode-seeking: the student may drop teacher modes (MiniLLM, on-policy GKD)
    jsd              beta KL(p_T || M) + (1-beta) KL(p_S || M),  M = (1-beta) p_S + beta p_T
                     (generalized JSD of GKD, Agarwal et al. 2023, in TRL's convention: beta=0 is forward KL
                     and beta=1 is reverse KL. The formula itself tends to 0 at both ends, so the endpoints are
                     special-cased to the two KLs, exactly as TRL's `generalized_jsd_loss` does.)
    tvd              0.5 sum_v |p_T - p_S|  total variation distance, in [0, 1]
    skew_forward_kl  KL(p_T || a p_T + (1-a) p_S)   DistiLLM's SKL, a = skew_alpha
    skew_reverse_kl  KL(p_S || (1-a) p_T + a p_S)   DistiLLM's SRKL

Temperature divides both models' logits for the soft term and the soft term is multiplied by T^2 (Hinton et al.
2015) so its gradient scale does not change with T. The hard-label term is the cross-entropy at T=1. With `alpha`
weighting the soft term and (1-alpha) the hard one, the loss of a batch is

    loss = (alpha * sum_valid kd + (1 - alpha) * sum_valid ce) / num_items

where num_items counts the valid (label != -100) tokens of the GLOBAL batch, so summing the loss of every
gradient-accumulation micro-batch and process gives the same gradient as one big batch.

Memory: for V = 49,152, one [tokens x V] fp32 tensor is 192 KiB per token and a plain autograd loss holds ~9 of
them through backward. `distillation_loss` walks the valid tokens `chunk_size` at a time and computes each chunk's
loss AND its gradient (analytic, below) during the forward pass of a custom autograd Function, so about two
[chunk x V] fp32 buffers live at a time; backward only scales the stored gradient. `chunk_size=None` runs the
plain-autograd path instead, the reference the tests compare against. fused.py never materialises logits at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.errors import DistilError

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
IGNORE_INDEX = -100

# exp(-1e4) == 0 in fp32, so clamping log-probabilities there before mixing changes no probability, but keeps
# logaddexp(-inf, -inf) (vocab entries both models mask with -inf) out of the graph, whose gradient is NaN.
_LOG_FLOOR = -1e4
_BLOCK_ROWS = 128  # rows per block of the in-place gradient math (its temporaries are [128 x V])


# ----------------------------------------------------------------------------------------------------------------
# Per-token divergences (pure functions of fp32 log-probabilities)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P||Q) = sum_v p_v (log p_v - log q_v) per row, with 0 * log 0 := 0 (also when log q_v = -inf)."""
    p = log_p.exp()
    # where() before the product: a -inf - -inf = NaN term never reaches the sum or the gradient.
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mix(log_a: Tensor, w_a: float, log_b: Tensor, w_b: float) -> Tensor:
    """log(w_a * a + w_b * b), computed in log space: logaddexp(log a + log w_a, log b + log w_b)."""
    if w_a == 0:
        return log_b
    if w_b == 0:
        return log_a
    a = (log_a + math.log(w_a)).clamp_(min=_LOG_FLOOR)
    b = (log_b + math.log(w_b)).clamp_(min=_LOG_FLOOR)
    return torch.logaddexp(a, b) if torch.is_grad_enabled() else torch.logaddexp(a, b, out=a)


def _divergence(ls: Tensor, lt: Tensor, kind: str, beta: float, skew_alpha: float) -> Tensor:
    """Per-row divergence from student / teacher log-probabilities ls, lt [n, V] -> [n]."""
    if kind == "forward_kl":
        return _kl(lt, ls)
    if kind == "reverse_kl":
        return _kl(ls, lt)
    if kind == "jsd":
        if beta == 0:  # endpoints special-cased (TRL convention): the formula would give 0 here
            return _kl(lt, ls)
        if beta == 1:
            return _kl(ls, lt)
        log_m = _log_mix(ls, 1 - beta, lt, beta)  # M = (1-beta) p_S + beta p_T
        return beta * _kl(lt, log_m) + (1 - beta) * _kl(ls, log_m)
    if kind == "tvd":
        return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)
    if kind == "skew_forward_kl":  # KL(p_T || a p_T + (1-a) p_S)
        return _kl(lt, _log_mix(lt, skew_alpha, ls, 1 - skew_alpha))
    if kind == "skew_reverse_kl":  # KL(p_S || (1-a) p_T + a p_S)
        return _kl(ls, _log_mix(lt, 1 - skew_alpha, ls, skew_alpha))
    raise DistilError(f"loss kind: expected one of {', '.join(DIVERGENCES)}, found {kind!r}")


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> = sum_v a_v b_v per row, without a [n, V] temporary."""
    return torch.einsum("nv,nv->n", a, b)


def _divergence_and_grad(ls: Tensor, lt: Tensor, kind: str, beta: float, a: float) -> tuple[Tensor, Tensor]:
    """D [n] (as `_divergence`) and dD/du [n, V], u = z_S / T, analytically. Overwrites ls and lt (memory).

    Softmax chain rule: dD/du_v = sum_w dD/dls_w (delta_vw - p_S,v). Each divergence has dD/dls = p_S * r, so
        dD/du = p_S * (r - <p_S, r>)
      forward_kl   dD/du = p_S - p_T   (r = -p_T / p_S)
      reverse_kl   r = ls - lt                         (and <p_S, r> = D)
      jsd          r = (1-beta) (ls - log M)           M = (1-beta) p_S + beta p_T
      tvd          r = sign(p_S - p_T) / 2
      skew fwd     r = -(1-a) p_T / M                  M = a p_T + (1-a) p_S
      skew rev     r = ls - log M - a p_S / M          M = (1-a) p_T + a p_S   (constants in r cancel)
    Entries with p = 0 are zeroed before any product (0 * log 0 := 0, and no -inf - -inf).
    """
    if kind == "jsd" and beta in (0, 1):
        kind = "forward_kl" if beta == 0 else "reverse_kl"
    if kind.startswith("skew_") and a in (0, 1):  # a=0: the plain KL; a=1: KL(p||p) = 0
        if a == 1:
            return ls.new_zeros(ls.shape[0]), ls.zero_()
        kind = "forward_kl" if kind == "skew_forward_kl" else "reverse_kl"
    if kind == "forward_kl":
        pt = lt.exp()
        d = _dot(lt.sub_(ls).masked_fill_(pt == 0, 0.0), pt)  # sum p_T (lt - ls)
        return d, ls.exp_().sub_(pt)
    if kind == "tvd":
        ps = ls.exp_()
        diff = lt.exp_().sub_(ps)  # p_T - p_S, in lt's memory
        d = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1)
        return d, _project(ps, diff.sign_().mul_(-0.5))
    # (statements ordered so that at most ~2 more [n, V] buffers exist besides ls and lt; n is a row block)
    if kind == "reverse_kl":
        ps = ls.exp()
        r = ls.sub_(lt).masked_fill_(ps == 0, 0.0)
        d = _dot(ps, r)
        return d, r.sub_(d[:, None]).mul_(ps)
    if kind == "jsd":
        log_m = _log_mix(ls, 1 - beta, lt, beta)
        pt = lt.exp()
        kl_t = _dot(lt.sub_(log_m).masked_fill_(pt == 0, 0.0), pt)  # KL(p_T || M)
        del pt
        ps = ls.exp()
        r = ls.sub_(log_m).masked_fill_(ps == 0, 0.0)
        kl_s = _dot(ps, r)  # KL(p_S || M)
        return beta * kl_t + (1 - beta) * kl_s, r.sub_(kl_s[:, None]).mul_(ps).mul_(1 - beta)
    if kind == "skew_forward_kl":
        log_m = _log_mix(lt, a, ls, 1 - a)
        pt = lt.exp()
        zero = pt == 0
        t = lt.sub_(log_m).masked_fill_(zero, 0.0)  # log p_T - log M
        del log_m
        d = _dot(t, pt)
        del pt
        r = t.exp_().masked_fill_(zero, 0.0).mul_(a - 1)  # -(1-a) p_T / M
        return d, _project(ls.exp_(), r)
    if kind == "skew_reverse_kl":
        log_m = _log_mix(lt, 1 - a, ls, a)
        ps = ls.exp()
        zero = ps == 0
        r = ls.sub_(log_m).masked_fill_(zero, 0.0)  # log p_S - log M
        del log_m
        d = _dot(ps, r)
        r.sub_(r.exp().mul_(a)).masked_fill_(zero, 0.0)  # - a p_S / M
        return d, _project(ps, r)
    raise DistilError(f"loss kind: expected one of {', '.join(DIVERGENCES)}, found {kind!r}")


def _project(ps: Tensor, r: Tensor) -> Tensor:
    """p_S * (r - <p_S, r>), in place in r."""
    return r.sub_(_dot(ps, r)[:, None]).mul_(ps)


def _check_args(kind: str, alpha: float, temperature: float, beta: float, skew_alpha: float) -> None:
    if kind not in DIVERGENCES:
        raise DistilError(f"loss kind: expected one of {', '.join(DIVERGENCES)}, found {kind!r}")
    if not temperature > 0:
        raise DistilError(f"loss temperature: expected a number > 0, found {temperature!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("skew_alpha", skew_alpha)):
        if not 0 <= value <= 1:
            raise DistilError(f"loss {name}: expected a number in [0, 1], found {value!r}")


def _check_vocab(student_v: int, teacher_v: int) -> None:
    if student_v != teacher_v:
        raise DistilError(
            f"logit distillation: student vocab size {student_v} != teacher vocab size {teacher_v}; "
            "slice both logits to the shared tokenizer length before the loss"
        )


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> Tensor:
    """Per-token divergence T^2 * D(softmax(z_S/T), softmax(z_T/T)), logits [..., V] -> fp32 [...].

    No masking, no reduction, differentiable w.r.t. both inputs. Logits may be any float dtype.
    """
    _check_args(kind, 1.0, temperature, beta, skew_alpha)
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    ls = F.log_softmax(student_logits.float() / temperature, dim=-1)
    lt = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return _divergence(ls, lt, kind, beta, skew_alpha) * temperature**2


def hard_ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token cross-entropy -log softmax(z_S)[label] in fp32 at T=1, shape of labels; 0 where label == -100."""
    v = student_logits.shape[-1]
    ce = F.cross_entropy(
        student_logits.reshape(-1, v).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return ce.reshape(labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# The batch loss


@dataclass
class LossOutput:
    """What every loss function returns to THE training loop.

    `metrics` are named, detached scalars, each a sum over this call's items divided by the GLOBAL item count
    (`num_items`), like the loss itself: the loop adds them up over micro-batches and processes, and each name
    becomes a `metrics.jsonl` column and a progress-bar field (kd, ce, feature, kl, entropy, length ...).
    """

    loss: Tensor  # scalar, differentiable: (alpha * sum kd + (1 - alpha) * sum ce) / num_items
    metrics: dict[str, Tensor] = field(default_factory=dict)
    n_tokens: int = 0  # valid tokens (items) in this call

    @property
    def kd(self) -> Tensor:
        """sum kd / num_items (0 when the loss has no distillation term)."""
        return self.metrics.get("kd", torch.zeros(()))

    @property
    def ce(self) -> Tensor:
        """sum ce / num_items (0 when the loss has no hard-label term)."""
        return self.metrics.get("ce", torch.zeros(()))


@dataclass(frozen=True)
class _Config:
    kind: str
    alpha: float
    temperature: float
    beta: float
    skew_alpha: float
    denom: float  # num_items


def _chunk_loss(zs: Tensor, zt: Tensor, y: Tensor, cfg: _Config) -> tuple[Tensor, Tensor, Tensor]:
    """Loss of some valid rows: ((alpha * sum kd + (1-alpha) * sum ce) / num_items, sum kd, sum ce).

    zs [n, V] student logits (any dtype; the only input that gets a gradient), zt [n, V] teacher logits, y [n].
    A term with zero weight is computed without autograd: it is a logged metric only.
    """
    t = cfg.temperature
    kd_grad = cfg.alpha > 0 and torch.is_grad_enabled()
    ce_grad = cfg.alpha < 1 and torch.is_grad_enabled()
    with torch.set_grad_enabled(kd_grad):
        z = zs.float()
        ls = F.log_softmax(z / t if t != 1 else z, dim=-1)
        with torch.no_grad():
            zt = zt.float()
            lt = F.log_softmax(zt / t if t != 1 else zt, dim=-1)
        kd = _divergence(ls, lt, cfg.kind, cfg.beta, cfg.skew_alpha).sum() * t**2
    with torch.set_grad_enabled(ce_grad):
        if t == 1 and (kd_grad or not ce_grad):  # reuse log softmax(z_S): CE = -log p_S[y]
            ce = -ls.gather(-1, y[:, None]).sum()
        else:
            ce = F.cross_entropy(zs.float(), y, reduction="sum")
    loss = (cfg.alpha * kd + (1 - cfg.alpha) * ce) / cfg.denom
    return loss, kd.detach(), ce.detach()


def _log_probs(logits: Tensor, t: float, own: bool = False) -> Tensor:
    """log softmax(z / T) in fp32. own=True: the caller gives `logits` away, so its memory may be reused."""
    x = logits.float()
    own = own or x is not logits  # a fresh fp32 copy is ours
    if t != 1:
        x, own = (x.div_(t) if own else x / t), True
    if not own:
        return F.log_softmax(x, dim=-1)
    for block in x.split(128):  # in place, a few rows at a time: no second [n, V] buffer
        block.copy_(F.log_softmax(block, dim=-1))
    return x


def _chunk_loss_and_grad(ls: Tensor, lt: Tensor, y: Tensor, cfg: _Config) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_chunk_loss` plus d loss / d z_S [n, V] fp32, analytically, from fp32 log-probs at T.

        d(T^2 D)/dz = T dD/du   (u = z/T)        d ce/dz = softmax(z) - onehot(y)

    Works through blocks of rows so that its temporaries are [block x V]; the gradient overwrites ls (returned)
    and lt is used as scratch space. So a chunk costs its two log-prob buffers and little more.
    """
    t, alpha = cfg.temperature, cfg.alpha
    kd = ce = ls.new_zeros(())
    for i in range(0, len(y), _BLOCK_ROWS):
        lsb, ltb, yb = ls[i : i + _BLOCK_ROWS], lt[i : i + _BLOCK_ROWS], y[i : i + _BLOCK_ROWS]
        if t == 1:
            ce = ce - lsb.gather(-1, yb[:, None]).sum()
            p1 = lsb.exp() if alpha < 1 else None
        else:  # lsb = z/T - c, so z = T lsb + c' and CE(z) = logsumexp(T lsb) - T lsb[y]
            z = lsb * t
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            ce = ce + (lse - z.gather(-1, yb[:, None])).sum()
            p1 = z.sub_(lse).exp_() if alpha < 1 else None  # softmax(z)
            del z
        if alpha > 0:
            d, grad = _divergence_and_grad(lsb, ltb, cfg.kind, cfg.beta, cfg.skew_alpha)
            grad.mul_(alpha * t)
        else:  # pure CE: the divergence is only a logged metric
            d, grad = _divergence(lsb, ltb, cfg.kind, cfg.beta, cfg.skew_alpha), None
        if alpha < 1:
            grad = p1.mul_(1 - alpha) if grad is None else grad.add_(p1, alpha=1 - alpha)
            grad[torch.arange(len(yb), device=y.device), yb] -= 1 - alpha
        kd = kd + d.sum() * t**2
        if grad.data_ptr() != lsb.data_ptr():
            lsb.copy_(grad)
    loss = (alpha * kd + (1 - alpha) * ce) / cfg.denom
    return loss, kd, ce, ls.div_(cfg.denom)


def _gather_rows(x: Tensor, idx: Tensor | slice) -> Tensor:
    """Rows idx of x viewed as [N, V] (a view for a slice of a viewable tensor, else a copy of those rows)."""
    if isinstance(idx, slice):
        return x.view(-1, x.shape[-1])[idx]
    return x[torch.unravel_index(idx, x.shape[:-1])]


class _ChunkedDistillation(torch.autograd.Function):
    """Loss and d loss / d student_logits computed chunk by chunk in forward; backward scales the stored gradient.

    Only one chunk of fp32 [rows x V] work tensors exists at a time, in forward and in backward. The stored
    gradient has the student logits' shape and dtype (what plain autograd would also allocate).
    """

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, chunks, cfg, need_grad):
        grad = torch.zeros_like(student_logits) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        kd, ce = loss.clone(), loss.clone()
        for rows in chunks:
            y = labels.reshape(-1)[rows]
            if need_grad:
                copied = not isinstance(rows, slice)  # gathered rows are our own copy: reuse their memory
                ls = _log_probs(_gather_rows(student_logits, rows), cfg.temperature, own=copied)
                lt = _log_probs(_gather_rows(teacher_logits, rows), cfg.temperature, own=copied)
                c_loss, c_kd, c_ce, g = _chunk_loss_and_grad(ls, lt, y, cfg)
                _scatter_rows(grad, rows, g)
                del ls, lt, g
            else:
                c_loss, c_kd, c_ce = _chunk_loss(
                    _gather_rows(student_logits, rows), _gather_rows(teacher_logits, rows), y, cfg
                )
            loss += c_loss
            kd += c_kd
            ce += c_ce
        ctx.grad = grad
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad, ctx.grad = ctx.grad, None  # handed over, not copied: backward runs once (no retain_graph)
        if grad is None:
            raise RuntimeError("distillation_loss: backward can run only once per forward")
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):  # skip a [N x V] copy for loss.backward()
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None


def denominator(num_items: int | Tensor | None, n_tokens: int) -> float:
    """num_items (global valid-token count) as a float >= 1; it can never be below this call's own count."""
    if num_items is None:
        return float(max(n_tokens, 1))
    if float(num_items) < n_tokens:
        raise ValueError(
            f"num_items={float(num_items):g} is below this call's {n_tokens} valid tokens; it must "
            "count the valid tokens of the whole global batch"
        )
    return max(float(num_items), 1.0)


def _row_chunks(valid: Tensor, viewable: bool, chunk_size: int) -> list:
    """Chunks of valid row indices, in order; plain slices (no copies) when every row is valid and the logits
    are viewable."""
    idx = valid.nonzero().squeeze(1)
    n_rows = valid.numel()
    if viewable and idx.numel() == n_rows:
        return [slice(i, min(i + chunk_size, n_rows)) for i in range(0, n_rows, chunk_size)]
    return list(idx.split(chunk_size))


def _scatter_rows(grad: Tensor, rows: Tensor | slice, g: Tensor) -> None:
    """grad (viewed as [N, V]) at rows = g: the inverse of `_gather_rows`."""
    if isinstance(rows, slice):
        grad.view(-1, grad.shape[-1])[rows] = g
    else:
        grad[torch.unravel_index(rows, grad.shape[:-1])] = g


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    *,
    kind: str = "forward_kl",
    alpha: float = 1.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_items: int | Tensor | None = None,
    chunk_size: int | None = 1024,
) -> LossOutput:
    """Distillation loss over aligned logits [..., V] (position i predicts labels[i]) and labels [...].

    labels == -100 are masked: they change neither the loss nor any gradient. `num_items` is the valid-token
    count of the global batch (default: this call's). `chunk_size` valid tokens are processed at a time;
    `chunk_size=None` is the plain-autograd reference (all tokens at once). No gradient reaches the teacher.
    -inf logits (masked vocabulary entries) are fine; NaN or +inf in a valid row is a model bug and shows as NaN.
    """
    _check_args(kind, alpha, temperature, beta, skew_alpha)
    _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
    if student_logits.shape != teacher_logits.shape or student_logits.shape[:-1] != labels.shape:
        raise DistilError(
            f"distillation_loss: expected student/teacher logits [..., V] and labels [...] with equal leading "
            f"shapes, found {tuple(student_logits.shape)}, {tuple(teacher_logits.shape)}, {tuple(labels.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise DistilError(f"loss chunk_size: expected an integer >= 1 or None, found {chunk_size!r}")
    teacher_logits = teacher_logits.detach()
    valid = labels.reshape(-1) != IGNORE_INDEX
    n_tokens = int(valid.sum())
    cfg = _Config(kind, alpha, temperature, beta, skew_alpha, denominator(num_items, n_tokens))
    if chunk_size is None:  # reference path: one chunk, ordinary autograd
        rows = valid.nonzero().squeeze(1)
        y = labels.reshape(-1)[rows]
        loss, kd, ce = _chunk_loss(_gather_rows(student_logits, rows), _gather_rows(teacher_logits, rows), y, cfg)
    else:
        try:
            student_logits.view(-1, student_logits.shape[-1]), teacher_logits.view(-1, teacher_logits.shape[-1])
            viewable = True
        except RuntimeError:  # e.g. logits[:, :-1] of a [B, S, V] tensor: gather rows instead
            viewable = False
        chunks = _row_chunks(valid, viewable, chunk_size)
        need_grad = torch.is_grad_enabled() and student_logits.requires_grad
        loss, kd, ce = _ChunkedDistillation.apply(student_logits, teacher_logits, labels, chunks, cfg, need_grad)
    return LossOutput(loss=loss, metrics={"kd": kd.detach() / cfg.denom, "ce": ce.detach() / cfg.denom},
                      n_tokens=n_tokens)
