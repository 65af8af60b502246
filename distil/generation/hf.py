"""The transformers backend: batched `model.generate` with the KV cache and left padding.

Sampling does not use transformers' own sampler: it draws from one stream shared by the whole batch,
so a sample would depend on its batch-mates and a resumed run could not regenerate it. Instead
`generate` runs in greedy mode with `RowSampler` as the last logits processor: it applies temperature,
top-k, top-p and min-p to each row and draws the row's token by inverse CDF from the row's own
generator (seeded by `sample_seed`), leaving only that token finite, which greedy then picks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch

from distil.errors import DistilError
from distil.generation.params import GenParams
from distil.generation.prompts import Prompt, as_messages, is_ids


@dataclass
class Item:
    prompt_index: int
    sample_index: int
    ids: list[int]
    seed: int


def render(tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """Prompt token ids: through the chat template (with the assistant's generation prompt; the
    template decides about BOS, as apply_chat_template does) or as plain text (the tokenizer's own
    special tokens, e.g. BOS). Token ids (a pre-rendered prompt) are used as they are."""
    if is_ids(prompt):
        return list(prompt)
    if chat:
        text = tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if not isinstance(prompt, str):
        raise DistilError("generate: a messages prompt needs a chat template (chat is off, or the tokenizer has none)")
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def weights_fingerprint(model: Any) -> str:
    """sha256 over every parameter's name, shape and an evenly strided sample of its values: cheap (a
    few thousand values per tensor) and any training step changes it."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() // 4096)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and the model's generation_config EOS ids (instruct models often end turns with
    a token that is not the tokenizer's eos_token)."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None)
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def filter_logits(logits: torch.Tensor, p: GenParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as -inf on the removed tokens (rows: [B, V], fp32)."""
    scores = logits.float() / p.temperature
    if 0 < p.top_k < scores.shape[-1]:
        kth = torch.topk(scores, p.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = sorted_scores.softmax(-1)
        # drop a token when the tokens above it already hold top_p of the mass (the first is always kept)
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    if p.min_p > 0.0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return scores


class RowSampler:
    """Logits processor: one sampled token per row, from the row's own generator."""

    def __init__(self, params: GenParams, seeds: list[int]):
        self.params = params
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = filter_logits(scores, self.params).softmax(-1).double()
        cdf = probs.cumsum(-1)
        out = torch.full_like(scores, float("-inf"))
        for row, gen in enumerate(self.generators):
            u = torch.rand((), generator=gen, dtype=torch.float64) * cdf[row, -1].cpu()
            token = int(torch.searchsorted(cdf[row].cpu(), u.reshape(1), right=True).clamp(max=cdf.shape[-1] - 1))
            while probs[row, token] == 0:  # only after the clamp (rounding at the top end): a filtered tail token
                token -= 1
            out[row, token] = 0.0
        return out


class StopStrings:
    """Stopping criterion: a row is done when its generated text contains a stop string. Only the last
    `window` tokens are decoded each step (enough to hold any stop string), so the cost stays flat."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], start: int):
        self.tokenizer, self.stop, self.start = tokenizer, stop, start
        self.window = 2 * max(len(s) for s in stop) + 8

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        done = []
        for row in input_ids[:, self.start:].tolist():
            tail = self.tokenizer.decode(row[-self.window:], skip_special_tokens=True)
            done.append(any(s in tail for s in self.stop))
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def finish(tokenizer: Any, generated: list[int], eos: list[int], stop: tuple[str, ...]) -> tuple[str, str, int]:
    """(completion, finish reason, completion tokens) of one row. The completion ends before the first
    EOS or stop string, whichever comes first; the EOS is not counted as a completion token, the
    tokens that spell a stop string are (both as llama.cpp counts them)."""
    cut = next((i for i, t in enumerate(generated) if t in eos), None)
    ids = generated if cut is None else generated[:cut]
    text = _decode(tokenizer, ids)
    hits = [(text.find(s), s) for s in stop if s in text]
    if hits:
        pos, s = min(hits)
        lo, hi = 1, len(ids)  # fewest tokens whose text holds the stop string (monotone in the prefix length)
        while lo < hi:
            mid = (lo + hi) // 2
            if s in _decode(tokenizer, ids[:mid]):
                hi = mid
            else:
                lo = mid + 1
        return text[:pos], "stop", lo
    if cut is not None:
        return text, "stop", cut
    return text, "length", len(generated)


def generate_batch(model: Any, tokenizer: Any, items: list[Item], params: GenParams, eos: list[int],
                   pad_id: int) -> list[tuple[str, str, int]]:
    """One left-padded batch through model.generate; (completion, finish reason, completion tokens) per item."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    width = max(len(it.ids) for it in items)
    input_ids = torch.tensor([[pad_id] * (width - len(it.ids)) + it.ids for it in items])
    mask = torch.tensor([[0] * (width - len(it.ids)) + [1] * len(it.ids) for it in items])
    # num_beams > 1: beam search (greedy only, checked by GenParams); length_penalty 1 ranks finished hypotheses by
    # mean log-probability per token, early_stopping ends a row once num_beams hypotheses are finished
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=params.num_beams,
                              length_penalty=1.0, early_stopping=params.num_beams > 1,
                              eos_token_id=eos or None, pad_token_id=pad_id, use_cache=True)
    processors = LogitsProcessorList([] if params.greedy else [RowSampler(params, [it.seed for it in items])])
    criteria = StoppingCriteriaList([StopStrings(tokenizer, params.stop, width)] if params.stop else [])
    saved = model.generation_config
    # the model's own generation defaults (repetition penalty, sampling flags...) would silently change the
    # samples: only what GenParams records is applied
    model.generation_config = GenerationConfig()
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                 generation_config=config, logits_processor=processors, stopping_criteria=criteria)
    finally:
        model.generation_config = saved
    return [finish(tokenizer, row[width:], eos, params.stop) for row in out.cpu().tolist()]
