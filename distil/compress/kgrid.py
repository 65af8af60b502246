"""llama.cpp's Q4_K_M grid as a fake quantizer, for QAT (`qat.grid: q4_k`).

A Q4_K_M export does not store every matrix as Q4_K: llama.cpp's `llama_model_quantize` (ported in
`export/kquants.tensor_type`) gives attn_v and ffn_down Q6_K in the first and last eighth of the layers and every
third layer between, and a matrix whose rows are not a multiple of 256 weights falls back to Q5_0 (SmolLM2's 576-wide
hidden: every q/k/v/o/gate/up). So each decoder linear map is fake-quantized to the type Q4_K_M will give it:

  Q4_K   super-blocks of 256 weights (8 sub-blocks of 32), per sub-block a 6-bit scale and a 6-bit min found by
         llama.cpp's weighted least-squares search, both scaled by the super-block's fp16 d and dmin:
         w_hat = d * sc_j * q - dmin * m_j, q in 0..15
  Q6_K   16 sub-blocks of 16, int8 scales times fp16 d: w_hat = d * sc_j * (q - 32), q in 0..63
  Q5_0 / Q8_0 / F16   the fallbacks, as ggml stores them

Q(w) = dequantize(quantize(w)) through the exporter's own byte path (`export/tensors.quantize_tensor`: kquants.py
for the k-quants, byte-identical to llama.cpp; gguf-py for the 32-blocks), decoded by gguf-py. The k-quant search is
not a closed form, so this runs in numpy on the detached weights; QAT trains with `on_grid` (Q, made a fixed point
of Q where re-quantizing would move a super-block, so the export stores exactly the trained weights), and
`qat.FakeQuant` caches it until the optimizer changes w (one quantization per step, not per micro-batch).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from distil.export.kquants import tensor_type

# HF linear map -> the GGUF tensor kind that tensor_type's rules look at
_GGUF_KIND = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(name: str) -> str:
    """'model.layers.3.self_attn.v_proj' -> 'blk.3.attn_v.weight'."""
    m = re.search(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$", name)
    if not m:
        raise ValueError(f"not a decoder linear map: {name}")
    return f"blk.{m.group(1)}.{_GGUF_KIND[m.group(2)]}.weight"


def q4_k_m_type(name: str, shape: tuple[int, int], n_layer: int) -> str:
    """The GGML type a Q4_K_M export gives the decoder linear map `name` of weight shape (out, in)."""
    return tensor_type(gguf_name(name), tuple(shape), "Q4_K_M", n_layer, tied=False)


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 weights GGUF bytes of `qtype` stand for (gguf-py's decoders, as llama.cpp's)."""
    from gguf import GGMLQuantizationType, quants

    if qtype == "F32":
        return raw.reshape(shape)
    if qtype == "F16":
        return raw.astype(np.float32).reshape(shape)
    return quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(shape).astype(np.float32, copy=False)


def fake_quantize(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """w_hat = dequantize(quantize(w)) on the GGML grid `qtype`, as a tensor like w."""
    from distil.export.tensors import quantize_tensor

    x = np.ascontiguousarray(w.detach().float().cpu().numpy())
    out = dequantize(quantize_tensor(x, qtype), qtype, x.shape)
    return torch.from_numpy(out.copy()).to(device=w.device, dtype=w.dtype)


def on_grid(w: torch.Tensor, qtype: str, rounds: int = 4) -> torch.Tensor:
    """The fake quantization QAT trains with: Q(w), then, for the k-quants, Q again on the rows where Q(Q(w)) !=
    Q(w) until nothing moves (at most `rounds` more passes). The k-quant scale/min search is a weighted fit, so
    re-quantizing a dequantized super-block occasionally picks another min (measured: 32 of 65,536 weights of a
    trained tiny model); a fixed point of Q is what a Q4_K_M export stores unchanged."""
    y = fake_quantize(w, qtype)
    if qtype not in ("Q4_K", "Q5_K", "Q6_K"):
        return y
    rows = torch.arange(y.shape[0])
    for _ in range(rounds):
        z = fake_quantize(y[rows], qtype)
        moved = (z != y[rows]).any(1)
        if not bool(moved.any()):
            break
        rows = rows[moved]
        y[rows] = z[moved]
    return y


def types(linears: dict[str, Any], n_layer: int) -> dict[str, str]:
    """{linear name: the GGML type Q4_K_M gives it}."""
    return {name: q4_k_m_type(name, tuple(lin.weight.shape), n_layer) for name, lin in linears.items()}
