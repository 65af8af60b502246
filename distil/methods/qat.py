"""Quantization-aware training with distillation (LLM-QAT's recipe): the student's decoder weights are
fake-quantized (int4 group-wise, llama.cpp's Q4_0 grid, or what Q4_K_M stores: `qat.grid: q4_k`; straight-through
estimator; distil/compress/qat.py) and trained against the full-precision teacher's logits with the `distill`
section's loss, as method `offline` trains; then the fake quantization is folded into the weights (the converted
student is what is saved, evaluated and exported). With `student.source: teacher` the teacher is the student's own
full-precision self.

The evaluation gains the row "student (ptq, no training)": the same grid applied to the initial student without
training, the post-training quantization that QAT is meant to beat at the same bits.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import torch

from distil.compress import qat as Q
from distil.compress.sparsity import prunable
from distil.errors import DistilError
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.offline import build_offline


def ptq_copy(model: Any, spec: Any) -> Any:
    """The initial student with its decoder weights rounded to the grid, no training (the PTQ control)."""
    out = copy.deepcopy(model).eval()
    qtypes = Q.grid_types(out, spec)
    with torch.no_grad():
        for name, lin in prunable(out).items():
            lin.weight.copy_(Q.fake(lin.weight, spec, qtypes[name]))
    return out


def stage(ctx: Context) -> Stage:
    spec, model = ctx.recipe.qat, ctx.student.model
    control = ptq_copy(model, spec)
    Q.prepare(model, spec)
    qtypes = Q.grid_types(model, spec)
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(Counter(qtypes.values()).items())) if spec.grid == "q4_k" else ""
    ctx.echo(f"qat: {len(qtypes)} decoder linear maps fake-quantized on the {spec.grid} grid"
             + (f" (groups of {spec.group_size or 'a whole row'})" if spec.grid == "int4" else "")
             + (f" (as Q4_K_M stores them: {kinds})" if kinds else ""))
    loss_fn = build_offline(ctx.teacher().model, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    phase = Phase(name="qat", module=Trainable(model), loss_fn=loss_fn, examples=ctx.train_examples)
    return Stage(phases=[phase], finalize=lambda: Q.convert(model),
                 eval_rows=lambda: {"student (ptq, no training)": control})


def check(recipe: Any, where: str) -> None:
    if recipe.eval.hard_label_baseline:
        raise DistilError(f"{where}: eval.hard_label_baseline: the control would train without fake quantization; "
                          f"expected false with method qat, found true")


METHOD = Method(
    name="qat",
    summary="quantization-aware training: fake-quantized int4 (or Q4_0, or Q4_K_M's grid) decoder weights learn "
            "the full-precision teacher's logits, then the quantization is folded in",
    teacher="train",
    build=stage,
    options=Q.QATSpec,
    check=check,
)
