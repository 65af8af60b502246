"""The `distil` command end to end on a tiny teacher: run, eval, resume, bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distil.cli import main


def test_run_writes_the_run_directory(make_recipe, capsys):
    path = make_recipe(eval={"enabled": True, "hard_label_baseline": True}, train={"save_every": 2})
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    run = path.parent / "runs" / "t"
    for name in ("recipe.yaml", "metrics.jsonl", "eval.json", "report.md", "student/config.json",
                 "student/model.safetensors", "student/tokenizer.json", "checkpoints/step-000004",
                 "hard_labels/metrics.jsonl"):
        assert (run / name).exists(), name
    results = json.loads((run / "eval.json").read_text())["results"]
    assert set(results) == {"teacher", "student (before)", "student (offline)", "student (hard_labels)"}
    # every row is its own model: training changed the student, and the control differs from the distilled one
    students = [results[n] for n in ("student (before)", "student (offline)", "student (hard_labels)")]
    assert len({r["kl"] for r in students}) == 3 and len({r["ppl"] for r in students}) == 3
    for name, row in results.items():
        assert row["ppl"] == pytest.approx(math.exp(row["ce"]), rel=1e-6), name  # exp in fp32
        assert row["tokens"] == results["teacher"]["tokens"] > 0
        assert 0.0 <= row["agreement"] <= 1.0 and (row["kl"] > 0) == (name != "teacher"), name
    assert "student (offline)" in out and "top-1 agree" in out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    # The resolved recipe in the run dir is itself a valid recipe.
    assert main(["validate", str(run / "recipe.yaml")]) == 0


def test_existing_run_dir_is_not_clobbered(make_recipe, capsys):
    path = make_recipe()
    assert main(["run", str(path)]) == 0
    marker = path.parent / "runs" / "t" / "student" / "config.json"
    before = marker.read_text()
    assert main(["run", str(path)]) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err
    assert marker.read_text() == before
    assert main(["run", str(path), "--overwrite"]) == 0


def test_overrides_may_follow_flags_and_stray_words_are_one_line(make_recipe, capsys):
    path = make_recipe()
    assert main(["validate", str(path), "train.steps=3"]) == 0
    assert main(["run", str(path), "--overwrite", "train.steps=1", "name=after"]) == 0
    assert (path.parent / "runs" / "after" / "student").is_dir()
    capsys.readouterr()
    assert main(["run", str(path), "--overwrite", "--nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "distil: error: unrecognized arguments: --nope (see distil --help)"


def test_resume_through_the_cli(make_recipe, capsys):
    path = make_recipe(train={"save_every": 2})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    full = (run / "metrics.jsonl").read_text()
    assert main(["run", str(path), "--resume", str(run / "checkpoints" / "step-000002")]) == 0
    assert (run / "metrics.jsonl").read_text().splitlines()[:2] == full.splitlines()[:2]
    assert [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()] == \
        [json.loads(x)["loss"] for x in full.splitlines()]


def test_eval_verb_on_a_run_directory(make_recipe, capsys):
    path = make_recipe()
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    assert main(["eval", str(path.parent / "runs" / "t")]) == 0
    out = capsys.readouterr().out
    assert "teacher" in out and "student (before)" in out and "student (offline)" in out


@pytest.mark.parametrize("change,needle", [
    ({"data": {"source": "/nonexistent/data.jsonl"}}, "/nonexistent/data.jsonl: data file not found"),
    ({"teacher": {"source": "/nonexistent/model"}}, "/nonexistent/model: model directory not found"),
    ({"student": {"layers": [0, 9]}}, "student.layers: the teacher has 4 layers"),
    ({"data": {"seq_len": 1000}}, "data.seq_len: the teacher handles at most 512 positions"),
])
def test_run_bad_input_is_one_line_exit_2(make_recipe, capsys, change, needle):
    assert main(["run", str(make_recipe(**change))]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_bad_records_and_empty_data(make_recipe, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"prompt": "no response"}\n')
    assert main(["run", str(make_recipe(data={"source": str(bad), "eval_size": 0}))]) == 2
    assert "record 1: expected 'prompt' and 'response' together" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["run", str(make_recipe(data={"source": str(empty)}))]) == 2
    assert "the dataset is empty" in capsys.readouterr().err


def test_debug_shows_the_traceback(make_recipe):
    from distil.errors import DistilError

    with pytest.raises(DistilError):
        main(["--debug", "run", str(make_recipe(data={"source": "/nonexistent.jsonl"}))])


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train: {lr: -1}\nteacher: {source: x}\n")
    proc = subprocess.run([sys.executable, "-m", "distil", "validate", str(bad)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"distil: error: {bad}: train.lr: expected a value > 0.0, found -1.0"


def test_unexportable_student_fails_before_training(make_recipe, tmp_path, capsys):
    cfg = tmp_path / "gpt2.json"
    cfg.write_text('{"model_type": "gpt2", "vocab_size": 106, "n_embd": 16, "n_layer": 1, "n_head": 2, '
                   '"n_positions": 64}')
    path = make_recipe(student={"source": f"config:{cfg}", "layers": None}, data={"seq_len": 32},
                       export={"enabled": True})
    assert main(["run", str(path)]) == 2
    assert "export.enabled: the student's architecture 'gpt2' cannot be exported" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "t").exists()  # nothing written


def test_validate_names_the_loss_the_method_trains_with(capsys):
    """Methods whose own section holds the objective (onpolicy.loss, ...) are reported by that key, not by
    distill.loss, which they do not read."""
    recipes = Path(__file__).resolve().parents[1] / "recipes"
    assert main(["validate", str(recipes / "gkd.yaml"), "onpolicy.loss=reverse_kl"]) == 0
    out = capsys.readouterr().out
    assert "method=onpolicy, loss=onpolicy.loss=reverse_kl," in out
    assert main(["validate", str(recipes / "offline_jsd.yaml")]) == 0
    assert "method=offline, loss=jsd," in capsys.readouterr().out
