"""Tiny, deterministic models and tokenizers for tests and examples (no downloads).

`char_tokenizer()` is a character-level `PreTrainedTokenizerFast` (WordLevel model, one token per
character, ChatML special tokens and chat template); `save_tiny_model(dir, ...)` writes a random
Llama with that tokenizer as a Hugging Face directory (safetensors).
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def char_tokenizer(extra_chars: str = "", add_bos: bool = False) -> Any:
    """One token per printable character (+ `extra_chars`) after the specials. `add_bos`: the tokenizer puts `<s>`
    in front of every encoded text, as Llama's and Gemma's do (a model trained that way can start writing from
    nothing: the teacher of teacher-written questions); off, it adds nothing, as SmolLM2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) | set(extra_chars))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # any char, newlines too
    tk.decoder = decoders.Fuse()
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    tok.chat_template = CHATML
    return tok


def tiny_llama_config(vocab_size: int = 106, **overrides: Any) -> Any:
    from transformers import LlamaConfig

    cfg = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
               tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def save_tiny_model(path: str | Path, seed: int = 0, tokenizer: Any = None, **overrides: Any) -> Path:
    """A random tiny Llama + tokenizer saved as a Hugging Face directory; returns the path."""
    from transformers import LlamaForCausalLM

    path = Path(path)
    tok = tokenizer or char_tokenizer()
    torch.manual_seed(seed)
    overrides.setdefault("vocab_size", len(tok))
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
