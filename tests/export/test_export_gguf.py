"""Every export reads back with gguf-py and transformers; logits match the source model."""

import json

import numpy as np
import pytest
import torch

from helpers_export import CONFIGS, IDS, SAMPLE, source_logits
from distil.export import QUANT_TYPES, export_gguf
from distil.export.kquants import FILE_TYPE, tensor_type


def read(path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    fields = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    return fields, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("quant", QUANT_TYPES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_export_reads_back(model_dir, tmp_path, cfg, quant):
    arch, tied, tok = cfg
    src = model_dir(arch, tied, tok, hidden=64, vocab_pad=8 if arch == "qwen2" else 0)
    out = tmp_path / f"m-{quant}.gguf"
    res = export_gguf(src, out, quant, name="tiny")
    fields, tensors = read(out)
    config = json.loads((src / "config.json").read_text())
    g = "qwen2" if arch == "qwen2" else "llama"

    assert res.path == out and res.size_bytes == out.stat().st_size and res.quant == quant
    assert fields["general.architecture"] == g and fields["general.name"] == "tiny"
    assert fields["general.file_type"] == FILE_TYPE[quant]
    assert fields[f"{g}.block_count"] == 2 and fields[f"{g}.embedding_length"] == 64
    assert fields[f"{g}.attention.head_count_kv"] == 2
    assert fields[f"{g}.rope.freq_base"] == pytest.approx(config.get("rope_theta", 10000.0)
                                                           if "rope_theta" in config else
                                                           config["rope_parameters"]["rope_theta"])
    assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"]
    assert fields["tokenizer.ggml.model"] == ("llama" if tok.startswith("spm") else "gpt2")
    assert fields["tokenizer.ggml.pre"] == {"gpt2": "gpt-2", "smollm": "smollm", "qwen2": "qwen2",
                                            "chars": "gpt-2"}.get(tok, "default")
    assert "tokenizer.chat_template" in fields
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    if fields["tokenizer.ggml.model"] == "gpt2":
        assert len(fields["tokenizer.ggml.merges"]) > 0

    assert ("output.weight" in tensors) == (not tied)
    assert ("blk.0.attn_q.bias" in tensors) == (arch == "qwen2")
    assert res.n_tensors == len(tensors) and sum(res.tensor_types.values()) == len(tensors)
    for name, t in tensors.items():
        shape = tuple(int(d) for d in reversed(t.shape))
        assert t.tensor_type.name == tensor_type(name, shape, quant, 2, tied), name
    assert res.modelfile is not None and res.modelfile.read_text().startswith("# Ollama")


def test_qk_permutation_round_trips(model_dir, tmp_path):
    """Undoing llama.cpp's rotary row order on the F32 file gives the HF weights back."""
    from safetensors.numpy import load_file

    src = model_dir("llama", True, "gpt2", hidden=64)
    export_gguf(src, tmp_path / "m.gguf", "F32", modelfile=False)
    _, tensors = read(tmp_path / "m.gguf")
    hf = load_file(src / "model.safetensors")
    for key, heads in (("q", 4), ("k", 2)):
        w = np.asarray(tensors[f"blk.1.attn_{key}.weight"].data)
        rows = w.shape[0]
        back = w.reshape(heads, rows // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(back, hf[f"model.layers.1.self_attn.{key}_proj.weight"])
    np.testing.assert_array_equal(np.asarray(tensors["blk.1.attn_v.weight"].data),
                                  hf["model.layers.1.self_attn.v_proj.weight"])


def test_worker_processes_write_the_same_file(model_dir, tmp_path):
    """Forked encoding workers (the default for big models) give the same bytes as one process."""
    src = model_dir("qwen2", False, "qwen2", hidden=256)
    a = export_gguf(src, tmp_path / "a.gguf", "Q4_K_M", modelfile=False, workers=1)
    b = export_gguf(src, tmp_path / "b.gguf", "Q4_K_M", modelfile=False, workers=2)
    assert a.path.read_bytes() == b.path.read_bytes()


def test_bf16_source_exports(model_dir, tmp_path):
    """bf16 safetensors (what most checkpoints ship) are widened exactly."""
    from safetensors.torch import load_file, save_file

    src = model_dir("llama", True, "gpt2", hidden=64)
    d = tmp_path / "bf16"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    export_gguf(d, tmp_path / "m.gguf", "F32", modelfile=False)
    _, out = read(tmp_path / "m.gguf")
    np.testing.assert_array_equal(np.asarray(out["blk.0.ffn_up.weight"].data),
                                  tensors["model.layers.0.mlp.up_proj.weight"].float().numpy())


# ---------------------------------------------------------------- transformers loads the files

# Stated tolerances, per type: minimum cosine between the logits transformers computes from the
# GGUF and the source model's, over every position (seen on these models: BF16 0.99999, Q8_0
# 0.99985, Q6_K 0.9986, Q5_K_M 0.9959, Q5_0 0.9942, Q4_K_M 0.984, Q4_0 0.976). F32 / F16 hold
# the source values exactly (the fixtures' weights are fp16 numbers), so the logits agree to fp32
# precision: 8 ulps of the largest logit times sqrt(1024), the widest reduction in these models (bit for
# bit when written, but config floats such as rms_norm_eps are stored as f32 in the file).
TOLERANCE = {"F32": ("fp32", 8 * 2.0**-23 * 1024**0.5), "F16": ("fp32", 8 * 2.0**-23 * 1024**0.5),
             "BF16": ("cos", 0.9995),
             "Q8_0": ("cos", 0.999), "Q6_K": ("cos", 0.995), "Q5_K_M": ("cos", 0.99),
             "Q5_0": ("cos", 0.99), "Q4_K_M": ("cos", 0.97), "Q4_0": ("cos", 0.95)}


def hf_gguf_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def check_logits(got, want, quant):
    kind, tol = TOLERANCE[quant]
    if kind == "fp32":
        assert np.abs(got - want).max() <= tol * np.abs(want).max()
    else:
        cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
        assert cos.min() >= tol, f"min cosine {cos.min():.5f} < {tol}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_transformers_loads_f16_with_same_logits(model_dir, tmp_path, cfg):
    arch, tied, tok = cfg
    src = model_dir(arch, tied, tok, hidden=64, init_std=0.1)  # attention matters at this scale
    ids = list(range(3, 40, 3))
    export_gguf(src, tmp_path / "m.gguf", "F16", modelfile=False)
    check_logits(hf_gguf_logits(tmp_path / "m.gguf", ids), source_logits(src, ids), "F16")


@pytest.mark.parametrize("quant", ["F32", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_transformers_logits_within_tolerance(model_dir, tmp_path, quant):
    # hidden 256: every k-quant is really used (no fallback) in attention and FFN
    src = model_dir("llama", False, "gpt2", hidden=256, heads=4, kv_heads=2)
    ids = list(range(3, 60, 4))
    out = export_gguf(src, tmp_path / "m.gguf", quant, modelfile=False)
    if quant.endswith("_K_M") or quant == "Q6_K":
        assert quant[:2] + "_K" in out.tensor_types or "Q6_K" in out.tensor_types
    check_logits(hf_gguf_logits(tmp_path / "m.gguf", ids), source_logits(src, ids), quant)


def test_qwen2_biases_survive_q4_k_m(model_dir, tmp_path):
    src = model_dir("qwen2", True, "qwen2", hidden=256)
    ids = list(range(3, 60, 4))
    export_gguf(src, tmp_path / "m.gguf", "Q4_K_M", modelfile=False)
    check_logits(hf_gguf_logits(tmp_path / "m.gguf", ids), source_logits(src, ids), "Q4_K_M")


def test_sample_text_tokenizes_in_every_tokenizer(tokenizer_dir):
    # guards the fixtures themselves: each tokenizer splits the sample into several tokens
    from transformers import AutoTokenizer

    for kind in ("gpt2", "smollm", "qwen2", "spm", "spm-json", "chars"):
        assert len(AutoTokenizer.from_pretrained(tokenizer_dir(kind))(SAMPLE)["input_ids"]) > 10


# pre_tokenizer entries as they appear in tokenizer.json files (GPT-2, SmolLM2, Llama 3)
LLAMA3_SPLIT = (r"""{"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|"""
                r"""[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"""
                r"""\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false}""")
BYTELEVEL = '{"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": %s}'


@pytest.mark.parametrize("name,pre", [
    ("gpt-2", BYTELEVEL % "true"),
    ("smollm", '{"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": '
               'true}, %s]}' % (BYTELEVEL % "true")),
    ("llama-bpe", '{"type": "Sequence", "pretokenizers": [%s, %s]}' % (LLAMA3_SPLIT,
                                                                       BYTELEVEL % "false")),
])
def test_pre_tokenizer_names(name, pre, tmp_path):
    from distil.export.vocab import pre_tokenizer_name

    tok = json.loads('{"pre_tokenizer": %s}' % pre)
    assert pre_tokenizer_name(tok, tmp_path / "tokenizer.json") == name
