"""Q4_K, Q5_K and Q6_K ("k-quants") in vectorised numpy, byte-identical to llama.cpp.

These are ports of ``quantize_row_q{4,5,6}_K_ref`` from ggml-quants.c, the code path
``llama_model_quantize`` takes when no importance matrix is given. Byte identity is the goal, so the
port mirrors the C code's float32 arithmetic operation by operation:

* every sum is accumulated sequentially in float32, in index order, starting from 0 (C does
  ``float s = 0; for (...) s += ...``); ``_seqsum`` does exactly that over the first axis;
* products keep C's association (``w*l*x`` is ``(w*l)*x``), constants are float32;
* ``nearest_int`` is C's "add 1.5*2^23 and read the mantissa" trick. Inside |v| < 2^22 it equals
  round-half-even (``np.rint``); outside it returns the same garbage C does. The hot loop uses
  ``rint`` when a per-block bound proves every value is in range, and the bit trick otherwise.

Data layout: a tensor is cut into sub-blocks of 32 (Q4_K/Q5_K) or 16 (Q6_K) weights and held
*transposed*, shape ``(n, n_subblocks)``, so element ``i`` of every sub-block is one contiguous
row: a sequential sum over ``i`` is ``n`` vectorised adds over all sub-blocks at once.

Block layouts (ggml-common.h), 256 weights per super-block:
  Q4_K 144 B: d f16, dmin f16, scales[12] (8 six-bit scales + 8 six-bit mins), qs[128] 4-bit
  Q5_K 176 B: d f16, dmin f16, scales[12], qh[32] (5th bits), qs[128]
  Q6_K 210 B: ql[128] (low 4 bits), qh[64] (high 2 bits), scales[16] int8, d f16
Q4_K/Q5_K dequantize as ``w = d*sc*q - dmin*m``; Q6_K as ``w = d*sc*(q - 32)``.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23
_NI_LIMIT = 4.0e6  # below 2^22 (minus rounding slack) C's nearest_int is round-to-nearest-even
_CHUNK = 256  # super-blocks per vectorised chunk (65k weights): temporaries stay in cache

F32 = np.float32


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """C's ``nearest_int`` bit for bit, including its result for huge, inf and nan inputs."""
    with np.errstate(over="ignore", invalid="ignore"):
        bits = (v.astype(F32, copy=False) + _MAGIC).view(np.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _seqsum_loop(t: np.ndarray) -> np.ndarray:
    """``float s = 0; for i: s += t[i]`` for every column at once (sequential float32 sum)."""
    s = np.zeros(t.shape[1:], F32)
    for row in t:
        s += row
    return s


def _seqsum_reduce(t: np.ndarray) -> np.ndarray:
    # numpy reduces over a non-contiguous axis row by row, in order (pairwise summation is only
    # used along the contiguous axis); "+ 0" turns a sum of -0.0 terms into C's +0.0
    return np.add.reduce(t, axis=0) + F32(0)


def _pick_seqsum():
    """Use the one-call reduction if it reproduces the sequential sum on hard data."""
    rng = np.random.default_rng(0)
    t = (rng.standard_normal((32, 999)) * 10.0 ** rng.integers(-8, 8, (32, 999))).astype(F32)
    t[:, :3] = -0.0
    same = np.array_equal(_seqsum_reduce(t).view(np.int32), _seqsum_loop(t).view(np.int32))
    return _seqsum_reduce if same else _seqsum_loop


_seqsum = _pick_seqsum()


def _sum_from_first(t: np.ndarray) -> np.ndarray:
    """``float s = t[0]; for i >= 1: s += t[i]`` (C's sum_w and sum_x start from the first term)."""
    if _seqsum is _seqsum_reduce:
        return np.add.reduce(t, axis=0)
    s = t[0].copy()
    for row in t[1:]:
        s += row
    return s


def _fp16(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """GGML_FP32_TO_FP16 (round to nearest even): the stored halves and their float32 values."""
    with np.errstate(over="ignore", invalid="ignore"):
        h = v.astype(np.float16)
    return h, h.astype(F32)


# ---------------------------------------------------------------- Q4_K / Q5_K: scale + min search


def _make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep):
    """``make_qkx2_quants`` for every sub-block (column) of ``x``; returns (scale, -min, L).

    Fits ``x ~ scale*L + min`` with integer L in [0, nmax] by weighted least squares, trying
    ``nstep + 1`` inverse scales ``(nmax + rmin + rdelta*is) / (max - min)``. The C code updates
    ``min`` whenever a candidate wins, so later candidates divide by the *new* range: mirrored
    here per column.
    """
    nmax_f = F32(nmax)
    xmax, xmin = x.max(axis=0), x.min(axis=0)
    vmin = np.minimum(xmin, F32(0))  # if (min > 0) min = 0
    with np.errstate(over="ignore", invalid="ignore"):
        sum_w, sum_x = _sum_from_first(w), _sum_from_first(w * x)
    flat = xmax == vmin  # every weight equal: L = 0, scale 0
    v, tmp, wl = np.empty_like(x), np.empty_like(x), np.empty_like(x)

    def levels(iscale, vmin):  # clamp(nearest_int(iscale * (x - min)), 0, nmax) into v
        np.multiply(np.subtract(x, vmin, out=v), iscale, out=v)
        span = np.maximum(np.abs(xmax - vmin), np.abs(xmin - vmin))  # >= |x - min|
        if np.all(np.abs(iscale) * span <= _NI_LIMIT):  # False for nan/inf too
            np.rint(v, out=v)
            np.clip(v, 0, nmax_f, out=v)
        else:
            v[...] = np.clip(_nearest_int(v), 0, nmax)
        return v

    def weighted_error(scale, vmin_, levels_):  # sum w * (scale*L + min - x)^2, C's order
        d = np.subtract(np.add(np.multiply(levels_, scale, out=tmp), vmin_, out=tmp), x, out=tmp)
        return _seqsum(np.multiply(np.multiply(d, d, out=tmp), w, out=tmp))

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / (xmax - vmin)
        scale = F32(1) / iscale
        best = weighted_error(scale, vmin, levels(iscale, vmin))
        # the levels L of the best fit are a function of (iscale, min) when they were made:
        # remember those two per column and rebuild L once at the end
        l_iscale, l_vmin = iscale, vmin

        for step in range(nstep + 1):
            k = F32(rmin) + F32(rdelta) * F32(step) + nmax_f
            iscale = k / (xmax - vmin)
            laux = levels(iscale, vmin)
            np.multiply(w, laux, out=wl)
            sum_l = _seqsum(wl)
            sum_l2 = _seqsum(np.multiply(wl, laux, out=tmp))
            sum_xl = _seqsum(np.multiply(wl, x, out=tmp))
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0  # a positive offset is not allowed: refit the scale alone
            this_min = np.where(pos, F32(0), this_min)
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            err = weighted_error(this_scale, this_min, laux)
            win = (det > 0) & (err < best) & ~flat
            if win.any():
                l_iscale = np.where(win, iscale, l_iscale)
                l_vmin = np.where(win, vmin, l_vmin)
                best = np.where(win, err, best)
                scale = np.where(win, this_scale, scale)
                vmin = np.where(win, this_min, vmin)
        L = levels(l_iscale, l_vmin).copy()

    scale = np.where(flat, F32(0), scale)
    L[:, flat] = 0
    return scale, -vmin, L


def _quantize_qk_min(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Shared part of Q4_K and Q5_K: returns d16, dmin16, packed scales[12] and levels L.

    ``x`` is (nb, 256). Per 32-weight sub-block: importance ``sqrt(mean(x^2)) + |x|``, then the
    scale/min search; scales and mins are then quantized to 6 bits against their maxima
    (d = max_scale/63, dmin = max_min/63) and the weights re-quantized with the final values.
    """
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 8, 32).T)  # (32, sub-blocks)
    with np.errstate(over="ignore", invalid="ignore"):
        av_x = np.sqrt(_seqsum(xs * xs) / F32(32))
    w = av_x + np.abs(xs)
    scales, mins, L = _make_qkx2_quants(xs, w, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)

    # running "if (v > best) best = v" from 0: nan never wins
    max_scale = np.where(scales > 0, scales, F32(0)).max(axis=1)
    max_min = np.where(mins > 0, mins, F32(0)).max(axis=1)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        # uint8_t ls = nearest_int(...): the int wraps modulo 256 before MIN(63, ls)
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63).astype(np.uint8)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63).astype(np.uint8)
        d16, d = _fp16(max_scale / F32(63))
        dmin16, dmin = _fp16(max_min / F32(63))

        # final levels with the 6-bit scales; a sub-block whose scale rounds to 0 keeps the
        # levels found by the search (C: "if (!d) continue;")
        dsub = (d[:, None] * ls.astype(F32)).reshape(-1)  # (sub-blocks,)
        msub = (dmin[:, None] * lm.astype(F32)).reshape(-1)
        q = np.clip(_nearest_int((xs + msub) / dsub), 0, nmax).astype(F32)
    L = np.where(dsub != 0, q, L)

    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    packed[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    levels = L.T.reshape(nb, 256).astype(np.uint8)
    return d16, dmin16, packed, levels


def _q4_k_chunk(x: np.ndarray) -> np.ndarray:
    d16, dmin16, scales, L = _quantize_qk_min(x, 15, -1.0, 0.1, 20)
    Lr = L.reshape(-1, 4, 2, 32)  # 64-weight groups: low nibble = first 32, high = next 32
    qs = (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                           scales, qs], axis=1)


def _q5_k_chunk(x: np.ndarray) -> np.ndarray:
    d16, dmin16, scales, L = _quantize_qk_min(x, 31, -0.5, 0.1, 15)
    Lr = L.reshape(-1, 4, 2, 32)
    qs = ((Lr[:, :, 0] & 0xF) | ((Lr[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = Lr >> 4  # 5th bit; group p of 64 weights uses bits 2p (first 32) and 2p+1 (next 32)
    qh = np.zeros((L.shape[0], 32), np.uint8)
    for p in range(4):
        qh |= (hi[:, p, 0] << (2 * p)) | (hi[:, p, 1] << (2 * p + 1))
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), dmin16.view(np.uint8).reshape(-1, 2),
                           scales, qh, qs], axis=1)


# ---------------------------------------------------------------- Q6_K: symmetric, 16-weight sub-blocks


def _make_qx_quants(x: np.ndarray, nmax: int):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, NULL)`` per column: returns (scale, L).

    Symmetric levels in [-nmax, nmax-1] (stored +nmax), weights x^2; the first guess
    ``-nmax/max`` (max = the value of largest magnitude) is refined by trying 18 perturbed inverse
    scales ``-(nmax + 0.1*is)/max`` and keeping the best weighted least-squares fit.
    """
    idx = np.abs(x).argmax(axis=0)  # first index of the largest |x|, as C's strict ">"
    vmax = np.take_along_axis(x, idx[None, :], axis=0)[0]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    with np.errstate(over="ignore"):  # huge weights overflow to inf in C as well
        w = x * x
        wx = w * x  # C's w*x[i]*l is (w*x)*l: the first product is the same every time
    nmax_f = F32(nmax)
    v, tmp = np.empty_like(x), np.empty_like(x)

    def fit(iscale):  # levels into v; returns (sum w*x*l, sum w*l*l)
        # |iscale * x| <= nmax + 1 by construction, so rint is C's nearest_int here
        np.rint(np.multiply(x, iscale, out=v), out=v)
        np.clip(v, -nmax_f, nmax_f - 1, out=v)
        sumlx = _seqsum(np.multiply(wx, v, out=tmp))
        suml2 = _seqsum(np.multiply(np.multiply(w, v, out=tmp), v, out=tmp))
        return sumlx, suml2

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        l_iscale = -nmax_f / vmax  # levels of the best fit = f(its iscale): rebuilt at the end
        sumlx, suml2 = fit(l_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(nmax_f + F32(0.1) * F32(step)) / vmax
            sumlx, suml2 = fit(iscale)
            win = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            if win.any():
                l_iscale = np.where(win, iscale, l_iscale)
                scale = np.where(win, sumlx / suml2, scale)
                best = np.where(win, scale * sumlx, best)
        fit(l_iscale)
        L = v.copy()
    L[:, zero] = -nmax_f  # all-zero sub-block: C stores L = 0 (i.e. level -nmax)
    return np.where(zero, F32(0), scale), L + nmax_f


def _q6_k_chunk(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    xs = np.ascontiguousarray(x.reshape(nb * 16, 16).T)  # (16, sub-blocks)
    scales, L = _make_qx_quants(xs, 32)
    scales = scales.reshape(nb, 16)

    # scale of largest magnitude, first one on ties (running strict ">" from 0: nan never wins)
    mag = np.abs(scales)
    mag[np.isnan(mag)] = 0
    first = mag.argmax(axis=1)
    max_abs = mag[np.arange(nb), first]
    max_scale = np.where(max_abs > 0, scales[np.arange(nb), first], F32(0))
    empty = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = np.where(empty, F32(1), F32(-128) / max_scale)
        d16, d = _fp16(F32(1) / iscale)
        sc = np.minimum(_nearest_int(iscale[:, None] * scales), 127)
        sc = (sc & 0xFF).astype(np.uint8).view(np.int8)  # stored in an int8_t
        dsub = (d[:, None] * sc.astype(F32)).reshape(-1)
        q = np.clip(_nearest_int(xs / dsub), -32, 31).astype(F32) + F32(32)
    L = np.where(dsub != 0, q, L)

    L = L.T.reshape(nb, 256).astype(np.uint8)
    Lr = L.reshape(nb, 2, 4, 32)  # two halves of 128; four rows of 32 in each
    ql = np.concatenate([(Lr[:, :, 0] & 0xF) | ((Lr[:, :, 2] & 0xF) << 4),
                         (Lr[:, :, 1] & 0xF) | ((Lr[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((Lr[:, :, 0] >> 4) | ((Lr[:, :, 1] >> 4) << 2) | ((Lr[:, :, 2] >> 4) << 4)
          | ((Lr[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], axis=1)
    out[empty] = 0  # block of zeros (C: memset, d = 0)
    return out


_KERNELS = {"Q4_K": (_q4_k_chunk, 144), "Q5_K": (_q5_k_chunk, 176), "Q6_K": (_q6_k_chunk, 210)}


def quantize_k(data: np.ndarray, qtype: str) -> np.ndarray:
    """Quantize ``data`` (rows x cols, cols % 256 == 0) to Q4_K, Q5_K or Q6_K.

    Returns uint8 of shape (rows, cols // 256 * block_bytes): the GGUF tensor payload, computed
    ``_CHUNK`` super-blocks at a time (one thread: the exporter parallelises over tensors with
    processes, since numpy's many short operations make threads contend for the GIL).
    """
    kernel, nbytes = _KERNELS[qtype]
    rows, cols = data.shape
    if cols % QK_K:
        raise ValueError(f"{qtype} needs rows that are a multiple of {QK_K}, got {cols}")
    flat = data.reshape(-1, QK_K)
    out = np.empty((flat.shape[0], nbytes), np.uint8)
    for start in range(0, flat.shape[0], _CHUNK):
        out[start:start + _CHUNK] = kernel(flat[start:start + _CHUNK].astype(F32, copy=False))
    return out.reshape(rows, cols // QK_K * nbytes)


# ---------------------------------------------------------------- file types and per-tensor types

QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K")

#: general.file_type (llama_ftype) written for each export type
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q5_0": 8, "Q4_K_M": 15, "Q5_K_M": 17,
             "Q6_K": 18, "BF16": 32}
_DEFAULT = {"F32": "F32", "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q4_0": "Q4_0",
            "Q5_0": "Q5_0", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K"}
BLOCK_SIZE = {"F32": 1, "F16": 1, "BF16": 1, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32,
              "Q8_0": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
# a k-quant on rows that are not a multiple of 256 falls back to a 32-block type (llama-quant.cpp)
_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get Q6_K in Q4_K_M and Q5_K_M:
    the first and last eighth of the stack and every third layer in between."""
    return (i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8
            or (i_layer - n_layer // 8) % 3 == 2)


def _fallback(qtype: str, ncols: int) -> str:
    if ncols % BLOCK_SIZE[qtype] == 0:
        return qtype
    # llama.cpp has no fallback for the legacy types (it aborts); F16 is the safe answer
    alt = _FALLBACK.get(qtype, "F16")
    return alt if ncols % BLOCK_SIZE[alt] == 0 else "F16"


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layer: int, tied: bool) -> str:
    """GGML type of GGUF tensor ``name`` (numpy ``shape`` = (rows, cols)) in a ``quant`` file.

    Float exports follow convert_hf_to_gguf (1-D tensors stay F32). Quantized exports follow
    llama_model_quantize without an imatrix (src/llama-quant.cpp, dense models):
      * 1-D tensors and ``*_norm.weight`` stay F32;
      * ``output.weight`` (``token_embd`` when tied) -> Q6_K, or Q8_0 if its rows do not split
        into blocks of the default type; stays Q8_0 in a Q8_0 file;
      * Q4_K_M / Q5_K_M: ``attn_v`` and ``ffn_down`` of layer i -> Q6_K when use_more_bits(i, n);
      * rows that are not a multiple of the block: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
        and F16 when even 32 does not divide them.
    """
    ncols = shape[-1]
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return "F32"
    new = _DEFAULT[quant]
    if quant in ("F32", "F16", "BF16"):
        return new
    if quant == "Q8_0":  # convert_hf_to_gguf --outtype q8_0; llama-quantize gives the same
        return _fallback("Q8_0", ncols)
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        if ncols % BLOCK_SIZE[new]:
            new = "Q8_0"
        else:
            new = "Q6_K"
    elif quant in ("Q4_K_M", "Q5_K_M") and name.startswith("blk."):
        layer = int(name.split(".")[1])
        if (".attn_v." in name or ".ffn_down." in name) and use_more_bits(layer, n_layer):
            new = "Q6_K"
    return _fallback(new, ncols)
