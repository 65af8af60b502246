"""Gemma 3, Qwen 3 and Llama 3.x rope scaling: the file (gguf-py read-back), llama.cpp's reading of it
(loads, generates, F16 logits against PyTorch on every position), its tokenizer, and byte identity
of our Q4_K_M with llama.cpp's own quantizer fed our F16 file; on tiny random models of each family.

The Gemma 3 model has a non-default layer pattern (global layer 2 of 4), a sliding window of 6
tokens over 31 and a local rope base of 100: dropping the +1 of its norms, the per-layer pattern,
the local base or the window each brings the minimum cosine below 0.8 (checked when written).
"""

import json
import math
import shutil

import numpy as np
import pytest

from helpers_export import LLAMA_CPP, SAMPLE, require, source_logits
from distil.errors import DistilError
from distil.export import export_gguf

GEMMA = dict(sliding_window=6, layers=4,
             layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
# Gemma 3 4B and larger: linear rope scaling on the global layers only
GEMMA_LINEAR = dict(GEMMA, rope_parameters={
    "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 100.0},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
# Llama 3.x rope with an original context of 16 so that the scaling acts inside 31 positions
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 100.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
IDS = [1] + list(range(5, 95, 3))

# (id, arch, tied, tokenizer, extra config)
FAMILIES = [
    ("gemma3-tied-gemma", "gemma3", True, "gemma", GEMMA),
    ("gemma3-untied-spm", "gemma3", False, "spm", GEMMA),
    ("gemma3-linear-rope", "gemma3", True, "gemma", GEMMA_LINEAR),
    ("qwen3-untied-qwen2", "qwen3", False, "qwen2", {}),
    ("qwen3-tied-gpt2", "qwen3", True, "gpt2", {}),
    ("llama3rope-tied-gpt2", "llama", True, "gpt2", {"rope_parameters": LLAMA3_ROPE, "heads": 2, "kv_heads": 1}),
]


def family(model_dir, fid, **kw):
    _, arch, tied, tok, extra = next(f for f in FAMILIES if f[0] == fid)
    return model_dir(arch, tied, tok, **{**extra, **kw})


def fields_of(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.")}


# ---------------------------------------------------------------- gguf-py read-back (no llama.cpp)


def test_gemma3_file_layout(model_dir, tmp_path):
    from safetensors.numpy import load_file

    src = family(model_dir, "gemma3-tied-gemma")
    export_gguf(src, tmp_path / "g.gguf", "F32", modelfile=False)
    r, f = fields_of(tmp_path / "g.gguf")
    assert f["general.architecture"] == "gemma3"
    assert f["gemma3.attention.sliding_window"] == 6
    assert f["gemma3.attention.sliding_window_pattern"] == [True, True, False, True]
    assert f["gemma3.rope.freq_base"] == 10000.0 and f["gemma3.rope.freq_base_swa"] == 100.0
    assert f["gemma3.attention.key_length"] == 16 and f["gemma3.attention.head_count_kv"] == 2
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert "output.weight" not in tensors  # tied head
    assert {n.split(".", 2)[2] for n in tensors if n.startswith("blk.0.")} == {
        "attn_norm.weight", "attn_q_norm.weight", "attn_k_norm.weight", "attn_q.weight", "attn_k.weight",
        "attn_v.weight", "attn_output.weight", "post_attention_norm.weight", "ffn_norm.weight",
        "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "post_ffw_norm.weight"}
    hf = load_file(src / "model.safetensors")
    # every RMSNorm weight is stored as 1 + w (HF computes x * (1 + w), llama.cpp x * w)
    pairs = {"output_norm.weight": "model.norm.weight",
             "blk.1.attn_norm.weight": "model.layers.1.input_layernorm.weight",
             "blk.1.post_attention_norm.weight": "model.layers.1.post_attention_layernorm.weight",
             "blk.1.ffn_norm.weight": "model.layers.1.pre_feedforward_layernorm.weight",
             "blk.1.post_ffw_norm.weight": "model.layers.1.post_feedforward_layernorm.weight",
             "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
             "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight"}
    for g, h in pairs.items():
        np.testing.assert_array_equal(tensors[g], hf[h].astype(np.float32) + np.float32(1.0))
    # the embedding is stored unscaled (llama.cpp multiplies by sqrt(hidden) itself), Q/K unpermuted
    np.testing.assert_array_equal(tensors["token_embd.weight"], hf["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensors["blk.1.attn_q.weight"], hf["model.layers.1.self_attn.q_proj.weight"])


def test_gemma3_config_of_transformers_4(model_dir, tmp_path):
    """Checkpoints saved by transformers 4.x spell Gemma 3's rope and layer kinds differently: rope_theta,
    rope_local_base_freq and sliding_window_pattern (every 3rd layer global here), no layer_types."""
    d = shutil.copytree(family(model_dir, "gemma3-tied-gemma"), tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    for key in ("layer_types", "rope_parameters"):
        cfg.pop(key)
    cfg.update(rope_theta=5000.0, rope_local_base_freq=50.0, sliding_window_pattern=3, rope_scaling=None)
    (d / "config.json").write_text(json.dumps(cfg))
    export_gguf(d, tmp_path / "g.gguf", "F16", modelfile=False)
    _, f = fields_of(tmp_path / "g.gguf")
    assert f["gemma3.attention.sliding_window_pattern"] == [True, True, False, True]
    assert f["gemma3.rope.freq_base"] == 5000.0 and f["gemma3.rope.freq_base_swa"] == 50.0


def test_qwen3_file_layout(model_dir, tmp_path):
    from safetensors.numpy import load_file

    src = family(model_dir, "qwen3-untied-qwen2")
    export_gguf(src, tmp_path / "q.gguf", "F32", modelfile=False)
    r, f = fields_of(tmp_path / "q.gguf")
    assert f["general.architecture"] == "qwen3" and f["qwen3.attention.key_length"] == 16
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    hf = load_file(src / "model.safetensors")
    assert "output.weight" in tensors and not any(n.endswith(".bias") for n in tensors)
    # Q/K norms kept as they are (Qwen's RMSNorm is x * w), Q/K rows unpermuted (NEOX rope)
    np.testing.assert_array_equal(tensors["blk.0.attn_q_norm.weight"], hf["model.layers.0.self_attn.q_norm.weight"])
    np.testing.assert_array_equal(tensors["blk.0.attn_k_norm.weight"], hf["model.layers.0.self_attn.k_norm.weight"])
    np.testing.assert_array_equal(tensors["blk.0.attn_k.weight"], hf["model.layers.0.self_attn.k_proj.weight"])


def test_llama3_rope_freqs_from_the_formula(model_dir, tmp_path):
    """head_dim 32, base 100, original context 16: pair i has wavelength 2*pi*100^(2i/32), which is
    6.3, 7.9, 11.2, 14.9 for pairs 0-3 (between 16/4 and 16/1: blended, s = (16/wavelength - 1)/3,
    divisor 1 / ((1 - s)/8 + s)) and 19.9 or more from pair 4 on (divisor 8)."""
    src = family(model_dir, "llama3rope-tied-gpt2")
    export_gguf(src, tmp_path / "l.gguf", "F32", modelfile=False)
    r, f = fields_of(tmp_path / "l.gguf")
    freqs = {t.name: np.asarray(t.data) for t in r.tensors}["rope_freqs.weight"]
    assert freqs.dtype == np.float32 and freqs.shape == (16,)
    s = [(16 / (2 * math.pi * 100 ** (2 * i / 32)) - 1) / 3 for i in range(4)]
    assert s[0] < 1 and s[3] > 0  # all four really in the blended band
    want = [1 / ((1 - si) / 8 + si) for si in s] + [8.0] * 12
    np.testing.assert_allclose(freqs, want, rtol=1e-6)
    assert "llama.rope.scaling.type" not in f  # llama3 scaling is the tensor, as llama.cpp's converter writes it


def test_multimodal_gemma3_exports_its_text_model(model_dir, tmp_path):
    """A Gemma3ForConditionalGeneration checkpoint: text_config, model.language_model.* names, a vision
    tower that is not exported (llama.cpp keeps it in an mmproj file). Same tensors as the text model."""
    from safetensors.numpy import load_file, save_file

    src = family(model_dir, "gemma3-tied-gemma")
    mm = tmp_path / "mm"
    shutil.copytree(src, mm)
    t = load_file(mm / "model.safetensors")
    t = {k.replace("model.", "model.language_model.", 1): v for k, v in t.items()}
    t["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros((4, 3), np.float32)
    save_file(t, mm / "model.safetensors", metadata={"format": "pt"})
    text = json.loads((src / "config.json").read_text())
    (mm / "config.json").write_text(json.dumps({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
                                                "text_config": text, "vision_config": {}}))
    export_gguf(src, tmp_path / "a.gguf", "F16", modelfile=False, name="x")
    export_gguf(mm, tmp_path / "b.gguf", "F16", modelfile=False, name="x")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("change, message", [
    ({"query_pre_attn_scalar": 256}, r"query_pre_attn_scalar: expected 16 .*found 256"),
    ({"final_logit_softcapping": 30.0}, r"final_logit_softcapping: expected null"),
    ({"hidden_activation": "gelu"}, r"hidden_activation: expected 'gelu_pytorch_tanh'"),
    ({"layer_types": ["full_attention"]}, r"layer_types: expected 4 entries"),
    ({"sliding_window": None}, r"sliding_window: expected a positive integer"),
])
def test_gemma3_config_llama_cpp_cannot_run(model_dir, tmp_path, change, message):
    d = shutil.copytree(family(model_dir, "gemma3-tied-gemma"), tmp_path / "g")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilError, match=message):
        export_gguf(d, tmp_path / "g.gguf", "F16", modelfile=False)
    assert not list(tmp_path.glob("*.gguf"))


def test_unsupported_rope_and_architecture_are_named(model_dir, tmp_path):
    d = shutil.copytree(family(model_dir, "qwen3-untied-qwen2"), tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilError, match=r"rope scaling 'yarn' .*supported: default, linear\)"):
        export_gguf(d, tmp_path / "q.gguf")
    cfg.update(model_type="phi3")
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilError, match=r"'phi3'.*supported: llama, mistral, qwen2, qwen3, gemma3_text, gemma3$"):
        export_gguf(d, tmp_path / "q.gguf")


# ---------------------------------------------------------------- llama.cpp


@pytest.fixture(scope="module")
def llama_cpp():
    return require(*LLAMA_CPP)


def llama_logits(llama_cpp, path, ids):
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1,
                          n_batch=128)
    llm.eval(ids)
    return np.array(llm.scores[:llm.n_tokens])


@pytest.mark.parametrize("fid", [f[0] for f in FAMILIES])
def test_f16_logits_match_pytorch_and_q4_k_m_generates(llama_cpp, model_dir, tmp_path, fid):
    src = family(model_dir, fid, hidden=64, init_std=0.1)
    export_gguf(src, tmp_path / "m.gguf", "F16", modelfile=False)
    got, want = llama_logits(llama_cpp, tmp_path / "m.gguf", IDS), source_logits(src, IDS)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999, f"min cosine over positions {cos.min():.6f}"
    export_gguf(src, tmp_path / "q.gguf", "Q4_K_M", modelfile=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "q.gguf"), n_ctx=64, verbose=False, n_threads=1)
    prompt = llm.tokenize(b"The answer is", add_bos=True)
    out = [t for _, t in zip(range(6), llm.generate(prompt, temp=0.0))]
    assert len(out) == 6 and all(0 <= t < llm.n_vocab() for t in out)


@pytest.mark.parametrize("fid", ["gemma3-tied-gemma", "qwen3-untied-qwen2", "llama3rope-tied-gpt2"])
def test_q4_k_m_same_bytes_as_llama_quantize(llama_cpp, model_dir, tmp_path, fid):
    """Rows of 256 (hidden 256), 8 layers: Q4_K, Q6_K by use_more_bits, F32 norms, rope_freqs kept F32."""
    import ctypes

    from test_export_llamacpp import assert_same_tensors

    extra = {"layers": 8, "layer_types": ["sliding_attention"] * 5 + ["full_attention"] * 3} if "gemma" in fid else {}
    src = family(model_dir, fid, hidden=256, ffn=512, **extra)
    export_gguf(src, tmp_path / "f16.gguf", "F16", modelfile=False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert llama_cpp.llama_model_quantize(str(tmp_path / "f16.gguf").encode(),
                                          str(tmp_path / "theirs.gguf").encode(), ctypes.byref(params)) == 0
    res = export_gguf(src, tmp_path / "ours.gguf", "Q4_K_M", modelfile=False)
    assert {"Q4_K", "Q6_K", "F32"} <= set(res.tensor_types)
    assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


def test_gemma_tokenizer_and_chat_template(llama_cpp, model_dir, tokenizer_dir, tmp_path):
    """Byte-fallback SentencePiece with turn markers: llama.cpp tokenizes as HF does (BOS added, no
    space prefix), and the Modelfile speaks Gemma's turns."""
    from transformers import AutoTokenizer

    src = family(model_dir, "gemma3-tied-gemma")
    res = export_gguf(src, tmp_path / "m.gguf", "F16")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir("gemma"))
    assert llm.metadata["tokenizer.ggml.add_bos_token"] == "true" and hf("a")["input_ids"][0] == hf.bos_token_id
    for text in (SAMPLE, "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"):
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf(text)["input_ids"], text
    assert "<start_of_turn>" in llm.metadata["tokenizer.chat_template"]
    modelfile = res.modelfile.read_text()
    assert "<start_of_turn>model" in modelfile and 'PARAMETER stop "<end_of_turn>"' in modelfile
