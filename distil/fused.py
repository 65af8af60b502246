"""Fused lm_head + distillation loss: neither model's [tokens x vocab] logits ever exist whole.

The dense loss (losses.py) still needs both models' full logits as input: at 8,192 tokens and V = 49,152 that
is 1.6 GB per model in fp32 before the loss even starts. Here the inputs are the student's last hidden states
h [N, H] and its lm_head weight W [V, H] (+ bias b), and the teacher is a callable that produces its logits for
rows start:end on demand (from its own hidden states and lm_head, or from a cache).

For each chunk of rows c (Liger-Kernel's chunked fused-linear losses), in the forward pass:

    z_c    = h_c W^T + b                       student logits of the chunk            [c, V]
    L_c    = (alpha sum kd + (1-alpha) sum ce) / num_items
    G_c    = dL_c / dz_c                        analytic, as in losses.py              [c, V]
    dh_c   = G_c W                              stored                                 [c, H]
    dW    += G_c^T h_c                          accumulated in fp32                     [V, H]
    db    += sum_rows G_c

and backward only multiplies the stored dh, dW, db by the incoming gradient (1.0 for `loss.backward()`).
Peak extra memory is about three [chunk x V] fp32 tensors plus dW, instead of ~9 [N x V] ones.

Only the middle two lines depend on the loss: `fused_linear_loss` takes them as a `ChunkLoss` callable (loss and
G_c for one chunk's valid rows), and everything else (projection, dh/dW/db, backward) is shared. The dense
divergences against a teacher's logits are `_dense_chunk_loss` here; the sparse top-k cache loss plugs in its own
(sparse.fused_sparse_kd_loss).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.errors import DistilError
from distil.losses import (
    IGNORE_INDEX,
    LossOutput,
    _check_args,
    _check_vocab,
    _chunk_loss,
    _chunk_loss_and_grad,
    _Config,
    denominator,
    _log_probs,
)

TeacherLogits = Callable[[int, int], Tensor]  # teacher(start, end) -> logits [end - start, V]


def teacher_from_hidden(teacher_hidden: Tensor, teacher_weight: Tensor, teacher_bias: Tensor | None = None):
    """A `teacher(start, end)` callable that projects teacher_hidden[start:end] [*, H_T] through its lm_head."""
    hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()

    def teacher(start: int, end: int) -> Tensor:
        with torch.no_grad():
            return F.linear(hidden[start:end], teacher_weight, teacher_bias)

    return teacher


@dataclass(frozen=True)
class Chunk:
    """Rows start:end of the flat [N] batch, of which `rows` (indices into start:end) have a label; `offset` is
    the number of valid rows before `start`, so that valid row j of the chunk is valid row offset + j overall
    (sparse targets, such as a cache's, are stored per valid row)."""

    start: int
    end: int
    rows: Tensor
    offset: int

    @property
    def all_rows(self) -> bool:
        return self.rows.numel() == self.end - self.start


# chunk_loss(chunk, labels_of_valid_rows [n], student_logits) -> (loss, sum kd, sum ce, G_c = dloss/dz_c or None).
# student_logits() projects z_c = h_c W^T + b for the chunk's valid rows [n, V] (a fresh tensor, the loss's to
# reuse); it is a thunk so that a loss may fetch its targets first and hold fewer [n, V] buffers at once. G_c is
# [n, V] (any float dtype) and must be returned when need_grad is set, None otherwise.
ChunkLoss = Callable[[Chunk, Tensor, Callable[[], Tensor], bool], tuple[Tensor, Tensor, Tensor, "Tensor | None"]]


class _FusedLinearLoss(torch.autograd.Function):
    """Per chunk in forward: project, loss and G_c (the pluggable `chunk_loss`), then dh_c / dW / db; backward
    scales the stored gradients. Chunks whose labels are all -100 are skipped (no projection at all)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_loss, chunk_size, needs):
        need_h, need_w, need_b = needs
        n = hidden.shape[0]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        need_grad = need_h or need_w or need_b
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd, ce = loss.clone(), loss.clone()
        offset = 0  # valid rows seen before this chunk
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            rows = (labels[start:end] != IGNORE_INDEX).nonzero().squeeze(1)
            if rows.numel() == 0:  # nothing to learn here: skip the projections
                continue
            chunk = Chunk(start, end, rows, offset)
            offset += rows.numel()
            all_rows = chunk.all_rows
            h_c = hidden[start:end] if all_rows else hidden[start:end][rows]
            y = labels[start:end][rows]
            c_loss, c_kd, c_ce, g = chunk_loss(chunk, y, lambda: F.linear(h_c, weight, bias), need_grad)
            if need_grad:
                g = g.to(weight.dtype)
                if need_h:  # dh_c = G_c W
                    if all_rows:
                        torch.matmul(g, weight, out=grad_h[start:end])
                    else:
                        grad_h[start + rows] = g @ weight
                if need_w:  # dW += G_c^T h_c, accumulated in fp32
                    if weight.dtype == torch.float32:
                        grad_w.addmm_(g.t(), h_c)
                    else:
                        grad_w += (g.t() @ h_c).float()
                if need_b:  # db += sum over rows of G_c
                    grad_b += g.float().sum(0)
            del g  # before the next chunk allocates its own
            loss += c_loss
            kd += c_kd
            ce += c_ce
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        one = torch.equal(grad_loss, torch.ones_like(grad_loss))
        grads, ctx.grads = ctx.grads, None  # handed over, not copied: backward runs once (no retain_graph)
        if grads is None:
            raise RuntimeError("fused linear loss: backward can run only once per forward")
        out = []
        for g, dtype in zip(grads, ctx.dtypes):
            if g is not None:
                g = (g if one else g * grad_loss).to(dtype)
            out.append(g)
        return (*out, None, None, None, None)


def fused_linear_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk_loss: ChunkLoss,
                      chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, sum kd, sum ce) of `chunk_loss` over hidden [N, H] @ W.T + b, chunk by chunk (see the module
    docstring); gradients reach hidden, weight and bias as far as they require them."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    return _FusedLinearLoss.apply(hidden, weight, bias, labels, chunk_loss, chunk_size, needs)


def _dense_chunk_loss(teacher: TeacherLogits, cfg: _Config, vocab: int) -> ChunkLoss:
    """The dense divergences of losses.py against teacher(start, end) logits, as a `ChunkLoss`."""

    def chunk_loss(chunk: Chunk, y: Tensor, student_logits: Callable[[], Tensor], need_grad: bool):
        start, end, all_rows = chunk.start, chunk.end, chunk.all_rows
        t_c = teacher(start, end).detach()
        _check_vocab(vocab, t_c.shape[-1])
        if t_c.shape[0] != end - start:
            raise DistilError(f"teacher({start}, {end}) returned {t_c.shape[0]} rows, expected {end - start}")
        t_c = t_c if all_rows else t_c[chunk.rows]
        if not need_grad:
            return (*_chunk_loss(student_logits(), t_c, y, cfg), None)
        # teacher first, then the student's logits turned into log-probs in their own memory
        lt = _log_probs(t_c, cfg.temperature, own=not all_rows)  # t_c[rows] is our copy
        del t_c
        ls = _log_probs(student_logits(), cfg.temperature, own=True)
        return _chunk_loss_and_grad(ls, lt, y, cfg)  # G_c = dL_c/dz_c, fp32

    return chunk_loss


def fused_distillation_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    teacher: TeacherLogits,
    *,
    lm_head_bias: Tensor | None = None,
    kind: str = "forward_kl",
    alpha: float = 1.0,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    num_items: int | Tensor | None = None,
    chunk_size: int = 1024,
) -> LossOutput:
    """`distillation_loss(student_hidden @ W.T + b, teacher logits, labels, ...)` without materialising logits.

    student_hidden [N, H] aligned with labels [N] (position i predicts labels[i]); lm_head_weight [V, H];
    teacher(start, end) -> teacher logits [end - start, V] for those rows (see `teacher_from_hidden`); it may
    return a view into a cache, which is only read. It is not called for chunks whose labels are all -100.
    Gradients reach student_hidden, lm_head_weight and lm_head_bias; none reach the teacher.
    """
    _check_args(kind, alpha, temperature, beta, skew_alpha)
    if chunk_size is None or chunk_size < 1:
        raise DistilError(f"fused loss chunk_size: expected an integer >= 1, found {chunk_size!r}")
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = labels.reshape(-1)
    if hidden.shape[0] != labels.shape[0] or lm_head_weight.shape[-1] != hidden.shape[-1]:
        raise DistilError(
            f"fused_distillation_loss: expected hidden [N, H], labels [N], lm_head_weight [V, H], found "
            f"{tuple(student_hidden.shape)}, {tuple(labels.shape)}, {tuple(lm_head_weight.shape)}"
        )
    n_tokens = int((labels != IGNORE_INDEX).sum())
    cfg = _Config(kind, alpha, temperature, beta, skew_alpha, denominator(num_items, n_tokens))
    chunk_loss = _dense_chunk_loss(teacher, cfg, lm_head_weight.shape[0])
    loss, kd, ce = fused_linear_loss(hidden, lm_head_weight, lm_head_bias, labels, chunk_loss, chunk_size)
    return LossOutput(loss=loss, metrics={"kd": kd / cfg.denom, "ce": ce / cfg.denom}, n_tokens=n_tokens)
