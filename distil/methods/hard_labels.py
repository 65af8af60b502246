"""Hard labels: plain next-token cross-entropy on the data, no teacher. The control that shows what the
teacher's soft targets add (`eval.hard_label_baseline` trains it beside any method with the same budget)."""

from __future__ import annotations

from typing import Any

from distil.heads import shift
from distil.losses import LossOutput, hard_ce
from distil.methods.contract import Context, Method, Phase, Stage, Trainable


def build_hard_labels(teacher: Any = None, spec: Any = None, vocab: int | None = None) -> Any:
    """loss = sum over target tokens of -log p_S(y) / num_items (the teacher and spec are not used)."""

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, labels = shift(s_logits, batch["labels"], vocab or s_logits.shape[-1])
        ce = hard_ce(s.reshape(-1, s.shape[-1]), labels.reshape(-1))  # [N], 0 on masked tokens
        n_valid = int((labels != -100).sum())
        loss = ce.sum() / max(float(num_items), 1.0)
        return LossOutput(loss=loss, metrics={"ce": loss.detach()}, n_tokens=n_valid)

    return loss_fn


def stage(ctx: Context) -> Stage:
    module = Trainable(ctx.student.model)
    return Stage(phases=[Phase(name="hard_labels", module=module, loss_fn=build_hard_labels(vocab=ctx.vocab),
                               examples=ctx.train_examples)])


METHOD = Method(
    name="hard_labels",
    summary="plain cross-entropy on the data, no teacher (the control)",
    teacher="none",
    build=stage,
)
