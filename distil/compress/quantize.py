"""Weight-only post-training quantization of the PyTorch model: int8 or int4, per output channel or group-wise.

The scheme is symmetric (zero point 0), torchao's choice for weight-only int4/int8: for each group g of
`group_size` consecutive weights of a row (the whole row when group_size is 0),
    s_g = max|w| over g / ((q_max - q_min) / 2)        (int4: q in [-8, 7], s = max|w| / 7.5; int8: / 127.5)
    q   = clamp(round(w / s_g), q_min, q_max),   w_hat = q * s_g.
`quantize_(model, QuantConfig(...))` quantizes the decoder layers' linear maps in place (embeddings, the output head
and norms stay in full precision, as llama.cpp's Q4_K_M keeps its head at a higher precision too) through one of
  torchao   torchao's `quantize_` (Int8WeightOnlyConfig; IntxWeightOnlyConfig(int4, PerGroup) for int4, which runs
            on CPU; torchao 0.18's Int4WeightOnlyConfig needs a CUDA-only kernel package): real integer tensors
  fake      the fallback: the weights replaced by w_hat (fp32 values on the quantization grid): same numbers, no
            int kernels, and a model every distil tool (save, export, eval) takes as it is
`backend: auto` takes torchao when it imports and works here, else falls back and says so once.
`dequantize_(model)` turns torchao's tensors back into fp32 w_hat (saving, exporting).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from distil.compress.sparsity import prunable
from distil.errors import DistilError
from distil.options import option

_NOTED: set[str] = set()


@dataclass
class QuantConfig:
    """Weight-only post-training quantization of the decoder linear maps (int8, or int4 group-wise)."""

    bits: Literal[4, 8] = option(4, "Bits per weight: 4 (int4) or 8 (int8).")
    group_size: int = option(32, "Weights per scale along a row (0 = one scale per output channel).", ge=0)
    backend: Literal["auto", "torchao", "fake"] = option(
        "auto", "auto: torchao when it works here, else the plain fake-quant fallback (said once); torchao: "
        "required; fake: always the fallback (fp32 weights on the quantization grid).")


def qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _groups(w: torch.Tensor, group_size: int, where: str = "quantize") -> torch.Tensor:
    rows, cols = w.shape
    g = group_size or cols
    if cols % g:
        raise DistilError(f"{where}: group_size {g} must divide every row; found a [{rows} x {cols}] matrix")
    return w.reshape(rows, cols // g, g)


def scales(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """[rows, groups, 1] symmetric scales max|w| / ((q_max - q_min) / 2), never 0."""
    q_min, q_max = qrange(bits)
    amax = _groups(w, group_size).abs().amax(-1, keepdim=True)
    return (amax / ((q_max - q_min) / 2)).clamp(min=torch.finfo(torch.float32).eps)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """w_hat = clamp(round(w / s), q_min, q_max) * s, group-wise; differentiable only through the caller's STE."""
    q_min, q_max = qrange(bits)
    s = scales(w, bits, group_size)
    q = torch.clamp(torch.round(_groups(w, group_size) / s), q_min, q_max)
    return (q * s).reshape(w.shape)


def fake_quantize_ste(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The straight-through estimator: the forward sees w_hat, the backward passes the gradient to w unchanged
    (d w_hat / d w := 1; the scale is recomputed from w at every step)."""
    return w + (fake_quantize(w.detach(), bits, group_size) - w.detach())


def torchao_config(config: Any) -> Any:
    """torchao's config object for ours (ImportError when torchao is missing)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    granularity = PerGroup(config.group_size) if config.group_size else PerAxis(0)
    if config.bits == 8 and not config.group_size:
        return Int8WeightOnlyConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4 if config.bits == 4 else torch.int8,
                                granularity=granularity)


def _note_once(text: str, echo: Any) -> None:
    if text not in _NOTED:
        _NOTED.add(text)
        echo(text)


def quantize_(model: Any, config: Any, echo: Any = print) -> str:
    """Quantize the decoder linear maps of `model` in place; returns the backend that did it ('torchao'/'fake')."""
    layers = prunable(model)
    for name, lin in layers.items():
        _groups(lin.weight, config.group_size, f"quantize.group_size ({name})")  # refuse before changing anything
    if config.backend in ("auto", "torchao"):
        try:
            import logging
            import warnings

            # torchao's import logs every CUDA-only extension it cannot load, and torch warns about its enums
            logging.disable(logging.WARNING)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    from torchao.quantization import quantize_ as ao_quantize_
            finally:
                logging.disable(logging.NOTSET)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ao_config = torchao_config(config)
                names = set(layers)
                ao_quantize_(model, ao_config, filter_fn=lambda module, fqn: fqn in names)
            return "torchao"
        except Exception as exc:  # missing, or failing on this hardware: fall back (auto) or refuse (torchao)
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            if config.backend == "torchao":
                raise DistilError(f"quantize.backend: torchao: expected it to quantize here, found {reason}; "
                                  f"use backend: auto or fake") from None
            _note_once(f"torchao unavailable here ({reason}); using the plain fake-quant fallback", echo)
    with torch.no_grad():
        for lin in layers.values():
            lin.weight.copy_(fake_quantize(lin.weight.float(), config.bits, config.group_size).to(lin.weight.dtype))
    return "fake"


def dequantize_(model: Any) -> Any:
    """torchao's quantized weights -> plain fp32 parameters holding the same values (w_hat); fake-quantized
    weights are plain already. In place; returns the model."""
    for lin in prunable(model).values():
        w = lin.weight
        if hasattr(w, "dequantize") and type(w) is not torch.nn.Parameter and type(w) is not torch.Tensor:
            lin.weight = torch.nn.Parameter(w.dequantize().float().detach().clone(), requires_grad=False)
    return model
