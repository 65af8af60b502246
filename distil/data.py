"""Training data: read records, tokenize them into examples with loss masks, batch them.

Records come in three shapes, detected from the first record:
  - `{"text": ...}`: plain text; every token is a target; packed into fixed-length blocks
    (documents joined with EOS) when `data.pack` is on;
  - `{"prompt": ..., "response": ...}`: only the response tokens are targets;
  - `{"messages": [{"role", "content"}, ...]}`: the chat template is applied and only the
    assistant turns are targets.
An example is `{"input_ids": [...], "labels": [...]}` with labels aligned to input_ids (the causal
shift happens in the loss) and -100 on every token that is not a target.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Iterable

import torch

from distil.errors import DistilError

IGNORE = -100
READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def builtin_pydoc() -> list[dict]:
    """Python's own documentation topics (stdlib `pydoc_data`): ~465k characters of English prose."""
    from pydoc_data.topics import topics

    return [{"text": topics[k].strip()} for k in sorted(topics) if topics[k].strip()]


BUILTIN = {"pydoc": builtin_pydoc}


def read_records(source: str, max_records: int | None = None) -> list[dict]:
    """Records as plain dicts from a file, a save_to_disk directory or a built-in corpus."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise DistilError(f"data.source: unknown built-in corpus {name!r}; available: "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN))
        records = BUILTIN[name]()
    else:
        records = _read_path(Path(source))
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise DistilError(f"{source}: the dataset is empty (no records)")
    return records


def _read_path(path: Path) -> list[dict]:
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                or (path / "state.json").exists()):
            raise DistilError(f"{path}: expected a data file or a directory saved with datasets' save_to_disk, "
                              f"found a directory without dataset_info.json")
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DistilError(f"{path}: could not read the saved dataset ({type(exc).__name__})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [dict(r) for r in ds]
    if not path.is_file():
        raise DistilError(f"{path}: data file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DistilError(f"{path}: unsupported data file type {path.suffix!r}; expected one of "
                          + ", ".join(READERS))
    if path.stat().st_size == 0:
        raise DistilError(f"{path}: the dataset is empty (0 bytes)")
    try:
        if kind == "text":
            # One document per blank-line-separated paragraph group keeps prose together.
            text = path.read_text(encoding="utf-8")
            return [{"text": t.strip()} for t in text.split("\n\n") if t.strip()]
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    except DistilError:
        raise
    except UnicodeDecodeError:
        raise DistilError(f"{path}: expected UTF-8 text, found undecodable bytes") from None
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise DistilError(f"{path}: could not parse as {kind} ({first})") from None
    return [dict(r) for r in ds]


def record_kind(record: Any, where: str) -> str:
    if not isinstance(record, dict):
        raise DistilError(f"{where}: expected a mapping with 'text', or 'prompt' and 'response', or 'messages', "
                          f"found {type(record).__name__}")
    if isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return "prompt_response"
    if isinstance(record.get("text"), str):
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


def _chat_ids(tok: Any, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def encode_supervised(tok: Any, record: dict, kind: str, use_template: bool, where: str) -> dict:
    """Prompt/response and chat records: targets are the response / assistant tokens only."""
    has_template = bool(getattr(tok, "chat_template", None)) and use_template
    if kind == "prompt_response":
        if has_template:
            msgs = [{"role": "user", "content": record["prompt"]}]
            prompt = _chat_ids(tok, msgs, add_generation_prompt=True)
            full = _chat_ids(tok, msgs + [{"role": "assistant", "content": record["response"]}])
            if full[: len(prompt)] != prompt:
                raise DistilError(f"{where}: the chat template does not render the prompt as a prefix of the "
                                  f"conversation; set data.chat_template: false")
            return {"input_ids": full, "labels": [IGNORE] * len(prompt) + full[len(prompt):]}
        prompt = _bos(tok) + _encode(tok, record["prompt"])
        response = _encode(tok, record["response"]) + [_eos(tok)]
        return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}
    messages = record["messages"]
    for j, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DistilError(f"{where}: messages[{j}]: expected {{'role': str, 'content': str}}, found {m!r}"[:300])
    if not has_template:
        raise DistilError(f"{where}: 'messages' records need a tokenizer with a chat template, found none")
    ids = _chat_ids(tok, messages)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        # Render the conversation up to this turn twice: with the generation prompt (where the
        # assistant starts) and with the turn itself (where it ends); the tokens between are targets.
        start = len(_chat_ids(tok, messages[:i], add_generation_prompt=True))
        end = len(_chat_ids(tok, messages[: i + 1]))
        labels[start:end] = ids[start:end]
    if all(v == IGNORE for v in labels):
        raise DistilError(f"{where}: the conversation has no assistant turn to learn from")
    return {"input_ids": ids, "labels": labels}


def pack_text(tok: Any, texts: Iterable[str], seq_len: int, pack: bool) -> list[dict]:
    """Plain text: documents joined with EOS and cut into blocks of exactly seq_len tokens."""
    eos = _eos(tok)
    if not pack:
        out = []
        for t in texts:
            ids = (_bos(tok) + _encode(tok, t) + [eos])[:seq_len]
            out.append({"input_ids": ids, "labels": list(ids)})
        return out
    stream: list[int] = []
    for t in texts:
        stream.extend(_bos(tok) + _encode(tok, t) + [eos])
    blocks = [stream[i: i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


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
            if any(v != IGNORE for v in ex["labels"][1:]):
                examples.append(ex)
    if not examples:
        raise DistilError(f"{source}: no training examples after tokenization (is data.seq_len={seq_len} "
                          f"longer than the whole corpus, or is every response truncated away?)")
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
