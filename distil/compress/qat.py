"""Quantization-aware training (QAT): the decoder linear maps compute with fake-quantized weights while the
student trains, so it learns weights that survive the rounding; then the fake quantization is folded in.

Each decoder linear map gets a parametrization (torch.nn.utils.parametrize): its forward weight is
w_hat = Q(w), the master weight w stays fp32 and receives the gradient through the straight-through estimator
(dQ/dw := 1; Bengio et al. 2013, as LLM-QAT and torchao's QAT do). Grids Q:
  int4   symmetric group-wise int4 (compress/quantize.py: s = max|w| / 7.5 per group, q in [-8, 7]): torchao's
         weight-only int4 scheme
  q4_0   llama.cpp's Q4_0 (blocks of 32 along a row: d = m / -8 with m the block's value of largest magnitude,
         stored as fp16; q = min(15, floor(w / d + 8.5)); w_hat = (q - 8) * fp16(d)). Q4_0 of w_hat gives w_hat
         back exactly, so a Q4_0 GGUF of the converted student holds exactly the weights it was trained with
`convert(model)` removes the parametrizations, leaving w_hat as the plain fp32 weights: the converted model
computes exactly what the fake-quantized one computed (tested), saves, reloads and exports like any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.utils import parametrize

from distil.compress.quantize import _groups, fake_quantize
from distil.compress.sparsity import prunable
from distil.errors import DistilError
from distil.options import option


@dataclass
class QATSpec:
    """Quantization-aware training: fake-quantized decoder weights learn the teacher, then are folded in.

    The straight-through estimator passes gradients to the fp32 master weights."""

    grid: Literal["int4", "q4_0"] = option("int4", "int4: symmetric group-wise int4 (torchao's weight-only "
                                           "scheme); q4_0: llama.cpp's Q4_0 blocks (the GGUF export with "
                                           "export.quant: Q4_0 is then exact for the decoder weights).")
    group_size: int = option(32, "int4 grid: weights per scale along a row (0 = per output channel); q4_0 "
                             "always uses 32.", ge=0)


def q4_0_fake(w: torch.Tensor) -> torch.Tensor:
    """ggml's Q4_0 quantize -> dequantize, block by block (32 consecutive weights of a row), in float32."""
    x = _groups(w.float(), 32, "qat.grid q4_0")
    idx = x.abs().argmax(-1, keepdim=True)  # the first element of largest magnitude, sign kept
    m = torch.gather(x, -1, idx)
    d = m / -8.0
    inv = torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))
    q = torch.clamp(torch.floor(x * inv + 8.5), max=15.0)
    d16 = d.half().float()  # the scale GGUF stores
    return ((q - 8.0) * d16).reshape(w.shape).to(w.dtype)


def fake(w: torch.Tensor, spec: Any) -> torch.Tensor:
    return q4_0_fake(w) if spec.grid == "q4_0" else fake_quantize(w, 4, spec.group_size)


class FakeQuant(torch.nn.Module):
    """The parametrization: forward sees Q(w), backward passes the gradient straight through to w."""

    def __init__(self, spec: Any):
        super().__init__()
        self.grid, self.group_size = spec.grid, spec.group_size

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake(w.detach(), self) - w.detach())


def prepare(model: Any, spec: Any) -> Any:
    """Fake-quantize the decoder linear maps of `model` (in place; returns it)."""
    for name, lin in prunable(model).items():
        g = 32 if spec.grid == "q4_0" else (spec.group_size or lin.in_features)
        if lin.in_features % g:
            raise DistilError(f"qat.group_size: {g} must divide the rows of {name} ({lin.in_features} weights)")
        parametrize.register_parametrization(lin, "weight", FakeQuant(spec))
    return model


def convert(model: Any) -> Any:
    """Fold the fake quantization in: every parametrized weight becomes its w_hat, a plain parameter."""
    for lin in prunable(model).values():
        if parametrize.is_parametrized(lin, "weight"):
            with torch.no_grad():
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=True)
    return model


def is_prepared(model: Any) -> bool:
    return any(parametrize.is_parametrized(lin, "weight") for lin in prunable(model).values())
