"""Teacher-assistant knowledge distillation (TAKD, Mirzadeh et al. 2020): teacher -> assistant -> student.

When the teacher is far stronger than the student, the student may learn less from it than from a teacher of
intermediate size (the capacity gap). TAKD puts an assistant of intermediate size between them:

  phase 1 "assistant"  a fresh assistant (the student's config with `takd.assistant` overrides, seeded random init)
                       learns from the recipe's teacher: the `distill` section's loss, T and alpha, train.steps steps,
                       in <run>/assistant/ (metrics.jsonl, checkpoints/)
  phase 2 "student"    the recipe's student learns from the trained assistant the same way, train.steps steps, in the
                       run directory itself; it is the deliverable (saved, evaluated, exported)

Both phases are THE training loop with `offline`'s loss function; the assistant is never saved as the student nor
exported; it is evaluated as the row "assistant (takd)" beside the student. One vocabulary throughout (the assistant
is built from the student's config, so it has the student's). `distil advise` (distil/eval/capacity.py) compares the
chain with direct distillation for several teachers.

On `--resume` a finished assistant phase reloads its final checkpoint and runs no step (the loop's phase resume), so
the student phase continues from the same assistant.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from distil.errors import DistilError
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.offline import build_offline
from distil.options import option


@dataclass
class TakdSpec:
    """Teacher-assistant chain (TAKD): teacher -> assistant of intermediate size -> student."""

    assistant: dict[str, Any] = option(
        help="The assistant's architecture: overrides of the student's model config (e.g. {num_hidden_layers: 2, "
             "hidden_size: 64}); a seeded random init trained from the teacher for train.steps steps.",
        factory=dict)


def build_assistant(student: torch.nn.Module, overrides: dict, seed: int) -> torch.nn.Module:
    """A seeded random init of the student's config with `overrides`, on the student's device, fp32, trainable."""
    from transformers import AutoModelForCausalLM

    from distil.models import _apply_config_overrides

    config = copy.deepcopy(student.config)
    try:
        _apply_config_overrides(config, overrides, "takd.assistant")
    except DistilError as exc:  # its message says '<where>.config.<key>': the key is takd.assistant.<key> here
        raise DistilError(str(exc).replace("takd.assistant.config.", "takd.assistant.", 1)) from None
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:  # e.g. hidden_size not divisible by num_attention_heads
        raise DistilError(f"takd.assistant: cannot build a model from these overrides "
                          f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    finally:
        torch.random.set_rng_state(state)
    first = next(student.parameters())
    return model.to(device=first.device, dtype=torch.float32).train()


def stage(ctx: Context) -> Stage:
    spec = ctx.recipe.takd
    assistant = build_assistant(ctx.student.model, spec.assistant, ctx.recipe.seed + 1)

    def phases():
        teacher = ctx.teacher().model
        yield Phase(name="assistant", module=Trainable(assistant),
                    loss_fn=build_offline(teacher, ctx.recipe.distill, ctx.vocab, echo=ctx.echo),
                    examples=ctx.train_examples, subdir="assistant")
        assistant.eval()  # trained: the student's teacher (its forward runs under no_grad in the loss)
        for p in assistant.parameters():
            p.requires_grad_(False)
        yield Phase(name="student", module=Trainable(ctx.student.model),
                    loss_fn=build_offline(assistant, ctx.recipe.distill, ctx.vocab, echo=ctx.echo),
                    examples=ctx.train_examples)

    return Stage(phases=phases(), eval_rows=lambda: {"assistant (takd)": assistant})


def check(recipe: Any, where: str) -> None:
    if not recipe.teacher.source:
        raise DistilError(f"{where}: teacher.source: method takd distils a teacher through an assistant: expected a "
                          f"teacher, found none")


METHOD = Method(
    name="takd",
    summary="teacher-assistant chain (TAKD): an assistant of intermediate size learns from the teacher, then the "
            "student from the assistant (both with the distill section's loss); the assistant is an eval row",
    teacher="train",
    build=stage,
    options=TakdSpec,
    check=check,
)
