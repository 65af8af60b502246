"""Dark knowledge made visible: what a model's next-token distribution says beyond its argmax.

Hinton et al. (2015) call the teacher's non-argmax probabilities "dark knowledge": that "cat" gets 0.12 where
"dog" is the answer says how the teacher generalises, and a student trained on soft targets learns it. These
pure functions compute, per position, what `distil inspect` prints and draws (float64 throughout: the numbers
are read by people and compared with hand computations):

    p_T(v)          = softmax(z / T)(v)                   the soft targets at temperature T (T > 1 flattens)
    H(p)            = -sum_v p(v) log p(v)                 entropy, nats (0 log 0 = 0)
    outside top-1   = 1 - max_v p(v)                       the mass the argmax does not carry: the dark knowledge
    KL(p_t || p_s)  = sum_v p_t(v) (log p_t(v) - log p_s(v))   teacher -> student, per position (forward KL, the
                                                               divergence the default loss minimises)

Logits at position i are the model's prediction of token i + 1 (causal LM): position i is "after reading token
i". A position where teacher and student disagree is one with a large KL, or a different argmax.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distil.errors import DistilError


def tempered_softmax(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(z / T) over the last axis, in float64. T must be > 0."""
    if not temperature > 0:
        raise DistilError(f"temperature: expected a number > 0, found {temperature}")
    return torch.softmax(logits.to(torch.float64) / temperature, dim=-1)


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v) over the last axis (nats); terms with p = 0 are 0 (the limit of p log p)."""
    p = probs.to(torch.float64)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return -plogp.sum(-1)


def mass_outside_top1(probs: torch.Tensor) -> torch.Tensor:
    """1 - max_v p(v): the probability the argmax token does not carry (0 for a one-hot distribution,
    1 - 1/V for a uniform one)."""
    return 1.0 - probs.to(torch.float64).max(dim=-1).values


def kl_per_position(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) over the last axis, one value per position. Terms with
    p(v) = 0 are 0; a q(v) = 0 where p(v) > 0 gives +inf (the definition)."""
    p, q = p.to(torch.float64), q.to(torch.float64)
    safe_p = torch.where(p > 0, p, torch.ones_like(p))
    terms = torch.where(p > 0, p * (torch.log(safe_p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def top_k(probs: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    """(token ids, probabilities) of the k most probable tokens of one distribution [V], most probable first;
    ties broken by the smaller token id (deterministic)."""
    p = probs.to(torch.float64)
    _, order = torch.sort(p, descending=True, stable=True)  # stable: equal probabilities keep id order
    ids = order[:k].tolist()
    return ids, [float(p[v]) for v in ids]


@dataclass
class SoftTargets:
    """One model's next-token distribution at one position and one temperature."""

    temperature: float
    ids: list[int]
    probs: list[float]
    entropy: float
    outside_top1: float


@dataclass
class PositionView:
    """What `distil inspect` shows for one position: per model (name -> one SoftTargets per temperature), and
    with two models KL(first || second) at each temperature and whether their argmax differs (at T = 1; the
    argmax does not change with T)."""

    position: int
    token: int  # the token read at this position
    next_token: int | None  # the token that follows in the text (None at the last position)
    models: dict[str, list[SoftTargets]] = field(default_factory=dict)
    kl: dict[float, float] = field(default_factory=dict)
    argmax_differs: bool = False


def soft_targets(logits: torch.Tensor, temperatures: list[float], k: int) -> list[SoftTargets]:
    """The top-k, entropy and mass outside the top-1 of one position's logits [V] at every temperature."""
    out = []
    for t in temperatures:
        p = tempered_softmax(logits, t)
        ids, probs = top_k(p, k)
        out.append(SoftTargets(t, ids, probs, float(entropy(p)), float(mass_outside_top1(p))))
    return out


def inspect_positions(ids: list[int], logits: dict[str, torch.Tensor], positions: list[int],
                      temperatures: list[float], k: int) -> list[PositionView]:
    """One PositionView per position, from each model's logits [N, V] over the same N tokens `ids` (names in
    order: with two, the first is the teacher and KL is KL(teacher || student))."""
    names = list(logits)
    views = []
    for i in positions:
        view = PositionView(i, ids[i], ids[i + 1] if i + 1 < len(ids) else None)
        for name in names:
            view.models[name] = soft_targets(logits[name][i], temperatures, k)
        if len(names) == 2:
            a, b = (logits[n][i] for n in names)
            view.kl = {t: float(kl_per_position(tempered_softmax(a, t), tempered_softmax(b, t))) for t in temperatures}
            view.argmax_differs = int(a.argmax()) != int(b.argmax())
        views.append(view)
    return views


def disagreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL(teacher || student) per position [N], argmax differs per position [N] bool) at `temperature`."""
    kl = kl_per_position(tempered_softmax(teacher_logits, temperature), tempered_softmax(student_logits, temperature))
    return kl, teacher_logits.argmax(-1) != student_logits.argmax(-1)


def most_disagreeing(kl: torch.Tensor, differs: torch.Tensor, n: int = 5) -> list[int]:
    """The n positions where teacher and student disagree most: largest KL first, a different argmax breaking
    ties (then the earlier position)."""
    order = sorted(range(kl.shape[0]), key=lambda i: (-float(kl[i]), not bool(differs[i]), i))
    return order[:n]


def choose_panels(kl: torch.Tensor, differs: torch.Tensor, teacher_entropy: torch.Tensor, candidates: list[int],
                  n: int) -> list[tuple[int, list[str]]]:
    """The n positions (among `candidates`) a run's report shows, each with why it was chosen, in text order.

    Deterministic: the n - 1 positions where teacher and student disagree most (most_disagreeing: the largest
    KL(teacher || student) at T = 1, a different argmax breaking ties), plus the position where the teacher is
    most uncertain (the largest entropy at T = 1, the earlier position on ties): where its non-argmax
    probabilities carry the most. With n = 1, only the most disagreeing one; when the most uncertain position is
    already among the disagreeing ones, the next most disagreeing position takes its place."""
    if n < 1 or not candidates:
        return []
    idx = torch.tensor(candidates)
    ranked = [candidates[j] for j in most_disagreeing(kl[idx], differs[idx], len(candidates))]
    ent = [float(teacher_entropy[i]) for i in candidates]
    uncertain = candidates[max(range(len(candidates)), key=lambda j: (ent[j], -j))]
    why: dict[int, list[str]] = {}
    for rank, i in enumerate(ranked[:max(n - 1, 1)]):
        why[i] = [f"disagree most #{rank + 1}"]
    if n > 1:
        why.setdefault(uncertain, []).append("teacher most uncertain")
        for rank, i in enumerate(ranked):  # fill up when `uncertain` was one of the n - 1 already
            if len(why) >= n:
                break
            if i not in why:
                why[i] = [f"disagree most #{rank + 1}"]
    return sorted(why.items())
