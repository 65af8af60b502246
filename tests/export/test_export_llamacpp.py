"""llama.cpp itself: it loads every file and generates, its F16 logits match PyTorch, its
tokenizer agrees with Hugging Face's, and its own quantizer writes the same bytes as distil."""

import ctypes

import numpy as np
import pytest

from helpers_export import CONFIGS, IDS, LLAMA_CPP, SAMPLE, require, source_logits
from distil.export import QUANT_TYPES, export_gguf

llama_cpp = require(*LLAMA_CPP)  # skips locally when missing; in CI (CI=true) a missing llama_cpp fails

FTYPE = {q: getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{q}") for q in
         ("Q8_0", "Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K")}


def load(path, n_ctx=128):
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=True, verbose=False,
                           n_threads=1, n_batch=n_ctx)


def llama_logits(path, ids):
    llm = load(path)
    llm.eval(ids)
    return np.array(llm.scores[:llm.n_tokens])


def llama_quantize(src, dst, quant):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPE[quant]
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                          ctypes.byref(params)) == 0


def assert_same_tensors(ours, theirs):
    from gguf import GGUFReader

    a = {t.name: t for t in GGUFReader(ours).tensors}
    b = {t.name: t for t in GGUFReader(theirs).tensors}
    assert sorted(a) == sorted(b)
    diff = [(n, a[n].tensor_type.name, b[n].tensor_type.name) for n in b
            if a[n].tensor_type != b[n].tensor_type
            or not np.array_equal(np.asarray(a[n].data), np.asarray(b[n].data))]
    assert not diff, f"{len(diff)} of {len(b)} tensors differ: {diff[:5]}"


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_llama_cpp_loads_every_type_and_generates(model_dir, tmp_path, quant):
    src = model_dir("llama", False, "gpt2", hidden=256)
    path = export_gguf(src, tmp_path / "m.gguf", quant, modelfile=False).path
    llm = load(path)
    assert llm.n_vocab() == 320 and "<|im_start|>" in llm.metadata["tokenizer.chat_template"]
    prompt = llm.tokenize(b"The answer is", add_bos=False)
    out = [t for _, t in zip(range(6), llm.generate(prompt, temp=0.0))]
    assert len(out) == 6 and all(0 <= t < 320 for t in out)


@pytest.mark.parametrize("cfg", CONFIGS, ids=IDS)
def test_f16_logits_match_pytorch(model_dir, tmp_path, cfg):
    arch, tied, tok = cfg
    # init std 0.1: attention matters enough that a missing Q/K permutation fails (cos ~0.6)
    src = model_dir(arch, tied, tok, hidden=64, init_std=0.1)
    ids = [1] + list(range(5, 95, 3))
    export_gguf(src, tmp_path / "m.gguf", "F16", modelfile=False)
    got, want = llama_logits(tmp_path / "m.gguf", ids), source_logits(src, ids)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999, f"min cosine over positions {cos.min():.6f}"
    # and the Q4_K_M file of the same model loads and runs
    export_gguf(src, tmp_path / "q.gguf", "Q4_K_M", modelfile=False)
    assert np.isfinite(llama_logits(tmp_path / "q.gguf", ids)).all()


def test_llama_with_attention_biases(model_dir, tmp_path):
    """Llama's optional q/k/v/o biases: q and k biases get the same rotary permutation."""
    # large weights and biases, so that attention dominates the logits: with the q/k biases left
    # in HF's order the minimum cosine drops to ~0.34
    src = model_dir("llama", False, "gpt2", hidden=64, attention_bias=True, bias_std=1.0,
                    init_std=0.2)
    ids = [1] + list(range(5, 60, 3))
    export_gguf(src, tmp_path / "m.gguf", "F16", modelfile=False)
    got, want = llama_logits(tmp_path / "m.gguf", ids), source_logits(src, ids)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999


@pytest.mark.parametrize("kind", ["gpt2", "smollm", "qwen2", "spm", "spm-json", "chars"])
def test_tokenizer_matches_hugging_face(model_dir, tokenizer_dir, tmp_path, kind):
    from transformers import AutoTokenizer

    src = model_dir("llama", True, kind, hidden=64)
    export_gguf(src, tmp_path / "m.gguf", "F16", modelfile=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir(kind))
    texts = [SAMPLE, "Digits 0123456789 and  two  spaces\n\n tabs\tend.", "<|im_start|>user\nhi"]
    if kind.startswith("spm"):  # SentencePiece special tokens differ; HF and spm disagree on
        texts = texts[:2]       # a leading space, so none of the texts starts with one
    if kind == "chars":  # its Split(Regex(".")) leaves "\n\n" whole, and HF maps that to <unk>
        texts = [t.replace("\n\n", "\n") for t in texts]
    for text in texts:
        want = hf(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    if kind == "spm":
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir(kind) / "tokenizer.model"))
        assert llm.tokenize(SAMPLE.encode(), add_bos=True) == [1] + sp.encode(SAMPLE)


# ---------------------------------------------------------------- byte identity with llama-quantize


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0", "Q5_0"])
def test_same_bytes_as_llama_quantize_on_rows_of_256(model_dir, tmp_path, quant):
    """12 layers so that the per-layer Q6_K choices (use_more_bits) are really exercised."""
    src = model_dir("llama", True, "gpt2", hidden=256, layers=12, ffn=512)
    export_gguf(src, tmp_path / "f16.gguf", "F16", modelfile=False)
    llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", quant)
    export_gguf(src, tmp_path / "ours.gguf", quant, modelfile=False)
    assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


def test_same_bytes_as_llama_quantize_on_pruned_smollm2(pruned_smollm2, tmp_path):
    """Hidden 576 is not a multiple of 256: the Q5_0 / Q8_0 fallbacks, as llama.cpp picks them."""
    export_gguf(pruned_smollm2, tmp_path / "f16.gguf", "F16", modelfile=False)
    llama_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", "Q4_K_M")
    res = export_gguf(pruned_smollm2, tmp_path / "ours.gguf", "Q4_K_M", modelfile=False)
    # attn_v of layers 2, 3 and the tied embedding want Q6_K -> Q8_0; ffn_down rows are 1536 long
    assert res.tensor_types == {"F32": 9, "Q8_0": 3, "Q5_0": 22, "Q6_K": 2, "Q4_K": 2}
    assert_same_tensors(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    # F16 logits of the pruned student, llama.cpp vs PyTorch
    ids = [1, 504, 3458, 282, 4649, 314, 216, 33, 34, 35, 30, 2]
    got, want = llama_logits(tmp_path / "f16.gguf", ids), source_logits(pruned_smollm2, ids)
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.999
