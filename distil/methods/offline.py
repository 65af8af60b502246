"""Offline (response-based) distillation: a frozen, pre-trained teacher's live logits on the
training text are the soft targets (Hinton et al. 2015). `alpha` mixes in the hard labels.

"Offline" is the glossary's sense: the teacher is trained already and stays frozen while the
student learns (as opposed to online distillation, where both train together). The teacher's
forward runs on every step here; `distil cache` stores its top-k instead when that pays.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distil.losses import LossOutput, distillation_loss, hard_ce

LossFn = Callable[[Any, dict, float], LossOutput]


def shift(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal alignment: the logits at position t predict the token at t + 1.

    Logits are also sliced to the tokenizer's vocabulary: embedding matrices padded beyond it
    (e.g. to a multiple of 64) add rows that no token uses.
    """
    return logits[:, :-1, :vocab], labels[:, 1:]


def build_offline(teacher: Any, spec: Any, vocab: int) -> LossFn:
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
