"""Tensor payloads of a GGUF: safetensors read by rows, each tensor encoded as its GGML type.

``SafeTensors`` parses the safetensors format itself (8-byte header length, a json header,
raw little-endian data): no pickle, no torch, bf16 widened exactly, and rows read on demand so
that peak memory stays near one chunk. ``quantize_tensor`` turns float32 rows into the bytes of
a GGML type; ``Encoder`` does that for a whole model, in order, in worker processes if asked.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import struct
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from distil.errors import DistilError
from distil.export.kquants import quantize_k

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_CHUNK_ELEMS = 1 << 21  # rows are read and encoded ~2M weights at a time


# ---------------------------------------------------------------- safetensors, read by rows


#: bytes per element of every safetensors dtype (the header check knows them all; the exporter reads F32/F16/BF16)
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def check_safetensors(w: Path) -> tuple[dict, int]:
    """The header of one safetensors file, checked against the file without reading any tensor: the header
    length fits the file, the header is a JSON object, every tensor has a known dtype, a shape and a byte range
    of exactly its size inside the file. Returns the header ({name: {dtype, shape, data_offsets}}, maybe
    __metadata__) and where the data starts (8 + header length); DistilError naming the file otherwise."""
    size = w.stat().st_size
    if size < 8:
        raise DistilError(f"{w}: corrupt safetensors file: expected at least an 8-byte header length, found "
                          f"{size} bytes")
    with w.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8 or n > 100 << 20:  # safetensors itself refuses headers over 100 MB
            raise DistilError(f"{w}: corrupt or truncated safetensors file: the header claims {n} bytes, the "
                              f"file has {size - 8} after the length")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise DistilError(f"{w}: corrupt safetensors file: expected a JSON header, found unreadable bytes") from None
    if not isinstance(header, dict):
        raise DistilError(f"{w}: corrupt safetensors file: expected a JSON object header, found a "
                          f"{type(header).__name__}")
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        ok = isinstance(entry, dict) and entry.get("dtype") in _ST_ITEMSIZE \
            and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list) \
            and len(entry["data_offsets"]) == 2 \
            and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                    for x in entry["shape"] + entry["data_offsets"])
        if not ok:
            raise DistilError(f"{w}: corrupt safetensors file: tensor {name}: expected dtype, shape and "
                              f"data_offsets, found {str(entry)[:80]}")
        begin, end = entry["data_offsets"]
        count = 1
        for dim in entry["shape"]:
            count *= dim
        if end > data_size or begin > end:
            raise DistilError(f"{w}: corrupt or truncated safetensors file: tensor {name} ends at byte {end} of "
                              f"the data, the file holds {data_size}")
        if end - begin != count * _ST_ITEMSIZE[entry["dtype"]]:
            raise DistilError(f"{w}: corrupt safetensors file: tensor {name} of shape {entry['shape']} "
                              f"({entry['dtype']}) spans {end - begin} bytes")
    return header, 8 + n


class SafeTensors:
    """Tensors of one HF directory (single file or shards), read row ranges at a time as f32."""

    def __init__(self, model_dir: Path):
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            found = sorted(p.name for p in model_dir.glob("*.bin")) or "no weight files"
            raise DistilError(f"{model_dir}: expected *.safetensors weights, found {found} "
                              f"(pickle .bin checkpoints are not loaded: re-save with "
                              f"save_pretrained(safe_serialization=True))")
        self.entries: dict[str, tuple[Path, str, tuple[int, ...], int]] = {}
        for f in files:
            header, start = check_safetensors(f)  # lengths, JSON and byte ranges, against the file's size
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in _ST_DTYPES:
                    raise DistilError(f"{f}: tensor {name} has dtype {info['dtype']}; expected "
                                      f"one of {', '.join(_ST_DTYPES)}")
                self.entries[name] = (f, info["dtype"], tuple(info["shape"]),
                                      start + info["data_offsets"][0])

        self.arrays: dict[str, np.ndarray] = {}

    def add_array(self, name: str, array: np.ndarray) -> None:
        """A tensor computed from the config (llama 3's rope_freqs), exported like the file's own."""
        self.arrays[name] = np.ascontiguousarray(array, np.float32)
        self.entries[name] = (Path(name), "F32", tuple(array.shape), 0)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) as float32 (bf16 widened exactly by a 16-bit shift)."""
        f, dtype, shape, offset = self.entries[name]
        shape = shape or (1,)
        stop = shape[0] if stop is None else stop
        if name in self.arrays:
            return self.arrays[name].reshape(shape)[start:stop]
        row = int(np.prod(shape[1:], dtype=np.int64))
        np_dtype = np.dtype(_ST_DTYPES[dtype])
        with open(f, "rb") as fh:
            fh.seek(offset + start * row * np_dtype.itemsize)
            raw = np.fromfile(fh, dtype=np_dtype, count=(stop - start) * row)
        if dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape((stop - start,) + tuple(shape[1:]))


# ---------------------------------------------------------------- encoding


def quantize_tensor(data: np.ndarray, qtype: str) -> np.ndarray:
    """Encode a float32 (rows, cols) array as GGML ``qtype``; returns the bytes GGUF stores.

    F32/F16 as numpy arrays, the legacy 32-blocks (Q8_0, Q4_0, Q5_0, Q5_1) and BF16 through
    gguf-py (bit-exact with ggml), the k-quants through ``quantize_k``.
    """
    if qtype == "F32":
        return np.ascontiguousarray(data, np.float32)
    if qtype == "F16":
        return data.astype(np.float16)
    if qtype in ("Q4_K", "Q5_K", "Q6_K"):
        return quantize_k(data, qtype)
    from gguf import GGMLQuantizationType, quants

    data = np.ascontiguousarray(data, np.float32)
    if qtype == "BF16":
        return quants.quantize(data, GGMLQuantizationType.BF16)
    # all 32-blocks of the chunk in one vectorised call (quants.quantize would go 16 rows at a time)
    out = getattr(quants, qtype).quantize_blocks(data.reshape(-1, 32)).reshape(data.shape[0], -1)
    if qtype in ("Q4_0", "Q5_0", "Q4_1", "Q5_1"):
        _fix_zero_blocks(data, out, qtype)
    return out


def _fix_zero_blocks(data: np.ndarray, out: np.ndarray, qtype: str) -> None:
    """Give zero scales the *signs* ggml writes: the only place gguf-py's bytes differ.

    ggml's Q4_0/Q5_0 start from ``max = 0`` and store ``d = max / -16``: an all-zero block gets
    d = -0.0 (0x8000). Q4_1/Q5_1 keep the first element that reaches the minimum (strict ``<``),
    so a zero minimum has the sign of the block's first zero, and an all-zero block gets d = +0.
    Pruned weights multiplied by a 0/1 mask are often -0.0. Dequantized values are equal anyway.
    """
    blocks = data.reshape(-1, 32)
    raw = out.reshape(blocks.shape[0], -1)
    if qtype in ("Q4_0", "Q5_0"):
        zero = ~blocks.any(axis=1)
        raw[zero, 0:2] = (0x00, 0x80)
        return
    zero_min = blocks.min(axis=1) == 0
    if not zero_min.any():
        return
    sub = blocks[zero_min]
    first = np.argmax(sub == 0, axis=1)
    sign = np.signbit(sub[np.arange(sub.shape[0]), first])
    raw[zero_min, 2] = 0
    raw[zero_min, 3] = np.where(sign, 0x80, 0)
    raw[~blocks.any(axis=1), 0:2] = 0


def permute_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order that turns HF's rotate-half Q/K layout into llama.cpp's interleaved pairs."""
    idx = np.arange(n_rows).reshape(n_head, 2, n_rows // n_head // 2)
    return idx.swapaxes(1, 2).reshape(n_rows)


def _encoded(st: SafeTensors, hf: str, gname: str, qtype: str, c: dict, permute: bool):
    """The GGUF payload of one tensor: read, permuted if Q/K of llama, shifted if a Gemma norm
    (HF's x * (1 + w) is llama.cpp's x * w' with w' = w + 1, added in float32), encoded in row chunks."""
    shape = st.shape(hf)
    if permute and (".attn_q." in gname or ".attn_k." in gname):
        heads = c["n_head"] if ".attn_q." in gname else c["n_kv"]
        chunks = [st.read(hf)[permute_rows(shape[0], heads)]]  # hidden x hidden at most
    else:
        step = max(1, _CHUNK_ELEMS // max(1, int(np.prod(shape[1:], dtype=np.int64))))
        chunks = (st.read(hf, r, min(r + step, shape[0])) for r in range(0, shape[0], step))
    parts = []
    for x in chunks:
        if not np.isfinite(x).all():
            raise DistilError(f"{st.entries[hf][0]}: tensor {hf} contains nan or inf")
        if c.get("norm_offset") and gname.endswith("norm.weight"):
            x = x + np.float32(c["norm_offset"])
        parts.append(quantize_tensor(x if len(shape) > 1 else x.reshape(-1), qtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class Encoder:
    """Encoded tensors, in order; with ``workers`` > 1 computed ahead in forked processes.

    Not threads: numpy's many short operations make threads fight over the GIL (two threads ran
    the k-quants slower than one here, two processes 1.6x faster). Encoding starts as soon as
    the encoder is made, so it overlaps writing the metadata. Workers read their own rows from
    the safetensors files and send back only the encoded bytes; up to ``8 * workers`` results
    wait in order, so one long tensor does not leave the other workers idle.
    """

    def __init__(self, jobs: list[tuple], workers: int):
        self.jobs, self.pool, self.pending = jobs, None, deque()
        if workers > 1 and len(jobs) > 1:
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
            self.pending.extend(self.pool.submit(_encoded, *job) for job in jobs[:8 * workers])

    def __iter__(self):
        if self.pool is None:
            yield from (_encoded(*job) for job in self.jobs)
            return
        for job in self.jobs[len(self.pending):] + [None] * len(self.pending):
            data = self.pending.popleft().result()
            if job is not None:
                self.pending.append(self.pool.submit(_encoded, *job))
            yield data

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
