"""Method `preference` (DPO distillation): issue 9, item 3. Golden values by hand from the DPO formula."""

import json
import math

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.methods.preference import build_pairs, dpo_loss, sequence_logprobs
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
                             ("preference.max_new_tokens=0", "preference.max_new_tokens: expected a value > 0")):
        assert main(["validate", str(path), override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
