"""Filters for a teacher-written (synthetic) corpus: plain functions, each returning the items it keeps (in their
order) and how many it removed, so a corpus's provenance can say what every filter took out.

    kept, removed = exact_dedup(samples, text=lambda s: s["completion"])

Every filter takes `items` (any objects) and `text` (item -> the string it judges; `str` by default). Words are
the tokens of `normalize(text)`: NFKC, case-folded, every run of non-word characters replaced by one space, so
"Hello,  World!" and "hello world" are the same words and the same exact duplicate.

  exact_dedup      the first item of each normalised text is kept.
  near_dedup       Jaccard similarity of word n-gram sets (shingles, n = 3 by default) >= threshold (0.7) with an
                   item kept earlier removes the item. `method="exact"` compares every pair of sets (O(N^2) set
                   operations, the default up to `EXACT_LIMIT` items); `"minhash"` estimates the Jaccard from
                   MinHash signatures (`num_perm` universal hashes (a x + b) mod (2^61 - 1) with a fixed seed) and
                   compares only the pairs that share an LSH band (bands of `rows` signature rows).
  length_filter    bounds on `measure(text)` (characters by default; a tokenizer's count for tokens).
  degenerate       empty, no letter or digit at all (only punctuation), or one word / one character repeated.
  repetition       fraction of repeated word n-grams, (total - distinct) / total, above `max_fraction`.
  decontaminate    any word n-gram (n = 13 by default, GPT-3's choice; Llama 2 used 8) shared with the evaluation
                   set's prompts and references removes the item. A reference shorter than n words counts as one
                   n-gram of its own length, so a short eval question copied into a sample is still found.
  verified         keeps the items a task's checker accepts (`distil.eval.tasks.verify(answer, gold)`).

`FilterReport` keeps the per-filter counts in the order the filters ran.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence, TypeVar

import numpy as np

T = TypeVar("T")
Text = Callable[[Any], str]
EXACT_LIMIT = 5000  # near_dedup(method="auto") compares all pairs exactly up to this many items
_NON_WORD = re.compile(r"[\W_]+")


# -- text ----------------------------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """NFKC, case-folded, punctuation and whitespace runs replaced by one space, stripped."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def words(text: str) -> list[str]:
    return normalize(text).split()


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """The set of contiguous n-grams; a sequence shorter than n has none."""
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingles(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams of a text; a text shorter than n words is one shingle (its whole word sequence)."""
    w = words(text)
    return ngrams(w, n) if len(w) >= n else ({tuple(w)} if w else set())


# -- the filters ---------------------------------------------------------------------------------------------------


def exact_dedup(items: Iterable[T], text: Text = str) -> tuple[list[T], int]:
    """Keep the first item of each normalised text."""
    seen: set[str] = set()
    kept, removed = [], 0
    for it in items:
        key = normalize(text(it))
        if key in seen:
            removed += 1
        else:
            seen.add(key)
            kept.append(it)
    return kept, removed


def _minhash(sets: list[set], num_perm: int, seed: int) -> np.ndarray:
    """[len(sets), num_perm] signatures: row i, column j = min over the set's elements x of h_j(x), with
    h_j(x) = (a_j x + b_j) mod p, p = 2^61 - 1, x a 32-bit hash of the element (BLAKE2b), a_j in [1, 2^31),
    b_j in [0, 2^32): a_j x + b_j < 2^63 + 2^32 stays exact in uint64."""
    rng = np.random.RandomState(seed)
    a = rng.randint(1, 2**31, size=num_perm, dtype=np.int64).astype(np.uint64)
    b = rng.randint(0, 2**32, size=num_perm, dtype=np.int64).astype(np.uint64)
    p = np.uint64((1 << 61) - 1)
    out = np.full((len(sets), num_perm), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i, s in enumerate(sets):
        if not s:
            continue
        x = np.array([int.from_bytes(hashlib.blake2b("\x1f".join(g).encode(), digest_size=4).digest(), "little")
                      for g in s], dtype=np.uint64)
        out[i] = ((a[:, None] * x[None, :] + b[:, None]) % p).min(axis=1)
    return out


def minhash_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of a Jaccard similarity: the fraction of equal signature entries."""
    return float((sig_a == sig_b).mean())


def near_dedup(items: Iterable[T], text: Text = str, *, n: int = 3, threshold: float = 0.7,
               method: str = "auto", num_perm: int = 128, rows: int = 4, seed: int = 0) -> tuple[list[T], int]:
    """Remove an item whose word n-gram set has Jaccard >= threshold with an item kept before it (first wins).

    method: "exact" (every pair of sets), "minhash" (estimated from signatures, candidates from LSH bands of
    `rows` rows: a pair at similarity s shares a band with probability 1 - (1 - s^rows)^(num_perm / rows), 0.9996
    at s = 0.7 with the defaults), or "auto" (exact up to EXACT_LIMIT items)."""
    items = list(items)
    if method not in ("auto", "exact", "minhash"):
        raise ValueError(f"near_dedup: method: expected auto, exact or minhash, found {method!r}")
    sets = [shingles(text(it), n) for it in items]
    kept_idx: list[int] = []
    if method == "exact" or (method == "auto" and len(items) <= EXACT_LIMIT):
        for i, s in enumerate(sets):
            if not any(jaccard(s, sets[k]) >= threshold for k in kept_idx):
                kept_idx.append(i)
    else:
        if num_perm % rows:
            raise ValueError(f"near_dedup: num_perm ({num_perm}) must be a multiple of rows ({rows})")
        sig = _minhash(sets, num_perm, seed)
        buckets: dict[tuple[int, bytes], list[int]] = {}
        for i in range(len(items)):
            keys = [(band, sig[i, band * rows:(band + 1) * rows].tobytes()) for band in range(num_perm // rows)]
            candidates = {k for key in keys for k in buckets.get(key, ())}
            if any(minhash_jaccard(sig[i], sig[k]) >= threshold for k in candidates):
                continue
            kept_idx.append(i)
            for key in keys:
                buckets.setdefault(key, []).append(i)
    return [items[i] for i in kept_idx], len(items) - len(kept_idx)


def length_filter(items: Iterable[T], text: Text = str, *, min_len: int = 1, max_len: int | None = None,
                  measure: Callable[[str], int] = len) -> tuple[list[T], int]:
    """Keep items with min_len <= measure(text) <= max_len (None: no upper bound)."""
    kept, removed = [], 0
    for it in items:
        size = measure(text(it))
        if size < min_len or (max_len is not None and size > max_len):
            removed += 1
        else:
            kept.append(it)
    return kept, removed


def degenerate_reason(text: str) -> str | None:
    """Why a text is degenerate, or None: 'empty', 'no letter or digit', 'one repeated word' (>= 2 words, all
    the same), 'one repeated character' (>= 3 non-space characters, all the same)."""
    stripped = text.strip()
    if not stripped:
        return "empty"
    if not any(c.isalnum() for c in stripped):
        return "no letter or digit"
    w = words(stripped)
    if len(w) >= 2 and len(set(w)) == 1:
        return "one repeated word"
    chars = [c for c in stripped if not c.isspace()]
    if len(chars) >= 3 and len(set(chars)) == 1:
        return "one repeated character"
    return None


def degenerate(items: Iterable[T], text: Text = str) -> tuple[list[T], int]:
    kept, removed = [], 0
    for it in items:
        if degenerate_reason(text(it)) is None:
            kept.append(it)
        else:
            removed += 1
    return kept, removed


def repeated_fraction(text: str, n: int = 3) -> float:
    """(total - distinct) / total over the text's word n-grams: 0 for no repeat (or fewer than n words), towards
    1 for a loop ('a b a b a b', n = 2: 5 bigrams, 2 distinct -> 0.6)."""
    w = words(text)
    total = len(w) - n + 1
    if total <= 0:
        return 0.0
    return (total - len(ngrams(w, n))) / total


def repetition(items: Iterable[T], text: Text = str, *, n: int = 3, max_fraction: float = 0.3) -> tuple[list[T], int]:
    """Remove items whose repeated_fraction(text, n) exceeds max_fraction (a looping generation)."""
    kept, removed = [], 0
    for it in items:
        if repeated_fraction(text(it), n) > max_fraction:
            removed += 1
        else:
            kept.append(it)
    return kept, removed


class Contamination:
    """The n-grams of an evaluation set (prompts and references), for `decontaminate`."""

    def __init__(self, references: Iterable[str], n: int = 13, min_words: int = 4):
        self.n = n
        self.grams: dict[int, set[tuple[str, ...]]] = {}  # length -> n-grams (shorter references: their length)
        for ref in references:
            w = words(ref)
            if len(w) < min(n, min_words):
                continue  # 'yes' or '42' says nothing about contamination
            size = min(n, len(w))
            self.grams.setdefault(size, set()).update(ngrams(w, size))

    def hits(self, text: str) -> bool:
        w = words(text)
        return any(not ngrams(w, size).isdisjoint(grams) for size, grams in self.grams.items())


def decontaminate(items: Iterable[T], references: Iterable[str] | Contamination, text: Text = str, *,
                  n: int = 13, min_words: int = 4) -> tuple[list[T], int]:
    """Remove every item that shares a word n-gram with the references (the evaluation set)."""
    index = references if isinstance(references, Contamination) else Contamination(references, n, min_words)
    kept, removed = [], 0
    for it in items:
        if index.hits(text(it)):
            removed += 1
        else:
            kept.append(it)
    return kept, removed


def verified(items: Iterable[T], check: Callable[[Any], bool]) -> tuple[list[T], int]:
    """Keep the items `check` accepts, e.g. `lambda s: task_verify(s["completion"], s["gold"])`."""
    kept, removed = [], 0
    for it in items:
        if check(it):
            kept.append(it)
        else:
            removed += 1
    return kept, removed


# -- the report ----------------------------------------------------------------------------------------------------


@dataclass
class FilterReport:
    """Counts removed by each filter, in the order they ran, with the size before and after."""

    total: int
    removed: dict[str, int] = field(default_factory=dict)

    @property
    def kept(self) -> int:
        return self.total - sum(self.removed.values())

    def apply(self, name: str, items: list[T], fn: Callable[..., tuple[list[T], int]], *args: Any,
              **kwargs: Any) -> list[T]:
        """Run one filter on the items still kept and record what it removed under `name`."""
        kept, removed = fn(items, *args, **kwargs)
        self.removed[name] = self.removed.get(name, 0) + removed
        return kept

    def line(self) -> str:
        """'240 samples: exact duplicates -3, near duplicates -5, ... -> 212 kept'."""
        parts = ", ".join(f"{name} -{count}" for name, count in self.removed.items())
        return f"{self.total} samples: {parts or 'no filter'} -> {self.kept} kept"

    def record(self) -> dict:
        return {"total": self.total, "removed": dict(self.removed), "kept": self.kept}
