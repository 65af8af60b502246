"""Model collapse (distil/eval/collapse.py, benchmarks/model_collapse.py): the per-generation measures against
hand-computed float64 values, and two generations end to end through pipeline.run."""

import argparse
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from distil.errors import DistilError
from distil.eval.collapse import kl_to_reference, mean_entropy, mix_real, perplexity, tail_mass, token_logprobs

ROOT = Path(__file__).resolve().parent.parent


def _log(rows):
    return torch.tensor(rows, dtype=torch.float64).log()


def test_perplexity_and_tail_mass_by_hand():
    p = [0.5, 0.25, 5e-5, 0.9]  # probabilities of four real tokens
    target = torch.tensor(p, dtype=torch.float64).log()
    nll = -(math.log(0.5) + math.log(0.25) + math.log(5e-5) + math.log(0.9)) / 4
    assert perplexity(target) == pytest.approx(math.exp(nll), rel=1e-12)
    assert tail_mass(target) == 0.25  # only 5e-5 < 1e-4
    assert tail_mass(target, 0.3) == 0.5  # 0.25 and 5e-5
    assert tail_mass(torch.tensor([math.log(1e-4)], dtype=torch.float64)) == 0.0  # strictly below
    with pytest.raises(DistilError):
        tail_mass(torch.zeros(0))


def test_kl_to_generation_0_and_entropy_by_hand():
    ref = [[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]
    cur = [[0.25, 0.25, 0.5], [0.2, 0.3, 0.5]]
    kl0 = 0.5 * math.log(0.5 / 0.25) * 2  # p_ref = 0 contributes nothing
    assert kl_to_reference(_log(ref), _log(cur)) == pytest.approx((kl0 + 0.0) / 2, rel=1e-12)
    # direction: KL(gen 0 || gen g), not the reverse (which is infinite here: gen g gives mass where gen 0 has none)
    assert math.isinf(kl_to_reference(_log(cur), _log(ref)))
    h1 = -(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))
    h2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert mean_entropy(_log(cur)) == pytest.approx((h1 + h2) / 2, rel=1e-12)
    with pytest.raises(DistilError):
        kl_to_reference(_log(ref), _log(cur)[:1])


def test_mix_real_keeps_the_fraction_and_the_size():
    samples = [{"text": f"s{i}"} for i in range(50)]
    real = [{"text": f"r{i}"} for i in range(100)]
    mixed = mix_real(samples, real, 0.1, seed=3)
    assert len(mixed) == 50
    assert sum(r["text"].startswith("r") for r in mixed) == 5
    assert mix_real(samples, real, 0.1, seed=3) == mixed  # seeded
    assert all(r["text"].startswith("s") for r in mix_real(samples, real, 0.0, seed=3))
    with pytest.raises(DistilError, match="real_fraction"):
        mix_real(samples, real, 1.5, seed=0)


def test_token_logprobs_are_the_evaluation_positions():
    """perplexity(token_logprobs) equals distil's own held-out perplexity (metrics.evaluate: the same positions)."""
    from distil.data import build_examples
    from distil.eval.metrics import evaluate
    from distil.testing import char_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = char_tokenizer(add_bos=True)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    ex = build_examples([{"text": "12+3=15"}, {"text": "7+70+700=777"}], tok, 32, False, False, "t")
    full, target = token_logprobs(model, ex, pad_id=0, vocab=len(tok), batch_size=1)
    assert full.dtype == torch.float64 and full.shape[0] == target.shape[0]
    ref = evaluate(None, {"m": model}, ex, batch_size=2, pad_id=0, vocab=len(tok))["m"]
    assert perplexity(target) == pytest.approx(ref["ppl"], rel=1e-5)
    assert target.shape[0] == ref["tokens"]


def test_two_generations_end_to_end(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("model_collapse", ROOT / "benchmarks" / "model_collapse.py")
    mc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mc)
    recipe = tmp_path / "gen0.yaml"
    recipe.write_text((ROOT / "recipes" / "model_collapse.yaml").read_text()
                      .replace("max_records: 800", "max_records: 40").replace("eval_size: 200", "eval_size: 8")
                      .replace("hidden_size: 64", "hidden_size: 32").replace("batch_size: 32", "batch_size: 4"))
    monkeypatch.setattr(mc, "RECIPE", recipe)
    args = argparse.Namespace(generations=2, steps=2, samples=10, max_new_tokens=6, real_fraction=0.2,
                              out=str(tmp_path / "runs"))
    out = mc.simulate(0, args)
    assert set(out) == {"no mitigation", "keep real"}
    for rows in out.values():
        assert len(rows) == 3 and rows[0]["kl_to_gen0"] == 0.0
        assert all(r["kl_to_gen0"] > 0 and r["ppl"] > 1 for r in rows[1:])
    # generation 1 of each setting was trained on its own data file: samples only / 2 of 10 real
    none = (tmp_path / "runs" / "data" / "s0-none-gen1.jsonl").read_text().splitlines()
    real = (tmp_path / "runs" / "data" / "s0-real-gen1.jsonl").read_text().splitlines()
    assert len(none) <= 10 and len(real) <= 10
    summary = mc.summarize([out])
    assert summary["keep real"][2]["ppl"]["mean"] == out["keep real"][2]["ppl"]


def test_measure_counts_character_ngrams_of_the_samples():
    from distil.data import build_examples
    from distil.eval.collapse import measure
    from distil.testing import char_tokenizer, tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = char_tokenizer(add_bos=True)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok))).eval()
    held = build_examples([{"text": "1+2=3"}], tok, 16, False, False, "t")
    row, logp = measure(model, tok, held, ["abab", "ab"], pad_id=0, vocab=len(tok))
    # character bigrams: ab ba ab | ab -> 2 unique of 4; unigrams: a b a b a b -> 2 of 6
    assert row["distinct_2"] == 0.5 and row["distinct_1"] == pytest.approx(2 / 6)
    assert row["kl_to_gen0"] == 0.0 and logp.shape[0] == 6  # '1+2=3' after BOS, then EOS: 6 targets
