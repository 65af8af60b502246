"""distil/eval/generation.py against values computed by hand or from the formulas in float64: pass@k (explicit
binomials and enumeration of subsets), distinct-n, BLEU (clipping, brevity penalty, closest reference length,
smoothing), self-BLEU (against the one-BLEU-per-text definition), token entropy, lengths, and the summary dict."""

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from distil.errors import DistilError
from distil.eval.generation import (accuracy, bleu, distinct_n, generation_metrics, mean_length, mean_token_entropy,
                                    pass_at_k, self_bleu, token_entropy_sum, truncated_fraction)
from distil.eval.tasks import TASKS

# -- pass@k --------------------------------------------------------------------------------------------------------


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10, abs=1e-15)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 1, 1) == pytest.approx(0.1, abs=1e-15)  # pass@1 = c/n
    assert pass_at_k(4, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0  # n - c < k: every 3 of the 4 holds a correct one
    assert pass_at_k(3, 3, 3) == 1.0


def test_pass_at_k_against_binomials_and_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                explicit = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
                # Enumerate: samples 0..c-1 are the correct ones; the share of k-subsets holding one of them.
                subsets = list(itertools.combinations(range(n), k))
                enumerated = Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))
                assert explicit == enumerated
                assert pass_at_k(n, c, k) == pytest.approx(float(explicit), rel=1e-13, abs=1e-15), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form does not.
    n, c, k = 1000, 7, 500
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_refuses_k_above_n():
    with pytest.raises(DistilError, match=r"pass@8: needs at least k=8 samples per prompt, found n=4"):
        pass_at_k(4, 1, 8)
    for args in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4.0, 1, 1)]:
        with pytest.raises(DistilError):
            pass_at_k(*args)


# -- distinct-n ----------------------------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams: 4 + 3 = 7, unique {a, b, c}
    assert distinct_n(texts, 1) == 3 / 7
    # bigrams: (a b)(b a)(a b) + (a b)(b c) = 5, unique {ab, ba, bc}
    assert distinct_n(texts, 2) == 3 / 5
    # n-grams never span two completions: 'a' | 'b' holds no bigram
    assert distinct_n(["a", "b"], 2) == 0.0
    assert distinct_n(["x y z", "u v w"], 3) == 1.0
    assert distinct_n([[1, 2, 1, 2], [1, 2, 3]], 2) == 3 / 5  # token ids, same counts
    assert distinct_n(["  a\tb \n a  b "], 2) == 2 / 3  # whitespace tokenization: a b a b
    assert distinct_n(["ab ab"], 1, tokenize=list) == 3 / 5  # characters: a b ' ' a b


# -- BLEU ----------------------------------------------------------------------------------------------------------


def test_bleu_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    # p1 = 5/6 (the x2, cat, on, mat); p2 = (3+1)/(5+1) (the cat, on the, the mat); p3 = (1+1)/(4+1) (on the mat);
    # p4 = (0+1)/(3+1); c = r = 6 so BP = 1.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu(hyp, [ref]) == pytest.approx(expected, rel=1e-14)


def test_bleu_brevity_penalty_clipping_and_ties():
    # c = 2 < r = 6: every p_n is 1 (p3, p4 smoothed from 0/0 to 1/1), BP = exp(1 - 6/2).
    assert bleu("the cat", ["the cat sat on the mat"]) == pytest.approx(math.exp(-2.0), rel=1e-14)
    # Clipping: 'the' counts once against a reference with one 'the'.
    expected = (1 / 4 * 1 / 4 * 1 / 3 * 1 / 2) ** 0.25  # p2: 0 of 3 -> 1/4; p3: 0 of 2 -> 1/3; p4: 0 of 1 -> 1/2
    assert bleu("the the the the", ["the cat"]) == pytest.approx(expected, rel=1e-14)
    # Closest reference length 3 or 5 for c = 4: a tie goes to the shorter (r = 3, no penalty).
    assert bleu("a b c d", ["a b c", "a b c d e"]) == pytest.approx(1.0, rel=1e-14)
    # Clipping takes the max count over the references.
    assert bleu("a a b", ["a b", "a a"]) == pytest.approx((1.0 * 3 / 3 * 1 / 2 * 1) ** 0.25 * 1.0, rel=1e-14)


def test_bleu_identical_none_and_empty():
    for text in ["hello", "a b", "one two three", "the quick brown fox jumps over the lazy dog"]:
        assert bleu(text, [text]) == 1.0
    assert bleu("x y z", ["a b c"]) == 0.0  # no word in common: p1 = 0 (not smoothed)
    assert bleu("", ["a b"]) == 0.0
    assert bleu("", ["", "a"]) == 1.0
    with pytest.raises(DistilError, match="reference"):
        bleu("a", [])


def test_self_bleu_matches_its_definition():
    assert self_bleu(["a b c d", "a b c d", "a b c d"]) == 1.0
    assert self_bleu(["a b", "c d"]) == 0.0
    rng = random.Random(0)
    vocab = "a b c d e f".split()
    for trial in range(30):
        texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 9))) for _ in range(rng.randint(2, 7))]
        naive = sum(bleu(t, texts[:i] + texts[i + 1:]) for i, t in enumerate(texts)) / len(texts)
        assert self_bleu(texts) == pytest.approx(naive, rel=1e-12, abs=1e-15), texts
    with pytest.raises(DistilError, match="at least 2"):
        self_bleu(["only one"])


# -- entropy -------------------------------------------------------------------------------------------------------


def test_entropy_uniform_one_hot_and_by_hand(fp32):
    V = 50
    assert mean_token_entropy(torch.zeros(2, 3, V)) == fp32.approx(math.log(V), terms=V)
    one_hot = torch.full((2, 3, V), float("-inf"))
    one_hot[..., 7] = 0.0
    assert mean_token_entropy(one_hot) == 0.0  # p log p at p = 0 is 0, not NaN
    assert mean_token_entropy(torch.tensor([[[0.0, -1e4, -1e4]]])) == pytest.approx(0.0, abs=1e-30)
    # p = (1/2, 1/4, 1/4) given as log-probs (float64): H = 1.5 log 2; shifting the logits changes nothing.
    logp = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    assert mean_token_entropy(logp.view(1, 1, 3)) == pytest.approx(1.5 * math.log(2), rel=1e-15)
    assert mean_token_entropy((logp + 3.0).view(1, 1, 3)) == pytest.approx(1.5 * math.log(2), rel=1e-15)


def test_entropy_mask_and_chunks():
    V = 8
    logits = torch.full((2, 4, V), float("-inf"), dtype=torch.float64)
    logits[..., 0] = 0.0  # one-hot everywhere (H = 0) ...
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    logits[0, 1] = 0.0  # ... but uniform at two of the three generated positions (H = log V)
    logits[1, 0] = 0.0
    logits[1, 3] = 0.0  # uniform but not generated: must not count
    assert mean_token_entropy(logits, mask) == pytest.approx(2 * math.log(V) / 3, rel=1e-15)
    total, count = token_entropy_sum(logits, mask, chunk=1)
    assert count == 3 and total == pytest.approx(2 * math.log(V), rel=1e-15)
    with pytest.raises(DistilError, match="shape"):
        mean_token_entropy(logits, mask[:, :3])
    with pytest.raises(DistilError, match="at least one"):
        mean_token_entropy(logits, torch.zeros_like(mask))


# -- lengths and the summary ---------------------------------------------------------------------------------------


def rec(p, completion, finish="stop", tokens=None):
    return {"prompt_index": p, "completion": completion, "finish_reason": finish,
            "completion_tokens": len(completion.split()) if tokens is None else tokens}


def test_lengths():
    records = [rec(0, "a", "stop", 3), rec(0, "b", "length", 10), rec(1, "c", "stop", 5), rec(1, "d", "length", 10)]
    assert mean_length(records) == 7.0
    assert truncated_fraction(records) == 0.5


def test_accuracy():
    task = TASKS["arithmetic"]
    assert accuracy(["#### 4", "#### 5", "what?"], [4, 4, 4], task.verify) == 1 / 3
    with pytest.raises(DistilError, match="one gold answer per completion"):
        accuracy(["#### 4"], [4, 5], task.verify)


def test_generation_metrics_by_hand():
    task = TASKS["arithmetic"]
    answers = [7, -3]
    records = [
        rec(0, "3+4=7 #### 7"), rec(0, "3+4=8 #### 8"), rec(0, "#### 7", "length", 12),  # 2 of 3 right
        rec(1, "no idea at all"), rec(1, "#### 3"), rec(1, "1-4=-3 #### -3"),  # 1 of 3 right; garbage is wrong
    ]
    out = generation_metrics(records, task, answers, ks=(1, 2, 3))
    assert out["n_prompts"] == 2 and out["n_samples"] == 6
    assert out["accuracy"] == 3 / 6
    assert out["pass@1"] == pytest.approx((2 / 3 + 1 / 3) / 2, rel=1e-15)
    assert out["pass@2"] == pytest.approx(((1 - 0 / 3) + (1 - 1 / 3)) / 2, rel=1e-15)  # 1 - C(n-c,2)/C(3,2)
    assert out["pass@3"] == 1.0
    completions = [r["completion"] for r in records]
    assert out["distinct-1"] == distinct_n(completions, 1) and out["distinct-2"] == distinct_n(completions, 2)
    assert out["self_bleu"] == self_bleu(completions)
    assert out["self_bleu_per_prompt"] == pytest.approx((self_bleu(completions[:3]) + self_bleu(completions[3:])) / 2)
    assert out["mean_length"] == sum(r["completion_tokens"] for r in records) / 6
    assert out["truncated"] == 1 / 6
    # Entropy from two batches is token-weighted: 3 tokens at log 4, 1 token at 0.
    uniform, peaked = torch.zeros(1, 3, 4), torch.tensor([[[0.0, -1e4, -1e4, -1e4]]])
    out = generation_metrics(records, entropy=[(uniform, None), (peaked, torch.ones(1, 1, dtype=torch.bool))])
    assert out["mean_token_entropy"] == pytest.approx(3 * math.log(4) / 4, rel=1e-6)
    assert "accuracy" not in out  # no task: no correctness metrics


def test_generation_metrics_bad_input():
    task = TASKS["arithmetic"]
    records = [rec(0, "#### 1"), rec(0, "#### 2")]
    with pytest.raises(DistilError, match=r"pass@4: needs at least k=4"):
        generation_metrics(records, task, [1], ks=(4,))
    with pytest.raises(DistilError, match="gold answers"):
        generation_metrics(records, task)
    with pytest.raises(DistilError, match="no gold answer for prompt_index 0"):
        generation_metrics(records, task, [])
    with pytest.raises(DistilError, match="expected key 'finish_reason'"):
        generation_metrics([{"prompt_index": 0, "completion": "x", "completion_tokens": 1}])
    with pytest.raises(DistilError, match="'completion_tokens': expected int"):
        generation_metrics([rec(0, "x", tokens="3")])
    with pytest.raises(DistilError, match="at least one"):
        generation_metrics([])
    out = generation_metrics([rec(0, "#### 1")], task, {0: 1})  # one sample: no self-BLEU, answers by mapping
    assert out["accuracy"] == 1.0 and "self_bleu" not in out and "self_bleu_per_prompt" not in out
