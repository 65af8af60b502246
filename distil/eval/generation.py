"""Generation metrics: what a model writes, beyond its loss.

Each metric is a plain function with its formula in the docstring; `generation_metrics` computes all of them
from generation records and returns one dict. A generation record is a mapping with

    prompt_index        int: which prompt (several samples of one prompt share it)
    completion          str: the text the model wrote (prompt excluded)
    finish_reason       "stop" (EOS or a stop string) or "length" (cut at max new tokens); others are kept
    completion_tokens   int: number of generated tokens

(the names of OpenAI's API and of `distil generate`'s JSONL; extra keys are ignored).

Tokenization for distinct-n and self-BLEU: whitespace (`str.split`) unless a `tokenize` function is given
(e.g. a tokenizer's `encode`); sequences of token ids may be passed to `distinct_n`, `bleu`, `self_bleu`
directly. Whitespace tokens make the numbers comparable across models with different tokenizers.
"""

from __future__ import annotations

import bisect
import math
from collections import Counter
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence

import torch

from distil.errors import DistilError

Tokens = Sequence[Hashable]


def _tokens(text: Any, tokenize: Callable[[str], Tokens] | None = None) -> list:
    if isinstance(text, str):
        return list(tokenize(text)) if tokenize is not None else text.split()
    return list(text)


def _ngrams(tokens: Sequence, n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# -- correctness ---------------------------------------------------------------------------------------------------


def accuracy(completions: Sequence[str], golds: Sequence[Any], verify: Callable[[str, Any], bool]) -> float:
    """accuracy = (1/N) sum_i [verify(completion_i, gold_i)]: the fraction of completions whose answer is right
    (an answer that cannot be extracted counts as wrong)."""
    if len(completions) != len(golds):
        raise DistilError(f"accuracy: expected one gold answer per completion, found {len(completions)} "
                          f"completions and {len(golds)} answers")
    if not completions:
        raise DistilError("accuracy: expected at least one completion, found none")
    return sum(bool(verify(c, g)) for c, g in zip(completions, golds)) / len(completions)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code"): the probability that at least one of k samples drawn without replacement from
    the n is correct,

        pass@k = 1 - C(n - c, k) / C(n, k).

    The binomials overflow for large n, so the ratio is computed as a product:
        C(n-c, k) / C(n, k) = prod_{j=0}^{k-1} (n-c-j)/(n-j) = prod_{i=n-c+1}^{n} (1 - k/i)
    (the two products hold the same factors, reindexed). When n - c < k every k-subset holds a correct sample
    and pass@k = 1. k > n cannot be estimated from n samples and is refused.
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise DistilError(f"pass@k: {name}: expected an integer, found {v!r}")
    if k < 1:
        raise DistilError(f"pass@k: k: expected an integer >= 1, found {k}")
    if not 0 <= c <= n:
        raise DistilError(f"pass@k: expected 0 <= c <= n correct samples, found c={c}, n={n}")
    if k > n:
        raise DistilError(f"pass@{k}: needs at least k={k} samples per prompt, found n={n}; generate n >= {k} "
                          f"samples or ask for a smaller k")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


# -- diversity -----------------------------------------------------------------------------------------------------


def distinct_n(texts: Iterable[Any], n: int = 2, tokenize: Callable[[str], Tokens] | None = None) -> float:
    """distinct-n (Li et al. 2016) = |unique n-grams| / |n-grams| over a set of completions.

    n-grams are counted inside each completion (none spans two); "unique" is over the whole set. 1.0 = no
    n-gram repeats anywhere; low values = repetition within or across samples (mode collapse). A set without
    any n-gram (all completions shorter than n tokens) gives 0.0.
    """
    if n < 1:
        raise DistilError(f"distinct-n: n: expected an integer >= 1, found {n}")
    seen: set = set()
    total = 0
    for text in texts:
        toks = _tokens(text, tokenize)
        grams = [tuple(toks[i:i + n]) for i in range(len(toks) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def _bleu_from(c: int, r: int, matches: Sequence[int], totals: Sequence[int]) -> float:
    """BLEU from its sufficient statistics (see `bleu`)."""
    if c == 0:
        return 1.0 if r == 0 else 0.0
    if matches[0] == 0:
        return 0.0
    log_p = 0.0
    for n, (m, t) in enumerate(zip(matches, totals), start=1):
        p = m / t if n == 1 else (m + 1) / (t + 1)  # add-one smoothing for n >= 2 (BLEU+1)
        log_p += math.log(p) / len(matches)  # uniform weights 1/N: the geometric mean of the p_n
    brevity = 1.0 if c > r else math.exp(1.0 - r / c)
    return brevity * math.exp(log_p)


def _closest(lengths_sorted: Sequence[int], c: int) -> int:
    """The length closest to c; on a tie the shorter one (Papineni et al.'s 'best match length')."""
    j = bisect.bisect_left(lengths_sorted, c)
    best = None
    for cand in lengths_sorted[max(j - 1, 0): j + 1]:
        if best is None or (abs(cand - c), cand) < (abs(best - c), best):
            best = cand
    return best


def bleu(hypothesis: Any, references: Sequence[Any], max_n: int = 4,
         tokenize: Callable[[str], Tokens] | None = None) -> float:
    """Sentence BLEU (Papineni et al. 2002) of one hypothesis against references, uniform weights 1/N, N = 4:

        BLEU = BP * exp( sum_{n=1}^{N} (1/N) log p_n )
        p_n  = sum_g min(count_hyp(g), max_ref count_ref(g)) / sum_g count_hyp(g)   (clipped n-gram precision)
        BP   = 1 if c > r else exp(1 - r/c)   (c = hypothesis length, r = the reference length closest to c,
                                               the shorter on a tie)

    Smoothing (a single sentence often has no matching 4-gram, which would make BLEU 0): add-one for n >= 2,
    p_n = (m_n + 1) / (t_n + 1) (Lin & Och 2004, "BLEU+1"); p_1 is not smoothed, so no common word gives 0.
    A hypothesis identical to a reference scores exactly 1 (every p_n = 1, BP = 1) whatever its length. An
    empty hypothesis scores 0, or 1 if a reference is empty too.
    """
    if not references:
        raise DistilError("BLEU: expected at least one reference, found none")
    hyp = _tokens(hypothesis, tokenize)
    refs = [_tokens(r, tokenize) for r in references]
    matches, totals = [], []
    for n in range(1, max_n + 1):
        h = _ngrams(hyp, n)
        best: Counter = Counter()
        for ref in refs:
            best |= _ngrams(ref, n)  # Counter union = elementwise max: the clipping count
        matches.append(sum(min(k, best[g]) for g, k in h.items()))
        totals.append(sum(h.values()))
    return _bleu_from(len(hyp), _closest(sorted(len(r) for r in refs), len(hyp)), matches, totals)


def self_bleu(texts: Sequence[Any], max_n: int = 4, tokenize: Callable[[str], Tokens] | None = None) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen) = (1/N) sum_i BLEU(text_i, references = all the other texts).

    High = the samples repeat each other (diversity collapse); 1.0 = identical samples. Same BLEU as `bleu`.
    Computed in one pass over the n-grams rather than N separate BLEUs: for each n-gram the largest and the
    second-largest count over the texts (and the owner of the largest) give max over the others' counts
    for every i at once; the closest other length comes from the sorted lengths with i's own removed.
    """
    toks = [_tokens(t, tokenize) for t in texts]
    if len(toks) < 2:
        raise DistilError(f"self-BLEU: expected at least 2 texts (each is scored against the others), "
                          f"found {len(toks)}")
    lengths = Counter(len(t) for t in toks)
    distinct_lengths = sorted(lengths)
    stats = [([0] * max_n, [0] * max_n) for _ in toks]
    for n in range(1, max_n + 1):
        counts = [_ngrams(t, n) for t in toks]
        top: dict[tuple, list] = {}  # n-gram -> [largest count, its owner, second-largest count]
        for i, cnt in enumerate(counts):
            for g, k in cnt.items():
                b = top.get(g)
                if b is None:
                    top[g] = [k, i, 0]
                elif k > b[0]:
                    b[2], b[0], b[1] = b[0], k, i
                elif k > b[2]:
                    b[2] = k
        for i, cnt in enumerate(counts):
            m = 0
            for g, k in cnt.items():
                b = top[g]
                m += min(k, b[2] if b[1] == i else b[0])
            stats[i][0][n - 1] = m
            stats[i][1][n - 1] = sum(cnt.values())
    scores = []
    for i, t in enumerate(toks):
        others = distinct_lengths if lengths[len(t)] > 1 else [x for x in distinct_lengths if x != len(t)]
        scores.append(_bleu_from(len(t), _closest(others, len(t)), *stats[i]))
    return sum(scores) / len(scores)


# -- the model's uncertainty ---------------------------------------------------------------------------------------


def token_entropy_sum(logits: torch.Tensor, mask: torch.Tensor | None = None,
                      chunk: int = 1024) -> tuple[float, int]:
    """(sum of H_t, number of tokens) over the positions where `mask` is true (all if None), where

        H_t = -sum_v p_t(v) log p_t(v),   p_t = softmax(logits_t)   (nats)

    `logits` [..., V] may be logits or log-probs (log_softmax of log-probs is the identity), any float dtype:
    computed in float32 (float64 if given float64), chunk by chunk over positions. Terms with p = 0 (a -inf
    logit) are 0 (the limit of p log p). Sums from several batches add up to one token-weighted mean."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise DistilError(f"token entropy: expected a mask of shape {tuple(logits.shape[:-1])}, found "
                              f"{tuple(mask.shape)}")
        flat = flat[mask.reshape(-1).bool()]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, flat.shape[0], chunk):
            logp = torch.log_softmax(flat[start:start + chunk].to(dtype), dim=-1)
            p = logp.exp()
            plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
            total += -plogp.sum(dtype=torch.float64)
    return float(total), int(flat.shape[0])


def mean_token_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Mean predictive entropy over generated tokens: (1/|M|) sum_{t in M} H_t (see `token_entropy_sum`);
    uniform over V tokens gives log V, a one-hot distribution 0. Low values on sampled text = a peaked,
    possibly collapsed model."""
    s, count = token_entropy_sum(logits, mask)
    if count == 0:
        raise DistilError("token entropy: expected at least one generated token under the mask, found none")
    return s / count


# -- length --------------------------------------------------------------------------------------------------------


def mean_length(records: Sequence[Mapping]) -> float:
    """Mean completion length in tokens: (1/N) sum_i completion_tokens_i."""
    if not records:
        raise DistilError("mean length: expected at least one generation record, found none")
    return sum(int(r["completion_tokens"]) for r in records) / len(records)


def truncated_fraction(records: Sequence[Mapping]) -> float:
    """Fraction of completions cut at max new tokens: (1/N) sum_i [finish_reason_i == "length"]."""
    if not records:
        raise DistilError("truncated fraction: expected at least one generation record, found none")
    return sum(r["finish_reason"] == "length" for r in records) / len(records)


# -- everything at once --------------------------------------------------------------------------------------------

_REQUIRED = {"prompt_index": int, "completion": str, "finish_reason": str, "completion_tokens": int}


def _check_records(records: Sequence[Mapping]) -> None:
    if not records:
        raise DistilError("generation metrics: expected at least one generation record, found none")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise DistilError(f"generation record {i}: expected a mapping, found {type(r).__name__}")
        for key, kind in _REQUIRED.items():
            if key not in r:
                raise DistilError(f"generation record {i}: expected key '{key}', found keys {sorted(r)}")
            if not isinstance(r[key], kind) or isinstance(r[key], bool):
                raise DistilError(f"generation record {i}: '{key}': expected {kind.__name__}, found "
                                  f"{type(r[key]).__name__}")
        if r["prompt_index"] < 0 or r["completion_tokens"] < 0:
            raise DistilError(f"generation record {i}: expected prompt_index and completion_tokens >= 0, found "
                              f"{r['prompt_index']} and {r['completion_tokens']}")


def generation_metrics(records: Sequence[Mapping], task: Any = None, answers: Any = None, *,
                       ks: Sequence[int] = (1,), distinct: Sequence[int] = (1, 2),
                       entropy: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
                       tokenize: Callable[[str], Tokens] | None = None) -> dict[str, float]:
    """All generation metrics of a set of generation records (module docstring), in one dict:

    n_prompts, n_samples; with a task (anything with `verify(completion, gold)`, e.g. `tasks.TASKS[name]`)
    and `answers` (gold answer by prompt index: a sequence or a mapping): `accuracy` (over all samples) and
    `pass@k` for each k in `ks` (mean over prompts of `pass_at_k(n_i, c_i, k)`; k above a prompt's sample
    count is refused); `distinct-n` for each n in `distinct` (over all completions); `self_bleu` (over all
    completions, when there are >= 2) and `self_bleu_per_prompt` (mean over prompts with >= 2 samples: the
    diversity of sampling for one prompt); `mean_length` (tokens) and `truncated` (fraction cut at max new
    tokens); with `entropy` (an iterable of (logits or log-probs [B, T, V], mask of generated tokens [B, T])
    batches) `mean_token_entropy`, token-weighted over all batches.
    """
    _check_records(records)
    by_prompt: dict[int, list[Mapping]] = {}
    for r in records:
        by_prompt.setdefault(r["prompt_index"], []).append(r)
    completions = [r["completion"] for r in records]
    out: dict[str, float] = {"n_prompts": len(by_prompt), "n_samples": len(records)}
    if task is not None:
        if answers is None:
            raise DistilError("generation metrics: a task needs the gold answers (answers=, by prompt index)")
        golds = {}
        for p in by_prompt:
            try:
                golds[p] = answers[p]
            except (IndexError, KeyError):
                raise DistilError(f"generation metrics: no gold answer for prompt_index {p} "
                                  f"({len(answers)} answers given)") from None
        correct = {p: [bool(task.verify(r["completion"], golds[p])) for r in rs] for p, rs in by_prompt.items()}
        out["accuracy"] = sum(sum(c) for c in correct.values()) / len(records)
        for k in ks:
            out[f"pass@{k}"] = sum(pass_at_k(len(c), sum(c), k) for c in correct.values()) / len(correct)
    for n in distinct:
        out[f"distinct-{n}"] = distinct_n(completions, n, tokenize)
    if len(records) >= 2:
        out["self_bleu"] = self_bleu(completions, tokenize=tokenize)
    groups = [[r["completion"] for r in rs] for rs in by_prompt.values() if len(rs) >= 2]
    if groups:
        out["self_bleu_per_prompt"] = sum(self_bleu(g, tokenize=tokenize) for g in groups) / len(groups)
    out["mean_length"] = mean_length(records)
    out["truncated"] = truncated_fraction(records)
    if entropy is not None:
        total, count = 0.0, 0
        for logits, mask in entropy:
            s, c = token_entropy_sum(logits, mask)
            total, count = total + s, count + c
        if count == 0:
            raise DistilError("generation metrics: entropy: expected at least one generated token, found none")
        out["mean_token_entropy"] = total / count
    return out
