"""Weight-only post-training quantization (int8 or int4 group-wise; distil/compress/quantize.py): no training
phase, the deliverable is the quantized student. The evaluation shows what the rounding costs: "student (before)"
(full precision) beside "student (ptq)" (KL to the teacher, perplexity, top-1 agreement); with `student.source:
teacher` the teacher is the full-precision model itself, so the KL column is the quality loss.

The saved student holds the dequantized weights (fp32 values on the quantization grid: what any tool can load
and export). When torchao works here, its quantized model (real integer tensors) is evaluated too, as the row
"student (ptq, torchao)"; when it does not, the fallback says so once.
"""

from __future__ import annotations

import copy
from typing import Any

from distil.compress.quantize import QuantConfig, quantize_
from distil.errors import DistilError
from distil.methods.contract import Context, Method, Stage


def stage(ctx: Context) -> Stage:
    spec = ctx.recipe.ptq
    model = ctx.student.model.eval()
    rows: dict[str, Any] = {}
    if spec.backend != "fake":
        ao = copy.deepcopy(model)
        if quantize_(ao, spec, echo=ctx.echo) == "torchao":
            rows["student (ptq, torchao)"] = ao
    fake = copy.deepcopy(model)
    quantize_(fake, QuantConfig(bits=spec.bits, group_size=spec.group_size, backend="fake"), echo=ctx.echo)
    ctx.echo(f"ptq: int{spec.bits} weights, " + (f"groups of {spec.group_size}" if spec.group_size else
                                                  "one scale per output channel"))
    return Stage(phases=[], finalize=lambda: fake, eval_rows=lambda: rows)


def check(recipe: Any, where: str) -> None:
    if recipe.eval.hard_label_baseline:
        raise DistilError(f"{where}: eval.hard_label_baseline: post-training quantization trains nothing; expected "
                          f"false with method ptq, found true")


METHOD = Method(
    name="ptq",
    summary="weight-only post-training quantization (int8 / int4 group-wise; torchao where it works, else a plain "
            "fake-quant fallback), no training; the eval shows the quality lost",
    teacher="none",
    build=stage,
    options=QuantConfig,
    check=check,
)
