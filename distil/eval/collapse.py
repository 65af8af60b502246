"""Model collapse (Shumailov et al. 2024): what a model loses when it learns from its predecessor's samples.

Generation 0 is trained on real text; generation g+1 only on text sampled (T = 1) from generation g, or, with the
mitigation, on the same number of records of which a fraction are real (`mix_real`). Every generation is measured
on the same held-out REAL text and on its own samples:

  perplexity     exp(mean_t -log p(y_t))                         on held-out real tokens y_t (lower is better)
  tail mass      (1/N) #{t : p(y_t) < eps}                       the real tokens the model has (nearly) ruled out;
                                                                 eps = 1e-4 as in the issue: the tails it forgot
  KL to gen 0    mean_t sum_v p0_t(v) log(p0_t(v) / p_t(v))       KL(generation 0 || generation g) on real text
  distinct-n     |unique n-grams| / |n-grams| of its samples      character n-grams (distinct_n)
  entropy        mean over sampled tokens of H(p_t) in nats       its own uncertainty along its own samples

The formulas are plain functions of float64 log-probabilities (`token_logprobs` collects them), golden-tested in
tests/test_collapse.py; `benchmarks/model_collapse.py` runs the generations through `distil.pipeline.run`.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

import torch

from distil.errors import DistilError

TAIL_EPS = 1e-4


# ----------------------------------------------------------------------------------------------
# The formulas (float64 log-probabilities in, floats out)


def perplexity(target_logp: torch.Tensor) -> float:
    """exp of the mean negative log-probability of the real tokens ([N] log p(y_t))."""
    if target_logp.numel() == 0:
        raise DistilError("perplexity: expected at least one target token, found none")
    return math.exp(-float(target_logp.double().mean()))


def tail_mass(target_logp: torch.Tensor, eps: float = TAIL_EPS) -> float:
    """Fraction of real tokens to which the model gives probability below `eps`: p(y_t) < eps <=> log p < log eps."""
    if target_logp.numel() == 0:
        raise DistilError("tail mass: expected at least one target token, found none")
    return float((target_logp.double() < math.log(eps)).double().mean())


def kl_to_reference(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """mean_t KL(p_ref,t || p_t) in nats from [N, V] log-probabilities (rows: positions). Terms with p_ref = 0 are
    0 (the limit of p log p); a model that rules out a token the reference gives mass to gives +inf."""
    if ref_logp.shape != logp.shape or ref_logp.dim() != 2:
        raise DistilError(f"KL to generation 0: expected two [positions, vocab] arrays of one shape, found "
                          f"{tuple(ref_logp.shape)} and {tuple(logp.shape)}")
    ref, cur = ref_logp.double(), logp.double()
    p = ref.exp()
    terms = torch.where(p > 0, p * (ref - cur), torch.zeros_like(p))
    return float(terms.sum(-1).mean())


def mean_entropy(logp: torch.Tensor) -> float:
    """mean_t H(p_t) = mean_t -sum_v p_t(v) log p_t(v) (nats) of [N, V] log-probabilities."""
    lp = logp.double()
    p = lp.exp()
    return float(-torch.where(p > 0, p * lp, torch.zeros_like(p)).sum(-1).mean())


def mix_real(samples: Sequence[dict], real: Sequence[dict], fraction: float, seed: int) -> list[dict]:
    """The next generation's training records: as many as `samples`, of which round(fraction x n) are real records
    (a seeded draw without replacement) and the rest the first samples; shuffled with the same seed. fraction 0 =
    samples only (the collapse setting)."""
    if not 0.0 <= fraction <= 1.0:
        raise DistilError(f"real_fraction: expected a number in [0, 1], found {fraction}")
    n = len(samples)
    k = round(fraction * n)
    if k > len(real):
        raise DistilError(f"real_fraction: {fraction} of {n} records needs {k} real records, found {len(real)}")
    rng = random.Random(seed)
    out = list(samples[: n - k]) + rng.sample(list(real), k)
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------------
# Collecting the log-probabilities


@torch.no_grad()
def token_logprobs(model: Any, examples: list[dict], pad_id: int, vocab: int,
                   batch_size: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_t over the vocabulary [N, V] float64, log p(y_t) [N]) at every target position of `examples` (the
    same positions the training loss and distil's eval use: labels shifted by one, -100 excluded)."""
    from distil.data import collate

    was = model.training
    model.eval()
    full, picked = [], []
    try:
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i: i + batch_size], pad_id)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            valid = labels != -100
            lp = torch.log_softmax(logits[:, :-1, :vocab][valid].double(), dim=-1)
            full.append(lp)
            picked.append(lp.gather(1, labels[valid][:, None])[:, 0])
    finally:
        model.train(was)
    return torch.cat(full), torch.cat(picked)


def sample_texts(model: Any, tok: Any, n: int, max_new_tokens: int, seed: int, batch_size: int = 250) -> list[str]:
    """n texts written from nothing (the BOS token alone) at temperature 1, no top-k/top-p: the model's own
    distribution, through distil's generate (seeded per sample)."""
    from distil.generation import GenParams, generate

    if tok.bos_token_id is None:
        raise DistilError("model collapse: the model's tokenizer has no BOS token to sample from nothing")
    params = GenParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed, chat=False)
    was = model.training
    try:
        records = generate(model, tok, [[tok.bos_token_id]] * n, params, batch_size=batch_size,
                           model_name="collapse").records
    finally:
        model.train(was)
    return [r["completion"] for r in records]


def measure(model: Any, tok: Any, held_out: list[dict], samples: list[str], pad_id: int, vocab: int,
            ref_logp: torch.Tensor | None = None) -> tuple[dict, torch.Tensor]:
    """One generation's row (see the module docstring) and its [N, V] log-probs on the held-out real text (generation
    0's become `ref_logp` of the later ones)."""
    from distil.eval.generation import distinct_n

    logp, target = token_logprobs(model, held_out, pad_id, vocab)
    texts = [s for s in samples if s]
    sample_ex = [{"input_ids": ids, "labels": ids}
                 for ids in (tok(s)["input_ids"][:64] for s in texts) if len(ids) > 1]
    s_logp, _ = token_logprobs(model, sample_ex, pad_id, vocab) if sample_ex else (None, None)
    row = {
        "ppl": perplexity(target),
        "tail_mass": tail_mass(target, TAIL_EPS),
        "tail_mass_1e-2": tail_mass(target, 1e-2),
        "kl_to_gen0": kl_to_reference(ref_logp, logp) if ref_logp is not None else 0.0,
        # character n-grams (one token per character here); distinct_n's default splits on whitespace
        "distinct_1": distinct_n(texts, 1, tokenize=list),
        "distinct_2": distinct_n(texts, 2, tokenize=list),
        "distinct_4": distinct_n(texts, 4, tokenize=list),
        "sample_entropy": mean_entropy(s_logp) if s_logp is not None else float("nan"),
        "mean_sample_chars": sum(map(len, samples)) / max(len(samples), 1),
    }
    return row, logp


def write_text_records(texts: Sequence[dict], path: Path) -> Path:
    """A JSONL data file of {"text": ...} records (data.source for the next generation)."""
    from distil.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in texts))
    return path
