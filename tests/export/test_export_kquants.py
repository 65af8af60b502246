"""Q4_K / Q5_K / Q6_K quantizers: byte identity with ggml, round trips, Q4_K_M type rules."""

import ctypes
import hashlib
import os

import numpy as np
import pytest

from helpers_export import LLAMA_CPP, require
from distil.export.tensors import quantize_tensor
from distil.export.kquants import quantize_k, tensor_type, use_more_bits

KTYPES = ("Q4_K", "Q5_K", "Q6_K")


def hard_weights(rows: int = 8, seed: int = 1234) -> np.ndarray:
    """Blocks of very different scales, an all-zero half block, an all-positive row, an outlier."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, 512)) * np.exp(rng.uniform(-4, 1, (rows, 1)))).astype(np.float32)
    x[1, :256] = 0
    x[2] = np.abs(x[2])
    x[3, 7] = 40.0
    return x


# Digests of the bytes llama.cpp's quantize_row_q*_K_ref writes for hard_weights() (checked
# against ggml_quantize_chunk when this test was written, and again below whenever llama_cpp
# is installed): the byte-identity check that needs no llama.cpp.
GOLDEN = {"Q4_K": "14717c04cf078e1e", "Q5_K": "f5420fcc0aabe4de", "Q6_K": "4705b1034bf723c6"}


@pytest.mark.parametrize("qtype", KTYPES)
def test_golden_bytes(qtype):
    digest = hashlib.sha256(quantize_k(hard_weights(), qtype).tobytes()).hexdigest()[:16]
    assert digest == GOLDEN[qtype]


@pytest.mark.parametrize("qtype", KTYPES)
def test_golden_bytes_with_the_plain_python_sum(qtype, monkeypatch):
    """The explicit-loop fallback (used if numpy ever stops reducing row by row) is exact too."""
    from distil.export import kquants

    monkeypatch.setattr(kquants, "_seqsum", kquants._seqsum_loop)
    digest = hashlib.sha256(quantize_k(hard_weights(), qtype).tobytes()).hexdigest()[:16]
    assert digest == GOLDEN[qtype]


@pytest.mark.parametrize("qtype", KTYPES)
def test_round_trip_error_is_small(qtype):
    from gguf import GGMLQuantizationType, quants

    x = np.random.default_rng(0).standard_normal((16, 1024)).astype(np.float32)
    q = quantize_k(x, qtype)
    assert q.shape == (16, 1024 // 256 * {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[qtype])
    back = quants.dequantize(q, GGMLQuantizationType[qtype])
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x ** 2))
    assert rel < {"Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]


def test_zero_and_constant_blocks():
    from gguf import GGMLQuantizationType, quants

    x = np.zeros((2, 256), np.float32)
    x[1] = 0.25
    for qtype in KTYPES:
        back = quants.dequantize(quantize_k(x, qtype), GGMLQuantizationType[qtype])
        np.testing.assert_allclose(back, x, atol=2e-3)


def test_rows_not_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 96), np.float32), "Q4_K")


# ---------------------------------------------------------------- against ggml itself


@pytest.fixture(scope="module")
def ggml_quantize():
    llama_cpp = require(*LLAMA_CPP)  # skips locally when missing; fails in CI (CI=true)
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    fn = lib.ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]

    def run(x: np.ndarray, qtype: str) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        t = GGMLQuantizationType[qtype]
        block, size = GGML_QUANT_SIZES[t]
        out = np.zeros((x.shape[0], x.shape[1] // block * size), np.uint8)
        fn(int(t), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1], None)
        return out

    return run


def distributions(max_exp: int = 12):
    """Super-blocks of six shapes at scales 1e-12 .. 1e{max_exp}, some on the f16 grid."""
    rng = np.random.default_rng(7)
    n = 3000  # super-blocks, each with its own scale and shape
    base = rng.standard_normal((n, 256))
    kind = rng.integers(0, 6, (n, 1))
    x = np.select([kind == 0, kind == 1, kind == 2, kind == 3, kind == 4],
                  [base, np.abs(base), -np.abs(base), base * (rng.random((n, 256)) < 0.1),
                   np.round(base * 2)], base ** 3)
    x = x * 10.0 ** rng.uniform(-12, max_exp, (n, 1))
    x[::7] = np.clip(x[::7], -65504, 65504).astype(np.float16)  # f16 grid, as from an F16 file
    x[5::11, :128] = 0
    x[3::13, 100] = 1e3
    return x.astype(np.float32).reshape(-1, 512)


@pytest.mark.parametrize("qtype", KTYPES)
def test_byte_identical_to_ggml(ggml_quantize, qtype):
    x = np.concatenate([hard_weights(), distributions()])
    ours, ref = quantize_k(x, qtype), ggml_quantize(x, qtype)
    size = ours.shape[1] // 2
    bad = np.nonzero((ours.reshape(-1, size) != ref.reshape(-1, size)).any(axis=1))[0]
    assert bad.size == 0, f"{bad.size} blocks differ, first {bad[:5]}"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_legacy_types_through_gguf_py_match_ggml(ggml_quantize, qtype):
    x = distributions(max_exp=3)[:400]  # block scales stay inside fp16's range
    assert np.array_equal(quantize_tensor(x, qtype), ggml_quantize(x, qtype))


# ---------------------------------------------------------------- Q4_K_M / Q5_K_M type rules


def test_use_more_bits_on_smollm2_depth():
    more = [i for i in range(30) if use_more_bits(i, 30)]
    assert more == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


@pytest.mark.parametrize("name,shape,quant,tied,want", [
    ("blk.0.attn_norm.weight", (576,), "Q4_K_M", True, "F32"),
    ("blk.0.attn_q.bias", (576,), "Q4_K_M", True, "F32"),
    ("blk.3.attn_q.weight", (576, 576), "Q4_K_M", True, "Q5_0"),       # 576 % 256: Q4_K -> Q5_0
    ("blk.3.attn_q.weight", (512, 512), "Q4_K_M", True, "Q4_K"),
    ("blk.0.attn_v.weight", (192, 576), "Q4_K_M", True, "Q8_0"),       # Q6_K -> Q8_0
    ("blk.3.attn_v.weight", (192, 576), "Q4_K_M", True, "Q5_0"),
    ("blk.0.ffn_down.weight", (576, 1536), "Q4_K_M", True, "Q6_K"),
    ("blk.3.ffn_down.weight", (576, 1536), "Q4_K_M", True, "Q4_K"),
    ("blk.3.ffn_down.weight", (576, 1536), "Q5_K_M", True, "Q5_K"),
    ("blk.3.attn_q.weight", (576, 576), "Q5_K_M", True, "Q5_1"),       # Q5_K -> Q5_1
    ("token_embd.weight", (49152, 576), "Q4_K_M", True, "Q8_0"),       # tied: output rules
    ("token_embd.weight", (49152, 512), "Q4_K_M", True, "Q6_K"),
    ("token_embd.weight", (49152, 512), "Q4_K_M", False, "Q4_K"),      # untied: no rule
    ("output.weight", (49152, 512), "Q4_K_M", False, "Q6_K"),
    ("output.weight", (49152, 512), "Q4_0", False, "Q6_K"),
    ("output.weight", (49152, 512), "Q8_0", False, "Q8_0"),
    ("blk.0.ffn_down.weight", (64, 100), "Q4_K_M", True, "F16"),       # not even a multiple of 32
    ("blk.0.ffn_down.weight", (64, 100), "Q8_0", True, "F16"),
    ("blk.0.ffn_up.weight", (100, 64), "F16", True, "F16"),
    ("blk.0.ffn_up.weight", (100, 64), "BF16", True, "BF16"),
    ("blk.0.ffn_norm.weight", (64,), "F16", True, "F32"),
])
def test_tensor_type_rules(name, shape, quant, tied, want):
    assert tensor_type(name, shape, quant, n_layer=30, tied=tied) == want
