"""Offline (response-based) distillation: a frozen, pre-trained teacher's live logits on the training text are
the soft targets (Hinton et al. 2015). `distill.alpha` mixes in the hard labels.

"Offline" is the glossary's sense: the teacher is trained already and stays frozen while the student learns
(as opposed to online distillation, where both train together). The teacher's forward runs on every step
here; method `cache` stores its top-k instead when that pays.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from distil.fused import fused_distillation_loss, teacher_from_hidden
from distil.heads import choose_fused, final_hidden, head_weights, shift, stderr_note
from distil.losses import LossOutput, distillation_loss
from distil.methods.contract import Context, Method, Phase, Stage, Trainable, unwrap

LossFn = Callable[[Any, dict, float], LossOutput]


def kd_from_logits(spec: Any, vocab: int, s_logits: torch.Tensor, t_logits: torch.Tensor, labels: torch.Tensor,
                   num_items: float) -> LossOutput:
    """The logit term on both models' logits [B, T, V]: position t predicts token t+1, so both are shifted against
    the labels (ignore_index -100), cut to the shared vocabulary, and reduced over `num_items` target tokens."""
    s, shifted = shift(s_logits, labels, vocab)
    t, _ = shift(t_logits, labels, vocab)
    return distillation_loss(s, t, shifted, kind=spec.loss, alpha=spec.alpha, temperature=spec.temperature,
                             beta=spec.beta, skew_alpha=spec.skew_alpha, num_items=num_items,
                             chunk_size=spec.chunk_size)


def kd_from_hidden(spec: Any, vocab: int, student: Any, teacher: Any, s_hidden: torch.Tensor,
                   t_hidden: torch.Tensor, labels: torch.Tensor, num_items: float) -> LossOutput:
    """The same term from both models' final hidden states [B, T, H]: the logits are projected through each
    model's own LM head chunk by chunk inside the loss (distil/fused.py), so no [tokens x vocab] tensor exists."""
    weight, bias = head_weights(unwrap(student), vocab)
    t_weight, t_bias = head_weights(teacher, vocab)
    teacher_rows = teacher_from_hidden(t_hidden[:, :-1], t_weight, t_bias)
    return fused_distillation_loss(s_hidden[:, :-1], weight, labels[:, 1:], teacher_rows, lm_head_bias=bias,
                                   kind=spec.loss, alpha=spec.alpha, temperature=spec.temperature, beta=spec.beta,
                                   skew_alpha=spec.skew_alpha, num_items=num_items, chunk_size=spec.chunk_size)


def build_offline(teacher: Any, spec: Any, vocab: int, echo: Callable[[str], None] = stderr_note) -> LossFn:
    """The loss function of method `offline`: `spec` is the recipe's `distill` section.

    With `spec.fused`, neither model's [tokens x vocab] logits ever exist: both are projected from hidden states
    chunk by chunk inside the loss (distil/fused.py). Whether that reproduces each model's own logits is checked
    once, on the first batch (heads.fused_head_problem); if not, the plain logits path runs, with one note.
    """
    fused = {"ok": None}  # decided on the first call, for the teacher and the student

    def plain(student: Any, batch: dict, num_items: float) -> LossOutput:
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return kd_from_logits(spec, vocab, s_logits, t_logits, batch["labels"], num_items)

    def fused_loss(student: Any, batch: dict, num_items: float) -> LossOutput:
        with torch.no_grad():
            t_hidden = final_hidden(teacher, batch)
        s_hidden = final_hidden(student, batch)
        return kd_from_hidden(spec, vocab, student, teacher, s_hidden, t_hidden, batch["labels"], num_items)

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        if fused["ok"] is None:
            fused["ok"] = choose_fused(spec.fused, batch, {"teacher": teacher, "student": unwrap(student)}, echo)
        return (fused_loss if fused["ok"] else plain)(student, batch, num_items)

    return loss_fn


def stage(ctx: Context) -> Stage:
    module = Trainable(ctx.student.model)
    loss_fn = build_offline(ctx.teacher().model, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    return Stage(phases=[Phase(name="offline", module=module, loss_fn=loss_fn, examples=ctx.train_examples)])


METHOD = Method(
    name="offline",
    summary="a frozen teacher's live logits on the training text are the soft targets (response-based KD)",
    teacher="train",
    build=stage,
)
