"""Sampling parameters and per-sample seeds, shared by every generation backend.

A sample is addressed by (prompt index, sample index). Its randomness comes from its own seed,
`sample_seed(seed, prompt_index, sample_index)`, never from a stream shared with other samples: the
same sample is the same whatever batch it lands in, so a resumed run can regenerate exactly the
samples that are missing and the file ends up equal to an uninterrupted run's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from distil.errors import DistilError


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of one sample: the first 32-bit word of numpy's SeedSequence([seed, prompt, sample]).

    SeedSequence hashes its entropy words, so neighbouring (prompt, sample) pairs get unrelated
    seeds; 32 bits because llama.cpp's sampler takes a uint32 seed and both backends record the
    same number."""
    return int(np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class GenParams:
    """What changes the samples. Every field is recorded with each sample and in the run's identity.

    temperature 0 is greedy decoding (top_p/top_k/min_p are then unused). Otherwise the logits are
    divided by the temperature, then filtered by top_k (0 = off), top_p (1 = off) and min_p (0 = off),
    in that order (transformers' order; llama.cpp filters before the temperature, which matters only
    for top_p and min_p at temperature != 1)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    seed: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    num_beams: int = 1
    chat: bool | None = None  # None: render with the tokenizer's chat template when it has one

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check(self) -> "GenParams":
        """One line naming the parameter for anything out of range; returns self."""
        rules = [
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("temperature", self.temperature >= 0.0, ">= 0 (0 = greedy)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "in (0, 1]"),
            ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
            ("min_p", 0.0 <= self.min_p < 1.0, "in [0, 1)"),
            ("n", self.n >= 1, ">= 1"),
            ("seed", 0 <= self.seed < 2**32, "in [0, 2**32)"),
            ("num_beams", self.num_beams >= 1, ">= 1 (1 = no beam search)"),
        ]
        for name, ok, want in rules:
            if not ok:
                raise DistilError(f"generate: {name}: expected {want}, found {getattr(self, name)!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise DistilError(f"generate: stop: expected non-empty strings, found {list(self.stop)!r}")
        if self.greedy and self.n > 1:
            # n identical copies would be silently wasted compute (and a useless 'diverse' corpus)
            raise DistilError(f"generate: n: greedy decoding (temperature 0) gives {self.n} identical samples; "
                              f"set a temperature > 0 or n = 1")
        if self.num_beams > 1 and not self.greedy:
            raise DistilError(f"generate: num_beams: beam search is deterministic; expected temperature 0 with "
                              f"num_beams {self.num_beams}, found temperature {self.temperature}")
        return self

    def record(self) -> dict:
        """The JSON form stored with every sample (stop as a list)."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        if self.num_beams == 1:
            del d["num_beams"]  # records and identities written before beam search existed stay valid
        return d
