"""Method `preference` (DPO distillation): issue 9, item 3. Golden values by hand from the DPO formula."""

import json
import math

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.methods.preference import (best_and_worst, build_distillm2, build_pairs, dpo_loss, judge_scores,
                                       sequence_logprobs)
from distil.testing import char_tokenizer


def test_dpo_loss_against_a_hand_computed_value():
    # two pairs; pair 0: policy prefers chosen more than the reference does, pair 1: less
    pw = torch.tensor([-2.0, -4.0], dtype=torch.float64, requires_grad=True)
    pl = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    rw = torch.tensor([-2.5, -3.0], dtype=torch.float64)
    rl = torch.tensor([-2.5, -2.0], dtype=torch.float64)
    beta = 0.1
    out = dpo_loss(pw, pl, rw, rl, beta=beta, num_items=4)  # 4 pairs in the global batch (2 here)
    # margins: 0.1 * ((-2 + 2.5) - (-3 + 2.5)) = 0.1;  0.1 * ((-4 + 3) - (-1 + 2)) = -0.2
    want = (math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(0.2))) / 4
    assert float(out.loss.detach()) == pytest.approx(want, rel=1e-12)
    assert float(out.metrics["margin"]) == pytest.approx((0.1 - 0.2) / 4, rel=1e-12)
    assert float(out.metrics["accuracy"]) == pytest.approx(1 / 4)
    out.loss.backward()
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731  d/dm -log sigmoid(m) = -sigmoid(-m)
    assert pw.grad.tolist() == pytest.approx([-beta * sig(-0.1) / 4, -beta * sig(0.2) / 4], rel=1e-12)
    assert pl.grad.tolist() == pytest.approx([beta * sig(-0.1) / 4, beta * sig(0.2) / 4], rel=1e-12)


def test_dpo_loss_is_log_2_when_the_policy_is_the_reference():
    lp = torch.tensor([-3.0, -7.5, -1.25])
    out = dpo_loss(lp, lp - 2, lp, lp - 2, beta=0.5, num_items=3)
    assert float(out.loss) == pytest.approx(math.log(2), rel=1e-7)


def test_sequence_logprobs_sum_the_answer_tokens_only():
    logits = torch.tensor([[[1.0, 0.0, -1.0], [0.5, 0.5, 2.0], [0.0, 3.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[IGNORE, 2, 1]])

    def logp(z, y):
        return z[y] - math.log(sum(math.exp(v) for v in z))

    want = logp([0.5, 0.5, 2.0], 2) + logp([0.0, 3.0, 0.0], 1)
    assert float(sequence_logprobs(logits, labels)[0]) == pytest.approx(want, rel=1e-12)


def test_pairs_with_the_same_answer_are_dropped_and_counted():
    tok = char_tokenizer()
    prompts = [tok("ab", add_special_tokens=False)["input_ids"], tok("cd", add_special_tokens=False)["input_ids"]]
    rec = lambda p, text, who: {"prompt_index": p, "completion": text, "finish_reason": "stop", "model": who,  # noqa
                                "params": {}}
    chosen = [rec(0, "xy", "teacher"), rec(1, "same", "teacher")]
    rejected = [rec(0, "zz", "student"), rec(1, "same", "student")]
    good, bad, rows, dropped = build_pairs(prompts, chosen, rejected, tok, 64, [2])
    assert dropped == 1 and len(good) == len(bad) == len(rows) == 1
    x, y, z = (tok.convert_tokens_to_ids(c) for c in "xyz")
    assert good[0]["labels"] == [IGNORE, IGNORE, x, y, 2] and good[0]["index"] == 0
    assert bad[0]["input_ids"] == prompts[0] + [z, z, 2]
    assert rows[0]["chosen"] == "xy" and rows[0]["rejected"] == "zz" and rows[0]["chosen_by"] == "teacher"


def _recipe(tmp_path, tiny_teacher, **preference):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "an answer"}) + "\n"
                          for i in range(10)))
    recipe = {"name": "p", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
              "data": {"source": str(qa), "seq_len": 64, "eval_size": 2, "chat_template": False},
              "distill": {"method": "preference"}, "preference": {"max_new_tokens": 6, **preference},
              "train": {"steps": 3, "batch_size": 2, "grad_accum": 2, "lr": 1e-2, "warmup_steps": 1,
                        "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_preference_end_to_end(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path)]) == 0
    assert "8 pairs" in capsys.readouterr().out  # 10 - 2 held out, none equal (random tiny student vs teacher)
    pairs = [json.loads(x) for x in (tmp_path / "runs" / "p-preference" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 8 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert {p["rejected_by"] for p in pairs} == {"student (before)"}
    rows = [json.loads(x) for x in (tmp_path / "runs" / "p" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), rel=1e-6)  # step 1: the policy is the reference
    assert rows[0]["tokens"] == 4  # items are pairs: 2 micro-batches of 2
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["margin"] > 0


def test_text_data_is_refused(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path), "data.source=builtin:pydoc", "data.max_records=6", "data.seq_len=32"]) == 2
    assert "method 'preference' needs prompts" in capsys.readouterr().err


def test_bad_options_are_one_line(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    for override, needle in (("preference.beta=0", "preference.beta: expected a value > 0"),
                             ("preference.max_new_tokens=0", "preference.max_new_tokens: expected a value > 0"),
                             ("preference.n=1", "preference.n: expected a value >= 2"),
                             ("preference.skew_alpha=1.5", "preference.skew_alpha: expected a value <= 1"),
                             ("preference.pairs=best_of_n preference.student_temperature=0",
                              "preference.student_temperature: best_of_n needs 4 different student answers"),
                             ("preference.pairs=best_of_n preference.backend=llamacpp",
                              "preference.backend: best_of_n generates with the student only")):
        assert main(["validate", str(path), *override.split()]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err


def test_best_and_worst_under_the_judge_with_ties():
    rec = lambda p, k: {"prompt_index": p, "sample_index": k, "completion": f"{p}{k}"}  # noqa: E731
    records = [rec(0, 0), rec(0, 1), rec(0, 2), rec(1, 0), rec(1, 1)]
    scores = [-1.0, -0.5, -3.0, -2.0, -2.0]
    chosen, rejected = best_and_worst(records, scores)
    assert [(c["prompt_index"], c["sample_index"], c["judge"]) for c in chosen] == [(0, 1, -0.5), (1, 0, -2.0)]
    assert [(r["prompt_index"], r["sample_index"]) for r in rejected] == [(0, 2), (1, 1)]  # a tie: the later one


def test_judge_scores_are_the_teachers_answer_log_likelihood(tiny_teacher):
    """mean / sum of log p_T(answer token | prefix) over the answer (+ its end token), computed here one
    sequence at a time in float64 from the full log-softmax."""
    from distil.models import load_model

    loaded = load_model(str(tiny_teacher))
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [tok("hi?", add_special_tokens=False)["input_ids"], tok("ok", add_special_tokens=False)["input_ids"]]
    records = [{"prompt_index": 0, "completion": "abc", "finish_reason": "stop"},
               {"prompt_index": 1, "completion": "de", "finish_reason": "length"}]
    end = [tok.eos_token_id]
    means = judge_scores(model, prompts, records, tok, end, 64, "mean", 2, tok.pad_token_id, model.config.vocab_size)
    sums = judge_scores(model, prompts, records, tok, end, 64, "sum", 1, tok.pad_token_id, model.config.vocab_size)
    for r, mean, total in zip(records, means, sums):
        ans = tok(r["completion"], add_special_tokens=False)["input_ids"] + (end if r["finish_reason"] == "stop"
                                                                           else [])
        ids = prompts[r["prompt_index"]] + ans
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        want = sum(float(lp[len(ids) - len(ans) - 1 + k, t]) for k, t in enumerate(ans))
        assert total == pytest.approx(want, rel=1e-5) and mean == pytest.approx(want / len(ans), rel=1e-5)


def test_distillm2_loss_against_the_skew_divergences_by_hand():
    """Chosen rows: KL(p_T || a p_T + (1-a) p_S); rejected rows: KL(p_S || (1-a) p_T + a p_S); summed over the
    target tokens of both halves / num_items. Float64 loops over a 3-token vocabulary."""
    torch.manual_seed(0)
    a, vocab = 0.1, 3
    s_logits = torch.randn(2, 3, vocab, dtype=torch.float64)  # [chosen; rejected], 3 positions
    t_logits = torch.randn(2, 3, vocab, dtype=torch.float64)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2], [IGNORE, IGNORE, 0, IGNORE]])  # targets: chosen 2, rejected 1
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4, dtype=torch.long),
             "labels": labels}

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            pad = torch.zeros(len(input_ids), 1, vocab, dtype=self.logits.dtype)
            return type("Out", (), {"logits": torch.cat([self.logits, pad], 1)})()

    out = build_distillm2(Fixed(t_logits), a, vocab)(Fixed(s_logits), batch, 5.0)

    def softmax(z):
        e = [math.exp(v) for v in z]
        return [v / sum(e) for v in e]

    def kl(p, q):
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    skl = srkl = 0.0
    for pos in (1, 2):  # chosen targets at label positions 2, 3 -> logits positions 1, 2
        pt, ps = softmax(t_logits[0, pos].tolist()), softmax(s_logits[0, pos].tolist())
        skl += kl(pt, [a * x + (1 - a) * y for x, y in zip(pt, ps)])
    pt, ps = softmax(t_logits[1, 1].tolist()), softmax(s_logits[1, 1].tolist())
    srkl += kl(ps, [(1 - a) * x + a * y for x, y in zip(pt, ps)])
    # the divergences run in fp32 (losses.token_divergence): a relative tolerance at fp32 precision
    assert float(out.loss) == pytest.approx((skl + srkl) / 5, rel=1e-5)
    assert float(out.metrics["skl"]) == pytest.approx(skl / 5, rel=1e-5)
    assert float(out.metrics["srkl"]) == pytest.approx(srkl / 5, rel=1e-5) and out.n_tokens == 3


def test_best_of_n_pairs_and_distillm2_end_to_end(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, pairs="best_of_n", n=3, loss="distillm2")
    assert main(["run", str(path)]) == 0
    assert "best/worst of 3 student answers under the teacher's mean log-likelihood" in capsys.readouterr().out
    base = tmp_path / "runs" / "p-preference"
    assert not (base / "teacher.jsonl").exists()  # the teacher judges, it does not answer
    assert len((base / "student.jsonl").read_text().splitlines()) == 8 * 3
    pairs = [json.loads(x) for x in (base / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen_judge"] >= p["rejected_judge"] and p["chosen_by"] == p["rejected_by"]
                         for p in pairs)
    rows = [json.loads(x) for x in (tmp_path / "runs" / "p" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["skl"] > 0 and r["srkl"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["skl"] + rows[0]["srkl"], rel=1e-6)
