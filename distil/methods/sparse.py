"""Unstructured pruning (magnitude or Wanda; unstructured or N:M such as 2:4), then distillation recovers the
sparse student with its masks enforced (distil/compress/sparsity.py).

The masks are computed once on the student (Wanda: input-feature norms on calibration data, the first training
examples), applied, and applied again after every optimizer step through the phase's `after_step` hook: the
pruned weights are exactly zero at every step's end, in every checkpoint and in the saved student. The training
is method `offline`'s (the teacher's logits, the `distill` section's loss). `<run>/sparsity.json` holds the
achieved sparsity of every linear map, after pruning and after training; the evaluation gains the row
"student (sparse, no recovery)": the pruned student before any recovery step.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from distil.atomic import write_atomic
from distil.compress.calibration import calibration_batches
from distil.compress.sparsity import Masks, SparseSpec, compute_masks, format_report, parse_pattern, sparsity_report
from distil.errors import DistilError
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.offline import build_offline


def prepare(ctx: Context) -> dict:
    """The masks (not applied yet: the pipeline copies the dense student for the "before" row after this),
    computed before the run directory is written, so a pattern a layer cannot take leaves nothing behind."""
    spec = ctx.recipe.sparse
    batches = (calibration_batches(ctx.train_examples, spec.calib_examples, spec.calib_batch, ctx.pad_id,
                                   "sparse.calib_examples") if spec.score == "wanda" else None)
    return compute_masks(ctx.student.model, spec, batches)


def stage(ctx: Context) -> Stage:
    spec, model = ctx.recipe.sparse, ctx.student.model
    masks = Masks(model, ctx.artifact)
    masks.apply()
    pruned = sparsity_report(model)
    ctx.echo(f"{spec.score} {spec.pattern}: " + format_report(pruned, model.config.num_hidden_layers))
    before = copy.deepcopy(model).eval()

    def finalize() -> Any:
        masks.apply()
        trained = sparsity_report(model)
        ctx.echo("after training, " + format_report(trained, model.config.num_hidden_layers))
        if ctx.main:
            write_atomic(ctx.run_dir / "sparsity.json",
                         json.dumps({"score": spec.score, "pattern": spec.pattern, "pruned": pruned,
                                     "trained": trained}, indent=2))
        return model

    loss_fn = build_offline(ctx.teacher().model, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    phase = Phase(name="sparse", module=Trainable(model), loss_fn=loss_fn, examples=ctx.train_examples,
                  after_step=masks.after_step)
    return Stage(phases=[phase], finalize=finalize, eval_rows=lambda: {"student (sparse, no recovery)": before})


def check(recipe: Any, where: str) -> None:
    parse_pattern(recipe.sparse.pattern, f"{where}: sparse.pattern")
    if recipe.eval.hard_label_baseline:
        raise DistilError(f"{where}: eval.hard_label_baseline: the control would train the dense student without "
                          f"masks; expected false with method sparse, found true")


METHOD = Method(
    name="sparse",
    summary="unstructured pruning (magnitude or Wanda, or N:M such as 2:4), then the teacher's logits recover the "
            "student with its masks enforced after every step",
    teacher="train",
    build=stage,
    prepare=prepare,
    options=SparseSpec,
    check=check,
)
