"""Training data: records (read by distil/readers.py) -> tokenized examples with loss masks -> batches.

Records come in three shapes, detected from the first record (every record must have the same one):
  - `{"text": ...}`: plain text; every token is a target; packed into fixed-length blocks
    (documents joined with EOS) when `data.pack` is on;
  - `{"prompt": ..., "response": ...}`: only the response tokens are targets;
  - `{"messages": [{"role", "content"}, ...]}`: the chat template is applied and only the
    assistant turns are targets.
An example is `{"input_ids": [...], "labels": [...]}` with labels aligned to input_ids (the causal
shift happens in the loss) and -100 on every token that is not a target.

Decisions (each guarded by a test in tests/test_data*.py):
  - BOS. When the tokenizer adds a BOS by itself (`tok("a")` starts with it: Llama, Gemma; not
    SmolLM2), every example starts with exactly one BOS: packed blocks cut mid-document get one
    inserted (block = [BOS] + the next seq_len-1 tokens of the stream, nothing lost or repeated),
    and a chat template that already renders BOS is not given a second. Models such as Gemma-3
    only work with BOS at position 0 (ppl 33 with it, 1,826 without), so a block without it would
    give garbage soft targets silently. A BOS is never a target (label -100): it is structure the
    tokenizer adds, not text the model should learn to write. Tokenizers that add no BOS produce
    the same examples as before.
  - Chat roles: system, developer (OpenAI's newer name for system), user, assistant, tool and
    ipython (Llama 3's tool-output role). Any other role is refused rather than rendered by a
    template that may silently drop or mislabel it; only assistant turns are targets.
  - Assistant masks come from the template itself. With `{% generation %}` markers the template's
    own assistant mask is used (cross-checked against the turn boundaries where those can be
    verified). Otherwise the turn boundaries come from partial renders (the conversation up to a
    turn with the generation prompt, and up to the end of that turn), and each partial render
    must be a token prefix of the full conversation: templates that render earlier turns
    differently (Qwen3 strips earlier turns' <think> reasoning) would otherwise put user tokens
    among the targets, so such records are refused with one line instead.
"""

from __future__ import annotations

import random
import re
from typing import Any, Iterable

import torch

from distil.errors import DistilError
from distil.readers import (BUILTIN, READERS, _json_type, _one_line, builtin_pydoc,  # noqa: F401 (re-exported)
                            read_records)

IGNORE = -100
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")


def record_kind(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DistilError(f"{where}: expected a mapping with 'text', or 'prompt' and 'response', or 'messages', "
                          f"found {type(record).__name__}")
    # A field of the wrong type is refused, unless a 'text' string makes it a text record with extra columns.
    has_text = isinstance(record.get("text"), str)
    messages = record.get("messages")
    if isinstance(messages, list):
        return "messages"
    if messages is not None and not has_text:
        raise DistilError(f"{where}: 'messages': expected a list of {{'role', 'content'}} objects, found "
                          f"{_json_type(messages)}")
    prompt, response = record.get("prompt"), record.get("response")
    if prompt is not None or response is not None:
        if isinstance(prompt, str) and isinstance(response, str):
            return "prompt_response"
        if not has_text:
            for key, value in (("prompt", prompt), ("response", response)):
                if value is None:
                    other = "response" if key == "prompt" else "prompt"
                    raise DistilError(f"{where}: expected 'prompt' and 'response' together, found '{other}' "
                                      f"without '{key}'")
                if not isinstance(value, str):
                    raise DistilError(f"{where}: '{key}': expected a string, found {_json_type(value)}")
    if record.get("text") is not None:
        if not isinstance(record["text"], str):
            raise DistilError(f"{where}: 'text': expected a string, found {_json_type(record['text'])}")
        return "text"
    keys = sorted(k for k, v in record.items() if v is not None)
    raise DistilError(f"{where}: expected a 'text' field, or 'prompt' and 'response', or 'messages' "
                      f"(strings / a list), found keys {keys}")


def _eos(tok: Any) -> int:
    eos = tok.eos_token_id
    if eos is None:
        raise DistilError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token")
    return int(eos)


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _bos(tok: Any) -> list[int]:
    # Only prepend BOS when the tokenizer would (SmolLM2's does not add one by itself).
    ids = tok("a")["input_ids"]
    return [tok.bos_token_id] if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id else []


def ensure_bos(tok: Any, ids: list[int]) -> list[int]:
    """`ids` starting with exactly the BOS the tokenizer would add (none when it adds none).

    For any sequence handed to a model whose tokenizer adds BOS (packed blocks, chat renders,
    generated records): such models are trained with BOS at position 0 and degrade badly without
    it. A sequence that already starts with BOS is returned unchanged, so BOS is never doubled.
    """
    bos = _bos(tok)
    ids = list(ids)
    return ids if not bos or ids[:1] == bos else bos + ids


def _check_messages(messages: list, where: str) -> None:
    if not messages:
        raise DistilError(f"{where}: 'messages': expected a non-empty list of {{'role', 'content'}} objects, "
                          f"found an empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DistilError(f"{where}: messages[{j}]: expected an object with 'role' and 'content', "
                              f"found {_json_type(m)}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise DistilError(f"{where}: messages[{j}].role: expected a string, found {_json_type(role)}")
        if role not in ROLES:
            raise DistilError(f"{where}: messages[{j}].role: expected one of "
                              + ", ".join(repr(r) for r in ROLES) + f", found {role[:40]!r}")
        if not isinstance(content, str):
            raise DistilError(f"{where}: messages[{j}].content: expected a string, found {_json_type(content)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DistilError(f"{where}: the conversation has no assistant turn to learn from")


def _render(tok: Any, messages: list[dict], where: str, add_generation_prompt: bool = False,
            assistant_mask: bool = False) -> dict:
    """The chat template's tokens (and its `{% generation %}` mask when asked); a template that
    refuses the conversation (e.g. roles that do not alternate) is bad input, not a crash."""
    try:
        out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt,
                                      return_dict=True, return_assistant_tokens_mask=assistant_mask)
    except Exception as exc:
        raise DistilError(f"{where}: the chat template could not render the conversation "
                          f"({type(exc).__name__}: {_one_line(exc)})") from None
    if not hasattr(out, "keys"):  # older transformers return the ids alone
        out = {"input_ids": out}
    return {k: list(v) for k, v in out.items() if k in ("input_ids", "assistant_masks")}


def _has_generation_markers(tok: Any) -> bool:
    template = getattr(tok, "chat_template", None)
    return isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def _turn_spans(tok: Any, messages: list[dict], ids: list[int], where: str) -> list[tuple[int, int]] | int:
    """[start, end) token spans of the assistant turns in the full render `ids`, from partial renders:
    the conversation before turn i with the generation prompt (where the assistant starts) and up to
    turn i (where it ends). Returns the index of the first turn whose partial renders are not token
    prefixes of the full render: there the template renders history differently and the tokens
    between the two lengths are not that turn's."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:i], where, add_generation_prompt=True)["input_ids"] if i else []
        upto = _render(tok, messages[: i + 1], where)["input_ids"]
        if not (ids[: len(head)] == head and ids[: len(upto)] == upto and len(head) <= len(upto)):
            return i
        spans.append((len(head), len(upto)))
    return spans


def _chat_example(tok: Any, messages: list[dict], where: str, fallback: str, turn_names: bool = True) -> dict:
    """Tokens of a rendered conversation; the labels keep exactly the assistant tokens.

    `fallback` is the way around a template whose assistant tokens cannot be located (for the
    one-line refusal); `turn_names` says whether the messages are the user's (to name them)."""
    ids = _render(tok, messages, where)["input_ids"]
    spans = _turn_spans(tok, messages, ids, where)
    # The template's mask maps characters to tokens through offsets, which only fast tokenizers have.
    if _has_generation_markers(tok) and getattr(tok, "is_fast", False):
        out = _render(tok, messages, where, assistant_mask=True)
        mask = out.get("assistant_masks")
        if out["input_ids"] != ids or mask is None or len(mask) != len(ids):
            raise DistilError(f"{where}: the chat template's {{% generation %}} mask does not line up with its "
                              f"tokens; {fallback}")
        marked = [k for k, v in enumerate(mask) if v]
        turns = [(i, m) for i, m in enumerate(messages) if m["role"] == "assistant"]
        # Cross-check the template's markers against the turn boundaries the partial renders give:
        # where every turn's boundaries are verifiable, marked tokens only inside assistant turns and
        # some in every non-empty one; otherwise at least nothing marked before the first assistant turn.
        bad = not marked
        if not bad and isinstance(spans, list):
            inside = {k for s, e in spans for k in range(s, e)}
            bad = any(k not in inside for k in marked) or any(
                m["content"] and not any(mask[s:e]) for (_, m), (s, e) in zip(turns, spans))
        elif not bad and turns[0][0] > 0:
            head = _render(tok, messages[: turns[0][0]], where, add_generation_prompt=True)["input_ids"]
            bad = ids[: len(head)] == head and marked[0] < len(head)
        if bad:
            raise DistilError(f"{where}: the chat template's {{% generation %}} markers disagree with its assistant "
                              f"turns (they mark other tokens or leave a turn unmarked); fix the markers, or "
                              f"{fallback}")
        labels = [t if v else IGNORE for t, v in zip(ids, mask)]
    else:
        if isinstance(spans, int):
            turn = f"messages[{spans}]: " if turn_names else ""
            raise DistilError(f"{where}: {turn}the chat template renders the conversation up to this turn differently "
                              f"from the whole conversation (not a token prefix of it), so the assistant tokens "
                              f"cannot be located; give the tokenizer a chat template "
                              f"with {{% generation %}} markers around assistant turns, or {fallback}")
        labels = [IGNORE] * len(ids)
        for s, e in spans:
            labels[s:e] = ids[s:e]
    full = ensure_bos(tok, ids)  # many templates render BOS themselves; add it only where one did not
    return {"input_ids": full, "labels": [IGNORE] * (len(full) - len(ids)) + labels}


def encode_supervised(tok: Any, record: dict, kind: str, use_template: bool, where: str) -> dict:
    """Prompt/response and chat records: targets are the response / assistant tokens only."""
    has_template = bool(getattr(tok, "chat_template", None)) and use_template
    if kind == "prompt_response":
        if has_template:
            msgs = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
            return _chat_example(tok, msgs, where, "set data.chat_template: false", turn_names=False)
        prompt = _bos(tok) + _encode(tok, record["prompt"])
        response = _encode(tok, record["response"]) + [_eos(tok)]
        return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}
    messages = record["messages"]
    _check_messages(messages, where)
    if not has_template:
        raise DistilError(f"{where}: 'messages' records need a tokenizer with a chat template, found none")
    return _chat_example(tok, messages, where, "write the data as prompt/response records (one per assistant turn)")


def pack_text(tok: Any, texts: Iterable[str], seq_len: int, pack: bool) -> list[dict]:
    """Plain text: documents joined with EOS and cut into blocks of exactly seq_len tokens.

    With a tokenizer that adds BOS, each document starts with BOS in the stream and every block
    starts with BOS too: a block that begins at a document start uses that document's BOS, any
    other block gets one inserted in front of the next seq_len-1 stream tokens, so no stream token
    is dropped or repeated. BOS positions are never targets.
    """
    if seq_len < 2:
        raise DistilError(f"data.seq_len: expected at least 2 tokens (an input and its next token), found {seq_len}")
    eos, bos = _eos(tok), _bos(tok)
    docs = [_encode(tok, t) + [eos] for t in texts]
    if not pack:
        out = []
        for d in docs:
            ids = (bos + d)[:seq_len]
            out.append({"input_ids": ids, "labels": [IGNORE] * len(bos) + ids[len(bos):]})
        return out
    stream: list[int] = []
    starts: set[int] = set()  # stream positions of the documents' BOS tokens
    for d in docs:
        if bos:
            starts.add(len(stream))
        stream.extend(bos + d)
    if not bos:
        blocks = [stream[i: i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
        return [{"input_ids": b, "labels": list(b)} for b in blocks]
    out, pos = [], 0
    while True:
        head = [] if pos in starts else bos
        end = pos + seq_len - len(head)
        if end > len(stream):
            break  # the remainder, shorter than a block, is dropped (as without BOS)
        ids = head + stream[pos:end]
        labels = [IGNORE if k == 0 or pos - len(head) + k in starts else t for k, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
        pos = end
    return out


def _question(record: dict, kind: str) -> str:
    """What a supervised record asks: its prompt, or the last user message before the first assistant turn."""
    if kind != "messages":
        return str(record["prompt"])
    asked = ""
    for m in record["messages"]:
        if m.get("role") == "assistant":
            break
        if m.get("role") == "user":
            asked = str(m.get("content", ""))
    return asked


def build_examples(records: list[dict], tok: Any, seq_len: int, pack: bool = True, chat_template: bool = True,
                   source: str = "data") -> list[dict]:
    kinds = [record_kind(r, f"{source}: record {i}") for i, r in enumerate(records)]
    kind = kinds[0]
    for i, k in enumerate(kinds):
        if k != kind:
            raise DistilError(f"{source}: record {i}: expected the same fields as record 0 ({kind}), found {k}")
    if kind == "text":
        examples = pack_text(tok, (r["text"] for r in records), seq_len, pack)
    else:
        examples = []
        for i, r in enumerate(records):
            ex = encode_supervised(tok, r, kind, chat_template, f"{source}: record {i}")
            ex = {k: v[:seq_len] for k, v in ex.items()}
            ex["question"] = _question(r, kind)  # for printing answers to held-out prompts (eval.answers)
            if any(v != IGNORE for v in ex["labels"][1:]):
                examples.append(ex)
    if not examples and kind == "text":
        raise DistilError(f"{source}: no training examples after tokenization: the whole corpus is shorter than "
                          f"one block of data.seq_len={seq_len} tokens")
    if not examples:
        raise DistilError(f"{source}: no training examples after tokenization: the prompt fills data.seq_len="
                          f"{seq_len} tokens in every record ({len(records)}), so every response is truncated away")
    return examples


def split(examples: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle, then the first eval_size examples are held out."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    if eval_size >= len(examples):
        raise DistilError(f"data.eval_size: expected fewer than the {len(examples)} examples available, "
                          f"found {eval_size}")
    held = [examples[i] for i in order[:eval_size]]
    train = [examples[i] for i in sorted(order[eval_size:])]
    return train, held


def load_examples(spec: Any, tok: Any, seed: int) -> tuple[list[dict], list[dict]]:
    """Recipe `data:` section -> (train examples, eval examples)."""
    records = read_records(spec.source, spec.max_records)
    examples = build_examples(records, tok, spec.seq_len, spec.pack, spec.chat_template, spec.source)
    return split(examples, spec.eval_size, seed)


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding is masked in attention and in the labels.

    Examples that all carry an integer "index" (their row in a teacher cache) also give batch["index"] [B].
    """
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if all("index" in e for e in examples):  # examples tagged with their cache position (methods/cache.py)
        batch["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
    return batch


def pad_id(tok: Any) -> int:
    return int(tok.pad_token_id if tok.pad_token_id is not None else _eos(tok))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation seeded by (seed, epoch), so a resumed run
    sees exactly the batches the uninterrupted run would have."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batch(examples: list[dict], index: int, batch_size: int, seed: int, rank: int = 0,
                world: int = 1) -> list[dict]:
    """Micro-batch number `index` of the global stream, this process's share of it.

    The stream is epoch after epoch of seeded permutations; global micro-batch `index` covers
    positions [index * B * world, (index + 1) * B * world) and process `rank` takes its B of them.
    """
    n = len(examples)
    start = (index * world + rank) * batch_size
    out, cache = [], {}
    for p in range(start, start + batch_size):
        epoch, pos = divmod(p, n)
        if epoch not in cache:
            cache[epoch] = epoch_order(n, seed, epoch)
        out.append(examples[cache[epoch][pos]])
    return out
