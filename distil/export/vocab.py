"""Tokenizer -> GGUF: the vocabulary, its token types, merges or scores, special ids, chat template.

Two tokenizer families are written, the ones llama.cpp runs for llama / mistral / qwen2 models:

* GPT-2 style byte-level BPE (``tokenizer.ggml.model = "gpt2"``): tokens, types, merges and a
  pre-tokenizer name (``tokenizer.ggml.pre``) that llama.cpp knows. llama.cpp splits text with a
  regex chosen by that name, so the name is read off the ``pre_tokenizer`` of tokenizer.json
  (the regex is what the name stands for) and an unknown one is refused here, before a file is
  written that llama.cpp would refuse at load time.
* SentencePiece (``"llama"``, pre ``"default"``): tokens, scores and types from tokenizer.model,
  or, for a tokenizer.json-only byte-fallback BPE (what transformers saves for SPM models), scores
  derived from the merge ranks so that llama.cpp's highest-score-first merging reproduces BPE.

Only json / sentencepiece are read: no transformers, no remote code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from distil.errors import DistilError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# The GPT-2 split regex and the two common Split(...) patterns of tokenizer.json files.
_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
              r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: pre-tokenizer names this exporter recognises, as a signature of tokenizer.json's pre_tokenizer
_PRE_SIGNATURES = {
    ("bytelevel+regex",): "gpt-2",
    ("digits", "bytelevel+regex"): "smollm",
    ("split:" + _LLAMA3_RE, "bytelevel"): "llama-bpe",
    ("split:" + _QWEN2_RE, "bytelevel"): "qwen2",
}
#: names llama.cpp (llama-vocab.cpp) accepts for tokenizer.ggml.pre; a user may pass any of them
KNOWN_PRE = ("default", "gpt-2", "llama-bpe", "llama3", "qwen2", "smollm", "starcoder", "refact",
             "deepseek-llm", "deepseek-coder", "deepseek-v3", "deepseek-r1-qwen", "falcon", "mpt",
             "command-r", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "jais", "tekken",
             "bloom", "gpt3-finnish", "exaone", "chameleon", "minerva-7b", "gpt-4o", "superbpe",
             "trillion", "bailingmoe", "seed-coder", "hunyuan", "kimi-k2", "grok-2")


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer.json, ...), or DistilError saying why not."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DistilError(f"{path}: expected a JSON object, found invalid JSON ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:100] if str(exc) else ''})") from None
    if not isinstance(data, dict):
        raise DistilError(f"{path}: expected a JSON object, found a {type(data).__name__}")
    return data


@dataclass
class Vocab:
    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str | bytes]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    add_bos: bool | None = None
    extra: dict = field(default_factory=dict)


def _signature(pre: dict | None) -> tuple[str, ...]:
    """The pre_tokenizer of a tokenizer.json as a tuple of step names (regexes spelled out)."""
    if pre is None:
        steps = []
    else:
        steps = pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]
    sig = []
    for s in steps:
        if s["type"] == "ByteLevel":
            sig.append("bytelevel+regex" if s.get("use_regex", True) else "bytelevel")
        elif s["type"] == "Digits" and s.get("individual_digits"):
            sig.append("digits")
        elif s["type"] == "Split" and "Regex" in s.get("pattern", {}):
            sig.append("split:" + s["pattern"]["Regex"])
        else:
            sig.append(s["type"])
    return tuple(sig)


def pre_tokenizer_name(tok: dict, path: Path) -> str:
    """llama.cpp's name for the pre-tokenizer of tokenizer.json ``tok`` (DistilError if none)."""
    sig = _signature(tok.get("pre_tokenizer"))
    if sig in _PRE_SIGNATURES:
        return _PRE_SIGNATURES[sig]
    raise DistilError(
        f"{path}: pre_tokenizer {json.dumps(tok.get('pre_tokenizer'))[:200]} is not one distil can "
        f"name for llama.cpp (recognised: GPT-2 ByteLevel, SmolLM Digits+ByteLevel, Llama-3 and "
        f"Qwen2 Split regexes); pass pre_tokenizer=NAME with one of: {', '.join(KNOWN_PRE)}")


def _looks_special(token: str) -> bool:
    return bool(re.fullmatch(r"<\|.*\|>|<(s|/s|unk|pad|eos|bos|mask)>", token))


def _bpe(tok: dict, path: Path, n_vocab: int, pre: str | None) -> Vocab:
    model = tok["model"]
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    _check_size(id_to_tok, n_vocab, path)
    tokens, types = [], []
    for i in range(n_vocab):
        t = id_to_tok.get(i)
        if t is None:  # embedding rows past the tokenizer (padded vocab)
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        if i in added:
            types.append(CONTROL if added[i].get("special") or _looks_special(t) else USER_DEFINED)
        else:
            types.append(NORMAL)
        tokens.append(t)
    if pre is None:
        pre = pre_tokenizer_name(tok, path)
    elif pre not in KNOWN_PRE:
        raise DistilError(f"pre_tokenizer={pre!r} is not a llama.cpp pre-tokenizer; expected one "
                          f"of: {', '.join(KNOWN_PRE)}")
    return Vocab("gpt2", pre, tokens, types)


def _byte_encoder() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _chars(tok: dict, path: Path, n_vocab: int) -> Vocab:
    """A character-level WordLevel tokenizer as byte-level BPE: one token per character.

    Each character becomes the byte-level spelling of its UTF-8 bytes; multi-byte characters get
    the merges that glue their bytes back together, so llama.cpp tokenizes character by character.
    """
    enc = _byte_encoder()
    model, added = tok["model"], {a["content"] for a in tok.get("added_tokens", [])}
    long = [t for t in model["vocab"] if t not in added and len(t) != 1]
    if long:
        raise DistilError(f"{path}: a WordLevel tokenizer can be exported only when every token is "
                          f"one character (llama.cpp has no word-level vocabulary); found {long[:3]}")
    vocab, merges = {}, []
    for t, i in model["vocab"].items():
        if t in added:
            vocab[t] = i
            continue
        symbols = [enc[b] for b in t.encode("utf-8")]
        for k in range(1, len(symbols)):
            merges.append(f"{''.join(symbols[:k])} {symbols[k]}")
        vocab["".join(symbols)] = i
    # llama.cpp refuses a BPE vocabulary without a merges key (and gguf-py drops empty arrays):
    # a merge of two NUL bytes is harmless, since a merged symbol that is not in the vocabulary
    # is split back into its byte tokens
    merges = list(dict.fromkeys(merges)) or [f"{enc[0]} {enc[0]}"]
    out = _bpe(dict(tok, model={"type": "BPE", "vocab": vocab}), path, n_vocab, "gpt-2")
    out.extra["merges"] = merges
    return out


def _check_size(id_to_tok: dict, n_vocab: int, path: Path) -> None:
    if id_to_tok and max(id_to_tok) >= n_vocab:
        raise DistilError(f"{path}: tokenizer has token id {max(id_to_tok)} but the model's "
                          f"embedding has only {n_vocab} rows (config.json vocab_size)")


def _spm_model(path: Path, n_vocab: int) -> Vocab:
    """SentencePiece tokenizer.model: pieces, scores and types straight from the model proto."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:  # pragma: no cover - sentencepiece is a transformers dependency
        raise DistilError(f"{path}: reading a SentencePiece tokenizer.model needs the "
                          f"'sentencepiece' package (pip install sentencepiece)") from e
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    n = sp.vocab_size()
    _check_size({i: None for i in range(n)}, n_vocab, path)
    tokens, scores, types = [], [], []
    for i in range(n):
        tokens.append(sp.IdToPiece(i).encode("utf-8"))
        scores.append(sp.GetScore(i))
        types.append(UNKNOWN if sp.IsUnknown(i) else CONTROL if sp.IsControl(i)
                     else UNUSED if sp.IsUnused(i) else BYTE if sp.IsByte(i) else NORMAL)
    _pad(tokens, scores, types, n_vocab)
    dummy = sp.EncodeAsPieces("a")[:1] == ["\u2581a"]  # add_dummy_prefix in the normalizer spec
    return Vocab("llama", "default", tokens, types, scores, add_space_prefix=dummy)


def _spm_json(tok: dict, path: Path, n_vocab: int) -> Vocab:
    """Byte-fallback BPE in tokenizer.json (an SPM model as transformers saves it).

    llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose concatenation has the
    highest score; scoring a token by minus the rank of the merge that makes it replays BPE.
    """
    model = tok["model"]
    id_to_tok = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    _check_size(id_to_tok, n_vocab, path)
    rank: dict[str, int] = {}
    for r, m in enumerate(model.get("merges", [])):
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        rank.setdefault(a + b, r)
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        t = id_to_tok.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
            continue
        tokens.append(t)
        scores.append(-float(rank[t]) if t in rank else 0.0)
        if i in added and added[i].get("special"):
            types.append(UNKNOWN if t == model.get("unk_token") else CONTROL)
        elif i in added:
            types.append(USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", t):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    norm = json.dumps(tok.get("normalizer")) + json.dumps(tok.get("pre_tokenizer"))
    prefix = any(k in norm for k in ('"Prepend"', '"prepend_scheme": "always"',
                                     '"prepend_scheme": "first"', '"add_prefix_space": true'))
    return Vocab("llama", "default", tokens, types, scores, add_space_prefix=prefix)


def _pad(tokens: list, scores: list, types: list, n_vocab: int) -> None:
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(UNUSED)


def read_vocab(model_dir: Path, n_vocab: int, pre: str | None = None) -> Vocab:
    """The tokenizer of ``model_dir`` as GGUF fields, padded to the ``n_vocab`` embedding rows."""
    tj = model_dir / "tokenizer.json"
    tok = read_json_object(tj) if tj.is_file() else None
    if tok is not None and not isinstance(tok.get("model"), dict):
        raise DistilError(f"{tj}: model: expected a tokenizer model object, found {str(tok.get('model'))[:60]}")
    kind = (tok or {}).get("model", {}).get("type")
    byte_fallback = (tok or {}).get("model", {}).get("byte_fallback", False)
    if tok is not None and kind == "BPE" and not byte_fallback:
        return _bpe(tok, tj, n_vocab, pre)
    if tok is not None and kind == "WordLevel":
        return _chars(tok, tj, n_vocab)
    if (model_dir / "tokenizer.model").is_file():
        return _spm_model(model_dir / "tokenizer.model", n_vocab)
    if tok is not None and kind == "BPE" and byte_fallback:
        return _spm_json(tok, tj, n_vocab)
    found = f"a {kind} tokenizer.json" if tok is not None else "no tokenizer.json or tokenizer.model"
    raise DistilError(f"{model_dir}: expected a byte-level BPE tokenizer.json, a SentencePiece "
                      f"tokenizer (tokenizer.model / byte-fallback BPE) or a character-level "
                      f"WordLevel one, found {found}")


def add_vocab(writer, model_dir: Path, vocab: Vocab, n_vocab: int) -> dict:
    """Write the tokenizer.* keys; returns {"chat_template", "eos"} (texts) for the Modelfile."""
    from gguf import SpecialVocab

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special = SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    if "merges" in vocab.extra:  # merges made up for a character-level vocabulary
        special.merges = vocab.extra["merges"]
    # llama.cpp's default for add_bos differs by tokenizer type: always write what HF does
    special.add_special_token.setdefault("bos", vocab.model == "llama")
    special.add_to_gguf(writer, quiet=True)
    template = special.chat_template
    if isinstance(template, list):  # several named templates: the Modelfile takes the default
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    eos = special.special_token_ids.get("eos")
    return {"chat_template": template, "eos": None if eos is None else _text(vocab.tokens[eos])}


def _text(t: str | bytes) -> str:
    return t.decode("utf-8", "replace") if isinstance(t, bytes) else t
