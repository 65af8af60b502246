"""Self-distillation: Born-Again Networks (Furlanello et al. 2018).

k generations of students of ONE architecture, trained one after the other: generation 1 learns from the
recipe's teacher, generation g+1 is a fresh student of the same architecture that learns from generation g's soft
targets (the `distill` section's loss, T and alpha, so the labels are mixed in as in offline KD), each for
`train.steps` steps in its own sub-directory (gen-<g>/: metrics.jsonl, checkpoints/). The last generation is the
student that is saved, evaluated as "student (born_again)" and exported.

`Stage.phases` is a generator: generation g+1 is made after generation g is trained. On `--resume` every finished
generation reloads its final checkpoint and runs no step, the interrupted one continues from its newest
checkpoint, so the same generations are rebuilt.

Evaluation: a row per generation ("student (gen 1)" ...) and, with `ensemble`, "student (ensemble)": the mean of
every generation's next-token probabilities (BAN's ensemble of generations).

"Fresh" for a language model: with `init: initial` (default) each generation starts from the student's initial
weights as the recipe builds them (e.g. the depth-pruned copy of the teacher), the start generation 1 had; with
`init: random` from a seeded random initialisation of the architecture (the paper's, which needs far more
steps than a recipe's budget).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from distil.errors import DistilError
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.offline import build_offline
from distil.models import random_like
from distil.options import option


@dataclass
class BornAgainSpec:
    """Self-distillation: Born-Again generations of one architecture, each taught by the previous one."""

    generations: int = option(2, "Generations: 1 learns from the teacher, each next one (a fresh student of the same "
                                 "architecture) from the previous one's soft targets, train.steps steps each.", ge=1)
    ensemble: bool = option(True, "Add the evaluation row 'student (ensemble)': the mean of every generation's "
                                  "next-token probabilities.")
    init: Literal["initial", "random"] = option(
        "initial", "How generations 2.. start: 'initial' = the student's initial weights as the recipe builds them "
                   "(the start of generation 1); 'random' = a seeded random initialisation of the architecture.")


class Ensemble(nn.Module):
    """The mean of the members' probabilities: forward returns log(mean_k softmax(z_k)) as logits (a softmax of
    them gives the mixture back), in the members' output type (a tensor, or an output with .logits)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        from distil.api import logits_of

        mix, first = None, None
        for m in self.members:
            out = m(*args, **kwargs)
            first = out if first is None else first
            z = logits_of(out)
            logp = torch.log_softmax(z if z.dtype in (torch.float32, torch.float64) else z.float(), dim=-1)
            mix = logp if mix is None else torch.logaddexp(mix, logp)
        mix = mix - math.log(len(self.members))
        if isinstance(first, torch.Tensor):
            return mix
        try:
            return type(first)(logits=mix)  # a Hugging Face ModelOutput
        except TypeError:
            from types import SimpleNamespace

            return SimpleNamespace(logits=mix)


def fresh_student(initial: nn.Module, init: str, seed: int) -> nn.Module:
    """A new generation's start: a copy of the initial student, or a seeded random initialisation of its
    architecture with the same trainable parameters."""
    if init == "initial":
        return copy.deepcopy(initial)
    return random_like(initial, seed)


def stage(ctx: Context) -> Stage:
    spec = ctx.recipe.born_again
    initial = copy.deepcopy(ctx.student.model)  # every generation's start (before generation 1 trains)
    generations: list[nn.Module] = []

    def phases():
        teacher = ctx.teacher().model
        for g in range(1, spec.generations + 1):
            model = ctx.student.model if g == 1 else fresh_student(initial, spec.init, ctx.recipe.seed + g)
            generations.append(model)
            loss_fn = build_offline(teacher, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
            yield Phase(name=f"gen-{g}", module=Trainable(model), loss_fn=loss_fn, examples=ctx.train_examples,
                        subdir=f"gen-{g}")
            teacher = model.eval()  # trained: the next generation's teacher (its forward runs under no_grad)

    def rows() -> dict[str, nn.Module]:
        out: dict[str, nn.Module] = {f"student (gen {g})": m for g, m in enumerate(generations, start=1)}
        if spec.ensemble and len(generations) > 1:
            out["student (ensemble)"] = Ensemble(generations)
        return out

    return Stage(phases=phases(), finalize=lambda: generations[-1], eval_rows=rows)


def check(recipe: Any, where: str) -> None:
    spec = recipe.born_again
    if spec.ensemble and spec.generations > 1 and recipe.eval.enabled and (recipe.eval.answers or recipe.eval.task):
        raise DistilError(f"{where}: born_again.ensemble: the ensemble row cannot generate answers: expected "
                          f"eval.answers: 0 and no eval.task with it, or born_again.ensemble: false")


METHOD = Method(
    name="born_again",
    summary="self-distillation (Born-Again Networks): generations of one architecture, each a fresh student "
            "taught by the previous generation's soft targets; a row per generation and their ensemble",
    teacher="train",
    build=stage,
    options=BornAgainSpec,
    check=check,
)
