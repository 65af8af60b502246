"""Alignment of two tokenizations of one text, by character offsets (for distillation across tokenizers).

Two tokenizers cut the same text at different places: Gemma writes "Hello" + "▁▁" + "world", SmolLM2 writes
"Hello" + "Ġ" + "Ġworld". Each token covers a character span of the text; a **cut** is a character position where
one of a sequence's tokens ends (and the next starts). Positions where BOTH sequences cut are common cuts, and
between two consecutive common cuts lie one **group**: a run of tokens of each sequence covering exactly the same
characters (1:1 for most tokens of two English tokenizers, k:m where they disagree). At a group's first token both
models predict "what comes next" after exactly the same text, so their next-token distributions there are two
distributions over different vocabularies for the same event: that is what ULD / GOLD-style losses compare.

Where the spans come from:
  - `decoded_ends(tok, ids)`: for token ids we must keep as they are (the student's training examples), each
    token's end is the length of the decoded prefix ids[:i+1] (incremental decoding), when that prefix is a prefix
    of the decoded whole; a prefix ending inside a character (a byte-level piece of a multi-byte character decodes
    to U+FFFD) gives no cut: the token joins the next one. Special tokens (BOS, chat markers) decode to nothing
    (skip_special_tokens) and have zero width.
  - `offset_ends(offsets)`: for text we tokenize ourselves (the teacher's side), the fast tokenizer's character
    offsets; a token that overlaps the next (several byte pieces of one character share its offsets) gives no cut.
Zero-width tokens (ZERO) belong to no group: they are structure, not text.

`shared_pieces(tok_a, tok_b)`: the vocabulary pieces that exist as identical strings in both vocabularies (what the
piece decodes to alone; special/added tokens, undecodable byte pieces and strings that two ids of one vocabulary
share are left out, so the map is one-to-one).
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Any, Optional, Sequence

ZERO = -1  # a zero-width token (special token): in no group
End = Optional[int]  # a token's end character (a cut), None when it ends inside a character, or ZERO


@dataclass(frozen=True)
class Group:
    """Tokens a[0]:a[1] of one sequence and b[0]:b[1] of the other cover the same characters chars[0]:chars[1]."""

    a: tuple[int, int]
    b: tuple[int, int]
    chars: tuple[int, int]


def decoded_ends(tok: Any, ids: Sequence[int]) -> tuple[str, list[End]]:
    """(the decoded text, each token's end character) by incremental decoding (module docstring)."""
    ids = list(ids)
    kw = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    text = tok.decode(ids, **kw)
    prefixes = tok.batch_decode([ids[:i + 1] for i in range(len(ids))], **kw) if ids else []
    ends: list[End] = []
    last = 0
    for p in prefixes:
        if len(p) == last and text.startswith(p):
            ends.append(ZERO)  # added no text (a special token)
        elif text.startswith(p) and not p.endswith("\ufffd"):
            ends.append(len(p))
            last = len(p)
        else:
            ends.append(None)  # inside a character (or a decoder that rewrites the prefix): joins the next token
    return text, ends


def offset_ends(offsets: Sequence[tuple[int, int]]) -> list[End]:
    """Each token's end character from a fast tokenizer's offset mapping (module docstring)."""
    ends: list[End] = []
    for i, (s, e) in enumerate(offsets):
        if e <= s:
            ends.append(ZERO)
            continue
        nxt = next((o[0] for o in offsets[i + 1:] if o[1] > o[0]), None)
        ends.append(None if nxt is not None and nxt < e else int(e))
    return ends


def _groups_of(ends: Sequence[End], cuts: list[int]) -> dict[int, tuple[int, int]]:
    """group index (the common cut it ends at) -> (first token, last token + 1) of one sequence."""
    out: dict[int, tuple[int, int]] = {}
    pending: list[int] = []  # tokens that end inside a character: they belong with the next token that cuts
    for i, e in enumerate(ends):
        if e == ZERO:
            continue
        pending.append(i)
        if e is None:
            continue
        g = bisect_left(cuts, e)  # the first common cut at or after this token's end
        first = pending[0]
        lo, _ = out.get(g, (first, first))
        out[g] = (min(lo, first), i + 1)
        pending = []
    return out


def align(ends_a: Sequence[End], ends_b: Sequence[End]) -> list[Group]:
    """The groups of two tokenizations of one text (module docstring), in text order. Tokens after the last common
    cut (a text one tokenizer normalises differently at its end) are in no group."""
    cuts = sorted({e for e in ends_a if e not in (None, ZERO)} & {e for e in ends_b if e not in (None, ZERO)})
    ga, gb = _groups_of(ends_a, cuts), _groups_of(ends_b, cuts)
    out = []
    for g in sorted(set(ga) & set(gb)):
        if g >= len(cuts):
            continue
        out.append(Group(a=ga[g], b=gb[g], chars=(cuts[g - 1] if g else 0, cuts[g])))
    return out


def piece_strings(tok: Any) -> list[Optional[str]]:
    """What each id of the vocabulary decodes to alone; None for special/added tokens and byte pieces that are no
    text on their own (U+FFFD)."""
    specials = set(getattr(tok, "all_special_ids", []) or [])
    added = set(tok.get_added_vocab().values()) if hasattr(tok, "get_added_vocab") else set()
    texts = tok.batch_decode([[i] for i in range(len(tok))], skip_special_tokens=False,
                             clean_up_tokenization_spaces=False)
    return [None if (i in specials or i in added or not t or "\ufffd" in t) else t for i, t in enumerate(texts)]


def shared_pieces(tok_a: Any, tok_b: Any) -> tuple[list[int], list[int]]:
    """(ids in a, ids in b) of the pieces both vocabularies have as the same string, one-to-one, by string order."""
    maps = []
    for tok in (tok_a, tok_b):
        seen: dict[str, int] = {}
        dup: set[str] = set()
        for i, s in enumerate(piece_strings(tok)):
            if s is None:
                continue
            if s in seen:
                dup.add(s)
            seen[s] = i
        maps.append({s: i for s, i in seen.items() if s not in dup})
    common = sorted(set(maps[0]) & set(maps[1]))
    return [maps[0][s] for s in common], [maps[1][s] for s in common]
