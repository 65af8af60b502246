"""What every eval row writes (distil/eval/answers.py): eval.answers (greedy answers to held-out prompts, saved and
printed) and eval.task (accuracy, pass@k, diversity), through `distil run` and `distil eval`."""

import json
import math

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.eval import answers as ans


def test_prompt_part_is_the_masked_prefix():
    assert ans.prompt_part({"input_ids": [1, 7, 8, 9, 2], "labels": [IGNORE, IGNORE, IGNORE, 9, 2]}) == [1, 7, 8]
    assert ans.prompt_part({"input_ids": [1, 7, 8], "labels": [IGNORE, 7, 8]}, bos=1) == []  # only a BOS: text
    assert ans.prompt_part({"input_ids": [7, 8], "labels": [7, 8]}) == []
    assert ans.prompt_part({"input_ids": [7, 8], "labels": [IGNORE, IGNORE]}) == []  # no target at all


def _recipe(tmp_path, tiny_teacher, **eval_keys):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question number {i}?", "response": f"answer {i}."}) + "\n"
                            for i in range(10)))
    recipe = {"name": "a", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
              "data": {"source": str(data), "seq_len": 64, "eval_size": 3, "chat_template": False},
              "distill": {"method": "offline"},
              "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
              "eval": {"batch_size": 2, "max_new_tokens": 5, **eval_keys}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _argmax(model, ids, steps, eos=2):
    out = []
    with torch.no_grad():
        for _ in range(steps):
            t = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == eos:
                break
            out.append(t)
    return out


def test_run_prints_and_saves_every_rows_answers_to_held_out_prompts(tmp_path, tiny_teacher, capsys):
    from distil.models import load_model

    path = _recipe(tmp_path, tiny_teacher, answers=2)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "runs" / "a" / "eval.json").read_text())
    gen = record["generation"]
    assert len(gen["questions"]) == 2 and all(q.startswith("question number ") for q in gen["questions"])
    assert set(gen["answers"]) == {"teacher", "student (before)", "student (offline)"}
    assert "prompt_ids" not in gen  # internal, not saved
    for q in gen["questions"]:
        assert f"> {q}" in out and q in (tmp_path / "runs" / "a" / "report.md").read_text()
    # the teacher's answer is its greedy continuation of the prompt exactly as training rendered it
    teacher = load_model(str(tiny_teacher))
    ids = [1] + teacher.tokenizer(gen["questions"][0], add_special_tokens=False)["input_ids"]  # BOS + prompt
    want = teacher.tokenizer.decode(_argmax(teacher.model, ids, 5), skip_special_tokens=True).strip()
    assert gen["answers"]["teacher"][0] == want
    # `distil eval` recomputes them the same way
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "runs" / "a")]) == 0
    again = json.loads((tmp_path / "runs" / "a" / "eval.json").read_text())["generation"]
    assert again["answers"] == gen["answers"] and f"> {gen['questions'][0]}" in capsys.readouterr().out


def test_answers_need_prompts_and_are_refused_before_training(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, answers=2)
    data = yaml.safe_load(path.read_text())
    data["data"] = {"source": "builtin:pydoc", "max_records": 8, "seq_len": 32, "eval_size": 2}
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "eval.answers: the held-out examples of builtin:pydoc have no prompts" in err
    assert not (tmp_path / "runs" / "a").exists()


def test_task_metrics_follow_the_formulas(monkeypatch, tiny_teacher):
    """A fake model whose samples are right on a known pattern: accuracy, pass@1 and pass@n by Chen et al.'s
    estimator 1 - C(n-c, k)/C(n, k), computed here by hand."""
    from distil.eval.tasks import TASKS
    from distil.models import load_model
    from distil.recipe import recipe_from_dict

    recipe = recipe_from_dict({"teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
                               "data": {"source": "x.jsonl", "seq_len": 64, "chat_template": False},
                               "eval": {"task": "sum3", "task_size": 4, "samples": 3}}, "r")
    task = TASKS["sum3"]
    _, held = task.split(0, 4)
    right = [2, 0, 3, 1]  # correct samples per question, out of 3

    def fake(model, tok, prompts, params, batch_size):
        assert len(prompts) == 4
        if params.n == 1:  # greedy: questions 0 and 2 right
            return [{"prompt_index": i, "sample_index": 0, "completion": f"#### {held[i].answer + (i % 2)}",
                     "finish_reason": "stop", "completion_tokens": 3} for i in range(4)]
        return [{"prompt_index": i, "sample_index": s, "finish_reason": "length" if s == 2 else "stop",
                 "completion": f"#### {held[i].answer if s < right[i] else held[i].answer + 1}",
                 "completion_tokens": 4} for i in range(4) for s in range(3)]

    monkeypatch.setattr(ans, "_generate", fake)
    tok = load_model(str(tiny_teacher)).tokenizer
    m = ans.task_metrics({"x": object()}, tok, recipe)["x"]
    assert m["accuracy"] == pytest.approx(2 / 4)
    assert m["pass@1"] == pytest.approx(sum(c / 3 for c in right) / 4)
    assert m["pass@3"] == pytest.approx(sum(1 - math.comb(3 - c, 3) / math.comb(3, 3) for c in right) / 4)
    assert m["truncated"] == pytest.approx(1 / 3) and m["mean_length"] == pytest.approx(4.0)
    table = ans.format_task({"task": {"name": "sum3", "size": 4, "samples": 3, "rows": {"x": m}}})
    assert "pass@3" in table.splitlines()[0] and "0.500" in table.splitlines()[1]


def test_run_with_a_task_reports_every_row(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, task="sum3", task_size=3, samples=2)
    assert main(["run", str(path)]) == 0
    task = json.loads((tmp_path / "runs" / "a" / "eval.json").read_text())["generation"]["task"]
    assert task["name"] == "sum3" and set(task["rows"]) == {"teacher", "student (before)", "student (offline)"}
    for m in task["rows"].values():
        assert {"accuracy", "pass@1", "pass@2", "distinct-2", "mean_length", "truncated"} <= set(m)
        assert 0 <= m["accuracy"] <= 1 and m["pass@1"] <= m["pass@2"] + 1e-12
    assert "task sum3 (3 eval questions)" in capsys.readouterr().out
