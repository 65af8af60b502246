"""Tiny tokenizers, chat templates and a fake model for the data tests (no downloads)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from distil.testing import CHATML, char_tokenizer

# ChatML whose first token is BOS, rendered by the template itself (as Llama 3's and Gemma's do).
CHATML_BOS = "{{ bos_token }}" + CHATML

# Qwen3-like: the reasoning (`<think>...</think>`) of every assistant turn but the last is dropped,
# so the conversation up to turn i renders turn i differently from the whole conversation.
QWEN3_LIKE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- if not loop.last and '</think>' in content %}{%- set content = content.split('</think>')[-1] %}{%- endif %}"
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# The same template with `{% generation %}` markers around what the assistant writes.
QWEN3_LIKE_GENERATION = QWEN3_LIKE.replace(
    "{{- '<|im_start|>assistant\n' + content + '<|im_end|>\n' }}",
    "{{- '<|im_start|>assistant\n' }}{%- generation %}{{- content + '<|im_end|>\n' }}{%- endgeneration %}")

# Markers that wrap the user turns instead: a broken template the cross-check must catch.
CHATML_WRONG_GENERATION = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- generation %}"
    "{{- '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}{%- endgeneration %}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
QWEN3_LIKE_WRONG_GENERATION = QWEN3_LIKE.replace(
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}",
    "{%- else %}{%- generation %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{%- endgeneration %}")
assert QWEN3_LIKE_WRONG_GENERATION != QWEN3_LIKE


def bos_char_tokenizer(template: str | None = CHATML) -> Any:
    """distil.testing's char tokenizer, but one that adds `<s>` in front of every encoded text (as
    Llama's and Gemma's do), with the given chat template."""
    from tokenizers.processors import TemplateProcessing

    tok = char_tokenizer()
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                              special_tokens=[("<s>", bos)])
    tok.chat_template = template
    return tok


class BosGated(torch.nn.Module):
    """A fake LM that only works with BOS at position 0, like Gemma-3: rows that start with BOS put
    logit `strength` on the successor `table[token]` of each token (uniform where the table has none),
    rows that do not are uniform everywhere."""

    def __init__(self, table: dict[int, int], vocab: int, bos: int, strength: float):
        super().__init__()
        self.vocab, self.bos, self.strength = vocab, bos, strength
        nxt = torch.full((vocab,), -1, dtype=torch.long)
        for a, b in table.items():
            nxt[a] = b
        self.register_buffer("nxt", nxt)

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> Any:
        nxt = self.nxt[input_ids]  # [B, T]
        good = (input_ids[:, :1] == self.bos) & (nxt >= 0)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits.scatter_(2, nxt.clamp(min=0)[..., None], (self.strength * good.float())[..., None])
        return SimpleNamespace(logits=logits)
