"""Rotary position embeddings in a GGUF: the base frequency, scaling, and Llama 3's frequency factors.

Hugging Face configs spell rope three ways: ``rope_theta`` + ``rope_scaling`` (transformers 4),
``rope_parameters`` holding both (transformers 5), or, for models that mix attention kinds
(Gemma 3), ``rope_parameters`` keyed by layer type (``full_attention`` / ``sliding_attention``).
``read_rope`` turns one of those into a ``Rope``; the GGUF then carries ``rope.freq_base`` and, per
scaling type:

* ``linear`` (positions divided by ``factor``): ``rope.scaling.type = linear`` and the factor;
* ``llama3`` (Llama 3.1 / 3.2): no key, but a ``rope_freqs.weight`` tensor of ``head_dim / 2``
  float32 *divisors* of the rotary frequencies, which llama.cpp's rope applies per dimension pair
  (theta_i = pos * base^(-2i/d) / rope_freqs[i]). ``llama3_factors`` computes them from the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distil.errors import DistilError


@dataclass(frozen=True)
class Rope:
    theta: float
    type: str = "default"  # "default", "linear" or "llama3"
    factor: float | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_context: int = 8192


def positive_number(d: dict, key: str, path: Path, where: str, default=None) -> float:
    """d[key] (or `default` when absent or null) as a float, or one line naming the file and key."""
    value = d.get(key)
    value = default if value is None else value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
    if not ok:
        raise DistilError(f"{path}: {where}{key}: expected a positive number, found "
                          f"{'no such key' if key not in d and default is None else repr(value)}")
    return float(value)


def read_rope(params: dict | None, path: Path, *, default_theta: float, allowed: tuple[str, ...],
              where: str = "rope_scaling.") -> Rope:
    """A ``Rope`` from one rope parameter object (``rope_parameters`` / ``rope_scaling``, or None).

    ``default_theta`` is the base when the object has no ``rope_theta`` (the top-level key of older
    configs, or the family's default); ``allowed`` lists the scaling types the target architecture
    takes in llama.cpp.
    """
    params = params or {}
    if not isinstance(params, dict):
        raise DistilError(f"{path}: {where.rstrip('.')}: expected an object or null, found {params!r}")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in allowed:
        raise DistilError(f"{path}: rope scaling {kind!r} is not supported by the exporter for this "
                          f"architecture (supported: {', '.join(allowed)})")
    theta = positive_number(params, "rope_theta", path, where, default_theta)
    if kind == "default":
        return Rope(theta)
    factor = positive_number(params, "factor", path, where)
    if kind == "linear":
        return Rope(theta, "linear", factor)
    low = positive_number(params, "low_freq_factor", path, where)
    high = positive_number(params, "high_freq_factor", path, where)
    ctx = positive_number(params, "original_max_position_embeddings", path, where)
    if high <= low:
        raise DistilError(f"{path}: {where}high_freq_factor: expected more than low_freq_factor={low}, "
                          f"found {high}")
    return Rope(theta, "llama3", factor, low, high, int(ctx))


def llama3_factors(rope: Rope, head_dim: int) -> np.ndarray:
    """Llama 3's per-pair frequency divisors (float32, ``head_dim // 2`` of them).

    Pair i rotates at f_i = base^(-2i/d), wavelength 2*pi/f_i. Against the original context L:
    wavelengths shorter than L/high_freq_factor keep their frequency (divisor 1), longer than
    L/low_freq_factor are slowed by ``factor``, and in between the frequency is a blend
    f' = (1 - s) f / factor + s f with s = (L/wavelength - low) / (high - low), i.e. the divisor
    f / f' = 1 / ((1 - s) / factor + s). Computed in float64, stored as float32.
    """
    freqs = rope.theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < rope.original_context / rope.high_freq_factor:
            out.append(1.0)
        elif wavelen > rope.original_context / rope.low_freq_factor:
            out.append(rope.factor)
        else:
            s = (rope.original_context / wavelen - rope.low_freq_factor) / \
                (rope.high_freq_factor - rope.low_freq_factor)
            out.append(1.0 / ((1 - s) / rope.factor + s))
    return np.array(out, dtype=np.float32)


def add_rope_metadata(writer, rope: Rope) -> None:
    """rope.freq_base and the scaling keys (llama3 scaling is a tensor, see ``llama3_factors``)."""
    writer.add_rope_freq_base(rope.theta)
    if rope.type == "linear":
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
