"""Offline (response-based) distillation: a frozen, pre-trained teacher's live logits on the
training text are the soft targets (Hinton et al. 2015). `alpha` mixes in the hard labels.

"Offline" is the glossary's sense: the teacher is trained already and stays frozen while the
student learns (as opposed to online distillation, where both train together). The teacher's
forward runs on every step here; `distil cache` stores its top-k instead when that pays.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distil.errors import DistilError
from distil.fused import fused_distillation_loss, teacher_from_hidden
from distil.losses import LossOutput, distillation_loss, hard_ce

LossFn = Callable[[Any, dict, float], LossOutput]


def shift(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal alignment: the logits at position t predict the token at t + 1.

    Logits are also sliced to the tokenizer's vocabulary: embedding matrices padded beyond it
    (e.g. to a multiple of 64) add rows that no token uses.
    """
    return logits[:, :-1, :vocab], labels[:, 1:]


def fusable(model: Any) -> bool:
    """The fused loss recomputes logits as hidden @ W.T (+ b): only valid when nothing else happens
    between the final hidden state and the logits (no soft-capping, no logit scaling)."""
    cfg = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (head is not None and isinstance(head, torch.nn.Linear)
            and not getattr(cfg, "final_logit_softcapping", None)
            and getattr(cfg, "logit_scale", None) in (None, 1.0))


def final_hidden(model: Any, batch: dict) -> torch.Tensor:
    """The last layer's (normed) hidden states [B, T, H], through the model's own forward (so DDP's
    hooks still see it); `logits_to_keep=1` makes the model project only one position."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    return out.hidden_states[-1]


def _unwrap(model: Any) -> Any:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def build_offline(teacher: Any, spec: Any, vocab: int) -> LossFn:
    if spec.fused and fusable(teacher):
        return _build_offline_fused(teacher, spec, vocab)

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, labels = shift(s_logits, batch["labels"], vocab)
        t, _ = shift(t_logits, batch["labels"], vocab)
        return distillation_loss(s, t, labels, kind=spec.loss, alpha=spec.alpha, temperature=spec.temperature,
                                 beta=spec.beta, skew_alpha=spec.skew_alpha, num_items=num_items,
                                 chunk_size=spec.chunk_size)

    return loss_fn


def _build_offline_fused(teacher: Any, spec: Any, vocab: int) -> LossFn:
    """Same loss as the plain path, but neither model's [tokens x vocab] logits ever exist: both
    are projected from hidden states chunk by chunk inside the loss (distil/fused.py)."""
    t_head = teacher.get_output_embeddings()

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        head = _unwrap(student).get_output_embeddings()
        if not fusable(_unwrap(student)):
            raise DistilError("distill.fused: the student's output head is not a plain linear layer; "
                              "set distill.fused: false")
        with torch.no_grad():
            t_hidden = final_hidden(teacher, batch)[:, :-1]
        s_hidden = final_hidden(student, batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        bias = head.bias[:vocab] if head.bias is not None else None
        t_bias = t_head.bias[:vocab] if t_head.bias is not None else None
        teacher_rows = teacher_from_hidden(t_hidden, t_head.weight[:vocab], t_bias)
        return fused_distillation_loss(s_hidden, head.weight[:vocab], labels, teacher_rows, lm_head_bias=bias,
                                       kind=spec.loss, alpha=spec.alpha, temperature=spec.temperature,
                                       beta=spec.beta, skew_alpha=spec.skew_alpha, num_items=num_items,
                                       chunk_size=spec.chunk_size)

    return loss_fn


def build_hard_labels(teacher: Any, spec: Any, vocab: int) -> LossFn:
    """Plain next-token cross-entropy on the data: the no-teacher control (alpha = 0)."""

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, labels = shift(s_logits, batch["labels"], vocab)
        ce = hard_ce(s.reshape(-1, s.shape[-1]), labels.reshape(-1))  # [N], 0 on masked tokens
        n_valid = int((labels != -100).sum())
        loss = ce.sum() / max(float(num_items), 1.0)
        return LossOutput(loss=loss, kd=torch.zeros(()), ce=loss.detach(), n_tokens=n_valid)

    return loss_fn
