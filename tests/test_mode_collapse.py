"""Mode / diversity collapse in every sampled evaluation: the pass@k curve (k = 1..n, Chen et al.'s unbiased
estimator) and distinct-n for every row, the teacher's included, and a warning when a student's distinct-2 falls
below eval.diversity_warn times the teacher's."""

import json
import math

import pytest
import yaml

from distil.cli import main
from distil.eval import answers as ans


def _recipe_dict(tiny_teacher, tmp_path, **eval_keys):
    return {"name": "m", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
            "data": {"source": "builtin:sum3_answers", "seq_len": 64, "eval_size": 2, "max_records": 8,
                     "chat_template": False},
            "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
            "eval": {"batch_size": 4, "max_new_tokens": 4, "task": "sum3", "task_size": 3, **eval_keys},
            "output": {"dir": str(tmp_path / "runs")}}


def _chen(n, c, k):
    return 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)


def test_curve_distinct_and_warning_follow_the_formulas(monkeypatch, tiny_teacher, tmp_path):
    """Two fake rows on 4 sum3 questions, n = 4 samples each: the teacher writes four different answers (right
    ones on a known pattern), the collapsed student one answer four times."""
    from distil.eval.tasks import TASKS
    from distil.models import load_model
    from distil.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe_dict(tiny_teacher, tmp_path, task_size=4, samples=4, diversity_warn=0.5), "r")
    _, held = TASKS["sum3"].split(0, 4)
    right = {"teacher": [1, 2, 0, 4], "student": [4, 0, 0, 4]}  # correct samples out of 4, per question

    def fake(model, tok, prompts, params, batch_size):
        if params.n == 1:
            return [{"prompt_index": i, "completion": f"#### {held[i].answer}", "finish_reason": "stop",
                     "completion_tokens": 2} for i in range(4)]
        out = []
        for i in range(4):
            for s in range(4):
                good = s < right[model][i]
                if model == "teacher":  # distinct words every sample
                    text = f"so w{i}x{s} gives #### {held[i].answer if good else held[i].answer + 1 + s}"
                else:  # the same words every sample
                    text = f"so gives #### {held[i].answer if good else held[i].answer + 1}"
                out.append({"prompt_index": i, "completion": text, "finish_reason": "stop", "completion_tokens": 5})
        return out

    monkeypatch.setattr(ans, "_generate", fake)
    tok = load_model(str(tiny_teacher)).tokenizer
    report = ans.generation_eval(recipe, {"teacher": "teacher", "student (x)": "student"}, tok, [])
    task = report["task"]
    for row, name in (("teacher", "teacher"), ("student", "student (x)")):
        m = task["rows"][name]
        for k in range(1, 5):  # every k of the curve, the teacher's row too
            assert m[f"pass@{k}"] == pytest.approx(sum(_chen(4, c, k) for c in right[row]) / 4, rel=1e-12)
        assert ans.pass_curve(m, 4) == [m[f"pass@{k}"] for k in range(1, 5)]
    # distinct-2 by hand: the student's 16 samples hold 3 bigrams each ("so gives", "gives ####", "#### A");
    # unique: 2 shared + one "#### A" per distinct answer (questions 0, 3: one answer; 1, 2: one wrong one)
    assert task["rows"]["student (x)"]["distinct-2"] == pytest.approx((2 + 4) / 48)
    # the teacher's: 4 bigrams per sample, "so wIxS" and "wIxS gives" unique per sample, "gives ####" shared,
    # "#### A" unique per distinct answer
    answers = {(i, held[i].answer if s < right["teacher"][i] else held[i].answer + 1 + s)
               for i in range(4) for s in range(4)}
    assert task["rows"]["teacher"]["distinct-2"] == pytest.approx((32 + 1 + len({a for _, a in answers})) / 64)
    assert len(task["warnings"]) == 1 and task["warnings"][0].startswith("warning: student (x): distinct-2 0.125 "
                                                                         "is below 0.5 x the teacher's")
    text = ans.format_task(report)
    assert "pass@k, k = 1..4" in text and text.splitlines()[-1] == task["warnings"][0]
    curve_line = next(ln for ln in text.splitlines() if ln.startswith("student (x)") and "0.500" in ln[30:37])
    assert curve_line.split()[-2:] == [f"{task['rows']['student (x)']['distinct-1']:.3f}", "0.125"]
    task["diversity_warn"] = 0.0  # off
    assert ans.diversity_warnings(task) == [] and "warning" not in ans.format_task(report)
    task["diversity_warn"], task["samples"] = 0.5, 1  # greedy only: nothing sampled, nothing to warn about
    assert ans.diversity_warnings(task) == []


def test_run_writes_the_curves_in_eval_json_and_report_md(tiny_teacher, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(tiny_teacher, tmp_path, samples=3, diversity_warn=1.0)))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "m"
    task = json.loads((run / "eval.json").read_text())["generation"]["task"]
    assert set(task["rows"]) == {"teacher", "student (before)", "student (offline)"}
    for m in task["rows"].values():
        curve = [m[f"pass@{k}"] for k in (1, 2, 3)]
        assert curve == sorted(curve) and {"distinct-1", "distinct-2"} <= set(m)  # pass@k never falls with k
    report = (run / "report.md").read_text()
    assert "pass@k, k = 1..3" in report
    # diversity_warn 1.0: every student row less diverse than the teacher is named, in eval.json and the report
    t2 = task["rows"]["teacher"]["distinct-2"]
    below = sorted(n for n, m in task["rows"].items() if n != "teacher" and m["distinct-2"] < t2)
    assert sorted(w.split(":")[0].removeprefix("warning: ") for w in task["warnings"]) == below
    for w in task["warnings"]:
        assert w in report


def test_diversity_warn_is_range_checked(tiny_teacher, tmp_path, capsys):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe_dict(tiny_teacher, tmp_path, samples=3, diversity_warn=1.5)))
    assert main(["validate", str(path)]) == 2
    assert "eval.diversity_warn" in capsys.readouterr().err
