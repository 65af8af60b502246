"""Structured pruning, then distillation to recover (Minitron's recipe): the student (usually `student.source:
teacher`) is pruned in depth (Block Influence) and/or width (MLP neurons, attention heads / KV groups, hidden
channels) on calibration data (the first training examples), physically sliced into a smaller model
(distil/compress/prune.py), and that model is trained against the frozen teacher's logits with the `distill`
section's loss, as method `offline` trains.

The pruning is deterministic (the same student and data give the same model), so `--resume` rebuilds the same
pruned model and continues its checkpoints. The evaluation gains the row "student (pruned, no recovery)": the
pruned model before any recovery step; "student (before)" is the unpruned student. `<run>/prune.json` holds what
was removed and the scores that chose it. The pruning runs in `prepare`, before the run directory is written, so
counts the model cannot take leave nothing behind.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from distil.atomic import write_atomic
from distil.compress.calibration import calibration_batches
from distil.compress.prune import PruneSpec, prune
from distil.errors import DistilError
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.offline import build_offline


def prune_student(recipe: Any, model: Any, train_examples: list[dict], pad_id: int) -> tuple[Any, Any]:
    """The recipe's `prune` section applied to `model` with its training examples as calibration data."""
    spec = recipe.prune
    batches = calibration_batches(train_examples, spec.calib_examples, spec.calib_batch, pad_id,
                                  "prune.calib_examples")
    return prune(model, spec, batches)


def prepare(ctx: Context) -> tuple[Any, Any]:
    """Prune before the run directory is written: counts the model cannot take (heads that do not split into its
    KV groups, more layers than it has) are refused with nothing written."""
    return prune_student(ctx.recipe, ctx.student.model, ctx.train_examples, ctx.pad_id)


def stage(ctx: Context) -> Stage:
    pruned, report = ctx.artifact
    ctx.echo(report.summary())
    if ctx.main:
        write_atomic(ctx.run_dir / "prune.json", json.dumps(report.to_dict(), indent=2))
    ctx.student.model = pruned  # the student is the pruned model from here on (saved, evaluated, exported)
    before = copy.deepcopy(pruned).eval()
    loss_fn = build_offline(ctx.teacher().model, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    return Stage(phases=[Phase(name="prune", module=Trainable(pruned), loss_fn=loss_fn, examples=ctx.train_examples)],
                 finalize=lambda: pruned, eval_rows=lambda: {"student (pruned, no recovery)": before})


def check(recipe: Any, where: str) -> None:
    spec = recipe.prune
    if not (spec.depth or spec.mlp or spec.hidden or spec.heads or spec.kv_heads):
        raise DistilError(f"{where}: prune: expected something to prune (prune.depth, prune.mlp, prune.hidden, "
                          f"prune.heads or prune.kv_heads), found all unset")
    if recipe.eval.hard_label_baseline:
        raise DistilError(f"{where}: eval.hard_label_baseline: the control would train the unpruned student; "
                          f"expected false with method prune, found true")
    if spec.heads and spec.kv_heads and spec.heads % spec.kv_heads:
        raise DistilError(f"{where}: prune.heads: expected a multiple of prune.kv_heads ({spec.kv_heads}): every KV "
                          f"group keeps the same number of query heads, found {spec.heads}")


METHOD = Method(
    name="prune",
    summary="structured pruning (layers by Block Influence; MLP neurons, attention heads and hidden channels by "
            "activation importance), then the teacher's logits recover the sliced student",
    teacher="train",
    build=stage,
    prepare=prepare,
    options=PruneSpec,
    check=check,
)


def prune_to_dir(recipe: Any, out: str, overwrite: bool = False, echo: Any = print) -> Any:
    """`distil prune`: the recipe's student pruned by its `prune` section (calibrated on its training data) and
    saved as a Hugging Face directory (+ prune.json); no training. Returns the report."""
    from pathlib import Path

    from distil import data as data_mod
    from distil.models import Loaded, load_student, load_teacher, save_student

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise DistilError(f"{target}: --out: expected a new or empty directory, found one with files "
                          f"(pass --overwrite to replace it)")
    spec = recipe.prune
    if not (spec.depth or spec.mlp or spec.hidden or spec.heads or spec.kv_heads):
        raise DistilError("prune: expected something to prune (prune.depth, prune.mlp, prune.hidden, prune.heads "
                          "or prune.kv_heads), found all unset")
    teacher = load_teacher(recipe) if recipe.student.source == "teacher" else None
    student = load_student(recipe, teacher)
    del teacher
    train_examples, _ = data_mod.load_examples(recipe.data, student.tokenizer, recipe.seed)
    pruned, report = prune_student(recipe, student.model, train_examples, data_mod.pad_id(student.tokenizer))
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not target.is_dir():
        target.unlink()
    save_student(Loaded(pruned, student.tokenizer, student.source, student.path), target)
    write_atomic(target / "prune.json", json.dumps(report.to_dict(), indent=2))
    echo(report.summary())
    return report
