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
  q4_k   what a Q4_K_M export stores for each matrix (compress/kgrid.py: Q4_K super-blocks of 256 with 6-bit
         scales and mins, Q6_K for the attn_v / ffn_down layers Q4_K_M favours, Q5_0 where rows are not a multiple
         of 256), computed through the exporter's own quantizer, so the trained weights land where Q4_K_M puts them
`convert(model)` removes the parametrizations, leaving w_hat as the plain fp32 weights: the converted model
computes exactly what the fake-quantized one computed (tested), saves, reloads and exports like any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.nn.utils import parametrize

from distil.compress import kgrid
from distil.compress.quantize import _groups, fake_quantize
from distil.compress.sparsity import prunable
from distil.errors import DistilError
from distil.options import option


@dataclass
class QATSpec:
    """Quantization-aware training: fake-quantized decoder weights learn the teacher, then are folded in.

    The straight-through estimator passes gradients to the fp32 master weights."""

    grid: Literal["int4", "q4_0", "q4_k"] = option(
        "int4", "int4: symmetric group-wise int4 (torchao's weight-only scheme); q4_0: llama.cpp's Q4_0 blocks (the "
        "GGUF export with export.quant: Q4_0 is then exact for the decoder weights); q4_k: the type a Q4_K_M export "
        "gives each matrix (Q4_K super-blocks with 6-bit scales and mins; Q6_K / Q5_0 where Q4_K_M uses them).")
    group_size: int = option(32, "int4 grid: weights per scale along a row (0 = per output channel); q4_0 "
                             "always uses 32; q4_k follows Q4_K_M.", ge=0)


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


def fake(w: torch.Tensor, spec: Any, qtype: str | None = None) -> torch.Tensor:
    """Q(w) on the spec's grid; `qtype` is the GGML type of this matrix for the q4_k grid (`grid_types`)."""
    if spec.grid == "q4_k":
        return kgrid.on_grid(w, qtype)
    return q4_0_fake(w) if spec.grid == "q4_0" else fake_quantize(w, 4, spec.group_size)


def grid_types(model: Any, spec: Any) -> dict[str, str | None]:
    """{decoder linear name: its GGML type} on the q4_k grid (what Q4_K_M gives it), None on the other grids."""
    linears = prunable(model)
    if spec.grid != "q4_k":
        return dict.fromkeys(linears)
    return kgrid.types(linears, model.config.num_hidden_layers)


class FakeQuant(torch.nn.Module):
    """The parametrization: forward sees Q(w), backward passes the gradient straight through to w. Q(w) is kept
    until w changes (its version counter moves at every in-place optimizer update), so the quantization runs once
    per step, not once per micro-batch and eval forward."""

    def __init__(self, spec: Any, qtype: str | None = None):
        super().__init__()
        self.grid, self.group_size, self.qtype = spec.grid, spec.group_size, qtype
        self._key: tuple | None = None
        self._w_hat: torch.Tensor | None = None

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        key = (w.data_ptr(), w._version, w.dtype, w.shape)
        if key != self._key:
            self._w_hat, self._key = fake(w.detach(), self, self.qtype), key
        # w_hat + (w - w): the forward value is w_hat exactly (w - w is exactly 0; w + (w_hat - w) would round),
        # the gradient reaches w unchanged
        return self._w_hat + (w - w.detach())


def prepare(model: Any, spec: Any) -> Any:
    """Fake-quantize the decoder linear maps of `model` (in place; returns it)."""
    qtypes = grid_types(model, spec)
    for name, lin in prunable(model).items():
        if spec.grid != "q4_k":
            g = 32 if spec.grid == "q4_0" else (spec.group_size or lin.in_features)
            if lin.in_features % g:
                raise DistilError(f"qat.group_size: {g} must divide the rows of {name} ({lin.in_features} weights)")
        parametrize.register_parametrization(lin, "weight", FakeQuant(spec, qtypes[name]))
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
