"""Sparse distillation losses over a cached top-k support of the teacher's distribution.

A teacher-logit cache (methods/cache.py) keeps, per target token, the teacher's k most likely token ids S, their
log-probabilities log p_T,i (i in S) and the log of the mass left outside them, log(1 - P_T), P_T = sum_S p_T,i.
The student's log-probabilities always come from its FULL-vocabulary log-softmax (logsumexp over every token), so
mass the student puts outside S counts against it. Two ways to handle the teacher's missing tail (`tail`):

    renorm      q_i = p_T,i / P_T on S (the top-k renormalised to a distribution):
                    D = sum_S q_i (log q_i - log p_S,i)
    tail_term   the k tokens plus one "everything else" bucket, both models coarse-grained the same way:
                    D = sum_S p_T,i (log p_T,i - log p_S,i) + (1 - P_T) log((1 - P_T) / (1 - P_S)),
                P_S = sum_S p_S,i. This is KL between the two (k+1)-outcome distributions, a lower bound of the full
                KL(p_T || p_S) that is exact when k = V (then both tails are 0 and the term is 0 * log(0/0) := 0).

Gradients w.r.t. u = z_S / T (analytic, computed during the forward pass chunk by chunk, as in losses.py):
    renorm      dD/du_v = p_S,v - q_v                                    (q_v = 0 off S)
    tail_term   dD/du_v = p_S,v - p_T,v                                  on S
                dD/du_v = p_S,v (1 - (1 - P_T) / (1 - P_S))              off S
i.e. off the support the student is pulled toward its own tail shape scaled to the teacher's tail mass.

Temperature. The soft term uses p = softmax(z / T) for both models and is multiplied by T^2 (Hinton et al. 2015);
the hard-label cross-entropy is at T = 1 and weighted by (1 - alpha), exactly as `distillation_loss`. The cache
stores log-probabilities at the temperature it was built with (`cache_temperature`, normally 1). Re-tempering to
another T is exact for the renormalised support distribution: softmax(z/T) restricted to S and renormalised is
        q_i(T) = exp(log p_i(T_c) * T_c / T) / sum_S exp(log p_j(T_c) * T_c / T),
because log p_i(T_c) = z_i / T_c - const. The tail mass at T, however, depends on the logits outside S that the
cache does not keep, so `tail_term` at T != cache_temperature is refused (rebuild the cache at that temperature).

Layout: student logits [..., V] with labels [...] (position i predicts labels[i], -100 masked); the sparse targets
have one row per VALID label position, in row-major order: topk_ids [n_valid, k] (any integer dtype),
topk_logprobs [n_valid, k] (any float dtype; -inf = probability 0), tail_logmass [n_valid] (-inf = no tail).
Reduction: (alpha * sum kd + (1 - alpha) * sum ce) / num_items, num_items = valid tokens of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.errors import DistilError
from distil.fused import Chunk, fused_linear_loss
from distil.losses import IGNORE_INDEX, LossOutput, _gather_rows, _row_chunks, _scatter_rows, denominator

TailMode = Literal["renorm", "tail_term"]
TAIL_MODES = ("renorm", "tail_term")


def retemper(logprobs: Tensor, from_temperature: float, to_temperature: float) -> Tensor:
    """Log-probabilities of the support distribution at `to_temperature`, from ones at `from_temperature`.

    logprobs [..., k] = log softmax(z / T_c) at the support ids; returns log of softmax(z / T) restricted to the
    support and renormalised over it (fp32). Exact whatever the (unknown) logits outside the support are.
    """
    lp = logprobs.float()
    if from_temperature != to_temperature:
        lp = lp * (from_temperature / to_temperature)
    return torch.log_softmax(lp, dim=-1)  # -inf entries stay -inf (probability 0)


@dataclass(frozen=True)
class _Cfg:
    tail: str
    alpha: float
    temperature: float
    denom: float


def _targets(lp: Tensor, tail: Tensor, cfg: _Cfg, cache_temperature: float) -> tuple[Tensor, Tensor | None]:
    """Teacher log-probs on the support at T (fp32) and, for tail_term, log(1 - P_T) at T."""
    if cfg.tail == "renorm":
        return retemper(lp, cache_temperature, cfg.temperature), None
    return lp.float(), tail.float()


def _sparse_chunk(z: Tensor, ids: Tensor, lq: Tensor, ltail: Tensor | None, y: Tensor, cfg: _Cfg,
                  need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Loss terms of some valid rows: (loss, sum kd, sum ce, d loss / d z [n, V] fp32 or None).

    z [n, V] student logits, ids [n, k] int64, lq [n, k] teacher log-probs at T (fp32), ltail [n] log(1 - P_T).
    """
    t, alpha = cfg.temperature, cfg.alpha
    zf = z.float()
    ls = F.log_softmax(zf / t if t != 1 else zf, dim=-1)  # [n, V], full-vocabulary logsumexp
    ls_s = ls.gather(1, ids)  # student log-probs on the support
    q = lq.exp()
    d = (q * torch.where(q > 0, lq - ls_s, 0.0)).sum(-1)  # sum_S p_T (log p_T - log p_S), 0 log 0 := 0
    if t == 1:
        ce = -ls.gather(1, y[:, None]).sum()
        p1 = None
    else:
        lse = torch.logsumexp(zf, dim=-1, keepdim=True)
        ce = (lse.squeeze(1) - zf.gather(1, y[:, None]).squeeze(1)).sum()
        p1 = (zf - lse).exp_() if need_grad and alpha < 1 else None  # softmax(z) at T = 1
    del zf
    ps = ls.exp_()  # p_S at T, in ls's memory
    if t == 1 and need_grad and alpha < 1:
        p1 = ps.clone()  # softmax(z) at T = 1, kept apart from the gradient buffer
    if cfg.tail == "tail_term":
        ps_s = ls_s.exp()
        ps.scatter_(1, ids, 0.0)  # only the student's mass off the support is left
        off = ps.sum(-1)  # 1 - P_S, summed from the small terms (no cancellation when P_S ~ 1)
        has_tail = ltail > float("-inf")
        log_off = off.clamp_min(torch.finfo(torch.float32).tiny).log()
        d = d + torch.where(has_tail, ltail.exp() * (ltail - log_off), 0.0)
        if need_grad and alpha > 0:
            ratio = torch.where(has_tail, (ltail - log_off).exp(), 0.0)  # (1 - P_T) / (1 - P_S)
            grad = ps.mul_((1 - ratio)[:, None]).scatter_(1, ids, ps_s - q)
        else:
            grad = None
    elif need_grad and alpha > 0:
        grad = ps.scatter_add_(1, ids, -q)  # p_S - q
    else:
        grad = None
    kd = d.sum() * t**2
    loss = (alpha * kd + (1 - alpha) * ce) / cfg.denom
    if not need_grad:
        return loss, kd, ce, None
    if grad is not None:
        grad.mul_(alpha * t)  # d(T^2 D)/dz = T dD/du
    if alpha < 1:
        grad = p1.mul_(1 - alpha) if grad is None else grad.add_(p1, alpha=1 - alpha)
        grad[torch.arange(len(y), device=y.device), y] -= 1 - alpha
    return loss, kd, ce, grad.div_(cfg.denom)


class _SparseDistillation(torch.autograd.Function):
    """Loss and its gradient w.r.t. the student logits, chunk by chunk in forward; backward scales the gradient."""

    @staticmethod
    def forward(ctx, student_logits, ids, lq, ltail, labels, chunks, cfg, need_grad):
        grad = torch.zeros_like(student_logits) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=student_logits.device)
        kd, ce = loss.clone(), loss.clone()
        flat_labels = labels.reshape(-1)
        start = 0  # sparse rows are the valid rows in order: chunk j covers the next len(chunk) of them
        for rows in chunks:
            n = (rows.stop - rows.start) if isinstance(rows, slice) else rows.numel()
            sl = slice(start, start + n)
            start += n
            c_loss, c_kd, c_ce, g = _sparse_chunk(
                _gather_rows(student_logits, rows), ids[sl], lq[sl], None if ltail is None else ltail[sl],
                flat_labels[rows], cfg, need_grad)
            if g is not None:
                _scatter_rows(grad, rows, g)
            loss += c_loss
            kd += c_kd
            ce += c_ce
        ctx.grad = grad
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad = ctx.grad
        if grad is None:
            return (None,) * 8
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad = grad * grad_loss.to(grad.dtype)
        return (grad,) + (None,) * 7


def _prepare(topk_ids: Tensor, topk_logprobs: Tensor, tail_logmass: Tensor, labels: Tensor, vocab: int, dev, *,
             tail: str, temperature: float, cache_temperature: float, alpha: float, num_items, chunk_size: int,
             who: str, shape_error: str | None) -> tuple[_Cfg, Tensor, Tensor, Tensor | None, int]:
    """Check the arguments shared by both entry points (`shape_error`: the caller's own input-shape complaint,
    raised after the scalar checks); returns (cfg, ids int64, lq at T, log tail or None, number of valid rows)."""
    if tail not in TAIL_MODES:
        raise DistilError(f"sparse loss tail: expected one of {', '.join(TAIL_MODES)}, found {tail!r}")
    if not temperature > 0 or not cache_temperature > 0:
        raise DistilError(f"sparse loss temperature: expected numbers > 0, found {temperature!r}, "
                          f"{cache_temperature!r}")
    if not 0 <= alpha <= 1:
        raise DistilError(f"sparse loss alpha: expected a number in [0, 1], found {alpha!r}")
    if tail == "tail_term" and temperature != cache_temperature:
        raise DistilError(
            f"cache: tail 'tail_term' needs the cache's temperature ({cache_temperature:g}) to equal "
            f"distill.temperature ({temperature:g}): the tail mass cannot be re-tempered without the logits outside "
            f"the top-k; rebuild the cache with cache.temperature={temperature:g} or use cache.tail=renorm")
    if chunk_size is None or chunk_size < 1:
        raise DistilError(f"sparse loss chunk_size: expected an integer >= 1, found {chunk_size!r}")
    if shape_error:
        raise DistilError(shape_error)
    n_tokens = int((labels.reshape(-1) != IGNORE_INDEX).sum())
    k = topk_ids.shape[-1] if topk_ids.dim() == 2 else -1
    if (topk_ids.shape != (n_tokens, k) or topk_logprobs.shape != topk_ids.shape
            or tail_logmass.shape != (n_tokens,)):
        raise DistilError(
            f"{who}: expected one target row per valid label ({n_tokens}): ids/logprobs [{n_tokens}, k] and "
            f"tail [{n_tokens}], found {tuple(topk_ids.shape)}, {tuple(topk_logprobs.shape)}, "
            f"{tuple(tail_logmass.shape)}")
    if n_tokens and int(topk_ids.max()) >= vocab:
        raise DistilError(f"{who}: a cached token id ({int(topk_ids.max())}) is outside the student's "
                          f"vocabulary ({vocab})")
    denom = denominator(num_items, n_tokens)  # refuses num_items below this call's own count
    cfg = _Cfg(tail, alpha, temperature, max(denom, 1.0))
    ids = topk_ids.to(device=dev, dtype=torch.long)
    lq, ltail = _targets(topk_logprobs.to(dev), tail_logmass.to(dev), cfg, cache_temperature)
    return cfg, ids, lq, ltail, n_tokens


def sparse_kd_loss(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    labels: Tensor,
    *,
    tail: TailMode = "tail_term",
    temperature: float = 1.0,
    cache_temperature: float = 1.0,
    alpha: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """Forward KL from cached top-k teacher targets (see the module docstring for the formulas and the layout)."""
    bad = student_logits.shape[:-1] != labels.shape
    cfg, ids, lq, ltail, n_tokens = _prepare(
        topk_ids, topk_logprobs, tail_logmass, labels, student_logits.shape[-1], student_logits.device, tail=tail,
        temperature=temperature, cache_temperature=cache_temperature, alpha=alpha, num_items=num_items,
        chunk_size=chunk_size, who="sparse_kd_loss",
        shape_error=bad and (f"sparse_kd_loss: expected logits [..., V] and labels [...], found "
                             f"{tuple(student_logits.shape)}, {tuple(labels.shape)}"))
    valid = labels.reshape(-1) != IGNORE_INDEX
    try:
        student_logits.view(-1, student_logits.shape[-1])
        viewable = True
    except RuntimeError:
        viewable = False
    chunks = _row_chunks(valid, viewable, chunk_size)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    loss, kd, ce = _SparseDistillation.apply(student_logits, ids, lq, ltail, labels, chunks, cfg, need_grad)
    return LossOutput(loss=loss, metrics={"kd": kd.detach() / cfg.denom, "ce": ce.detach() / cfg.denom},
                      n_tokens=n_tokens)


def fused_sparse_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    tail_logmass: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Tensor | None = None,
    tail: TailMode = "tail_term",
    temperature: float = 1.0,
    cache_temperature: float = 1.0,
    alpha: float = 1.0,
    num_items: int | float | Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """`sparse_kd_loss(student_hidden @ W.T + b, ...)` without materialising the student's [N, V] logits.

    student_hidden [..., H] aligned with labels [...]; lm_head_weight [V, H] (+ lm_head_bias [V]); the sparse
    targets as in `sparse_kd_loss` (one row per valid label, in order). The student's logits are projected chunk by
    chunk inside distil/fused.py's fused linear loss, which hands each chunk's valid rows to `_sparse_chunk` for the
    loss and G_c = dloss/dz_c; gradients reach student_hidden, lm_head_weight and lm_head_bias.
    """
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat = labels.reshape(-1)
    bad = hidden.shape[0] != flat.shape[0] or lm_head_weight.shape[-1] != hidden.shape[-1]
    cfg, ids, lq, ltail, n_tokens = _prepare(
        topk_ids, topk_logprobs, tail_logmass, flat, lm_head_weight.shape[0], hidden.device, tail=tail,
        temperature=temperature, cache_temperature=cache_temperature, alpha=alpha, num_items=num_items,
        chunk_size=chunk_size, who="fused_sparse_kd_loss",
        shape_error=bad and (f"fused_sparse_kd_loss: expected hidden [N, H], labels [N], lm_head_weight [V, H], "
                             f"found {tuple(student_hidden.shape)}, {tuple(labels.shape)}, "
                             f"{tuple(lm_head_weight.shape)}"))

    def chunk_loss(chunk: Chunk, y: Tensor, student_logits, need_grad: bool):
        # the chunk's valid rows are sparse rows offset .. offset + n - 1 (the targets are stored per valid row)
        sl = slice(chunk.offset, chunk.offset + len(y))
        return _sparse_chunk(student_logits(), ids[sl], lq[sl], None if ltail is None else ltail[sl], y, cfg,
                             need_grad)

    loss, kd, ce = fused_linear_loss(hidden, lm_head_weight, lm_head_bias, flat, chunk_loss, chunk_size)
    return LossOutput(loss=loss, metrics={"kd": kd.detach() / cfg.denom, "ce": ce.detach() / cfg.denom},
                      n_tokens=n_tokens)
