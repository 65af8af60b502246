"""Method takd (distil/methods/takd.py): teacher -> assistant -> student, two phases of THE loop via pipeline.run."""

import json

import pytest
from safetensors.torch import load_file

from distil import pipeline
from distil.errors import DistilError
from distil.recipe import recipe_from_dict


def _quiet(*a, **k):
    pass


def _recipe(tiny_teacher, tmp_path, method="takd", **takd):
    return recipe_from_dict({
        "name": "chain", "teacher": {"source": str(tiny_teacher)},
        "student": {"source": "config:tiny-llama-char", "config": {"num_hidden_layers": 1, "hidden_size": 16,
                                                                   "intermediate_size": 32}},
        "takd": {"assistant": {"num_hidden_layers": 2, "hidden_size": 24, "intermediate_size": 48}, **takd},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": method, "temperature": 2.0, "alpha": 0.8},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
        "eval": {"hard_label_baseline": False},
        "output": {"dir": str(tmp_path / "runs")}})


def _losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


@pytest.fixture
def char_teacher(tmp_path):
    """A tiny teacher with the config:tiny-llama-char preset's tokenizer (BOS first), 3 layers."""
    from distil.testing import char_tokenizer, save_tiny_model

    return save_tiny_model(tmp_path / "teacher", seed=1, tokenizer=char_tokenizer(add_bos=True),
                           num_hidden_layers=3, hidden_size=32)


def test_assistant_then_student_with_an_assistant_row(char_teacher, tmp_path):
    res = pipeline.run(_recipe(char_teacher, tmp_path), echo=_quiet)
    run = res.run_dir
    assert len(_losses(run / "assistant" / "metrics.jsonl")) == 3  # phase 1 in its own sub-directory
    assert len(_losses(run / "metrics.jsonl")) == 3  # phase 2: the student, in the run directory
    assert set(res.eval) == {"teacher", "student (before)", "student (takd)", "assistant (takd)"}
    # the assistant has the overridden architecture; the saved student is the student's (1 layer, hidden 16)
    ckpt = load_file(str(run / "assistant" / "checkpoints" / "step-000003" / "model.safetensors"))
    assert ckpt["student.lm_head.weight"].shape[1] == 24  # tied: stored once
    assert {k.split(".")[3] for k in ckpt if k.startswith("student.model.layers.")} == {"0", "1"}
    saved = json.loads((res.student_dir / "config.json").read_text())
    assert (saved["num_hidden_layers"], saved["hidden_size"]) == (1, 16)
    assert not (run / "student" / "assistant").exists()


def test_the_student_learns_from_the_assistant_not_the_teacher(char_teacher, tmp_path):
    chain = pipeline.run(_recipe(char_teacher, tmp_path / "a"), echo=_quiet).run_dir
    direct = pipeline.run(_recipe(char_teacher, tmp_path / "b", method="offline"), echo=_quiet).run_dir
    # same initial student, same first batch, same loss: only the target distribution differs at step 1
    assert _losses(chain / "metrics.jsonl")[0] != pytest.approx(_losses(direct / "metrics.jsonl")[0], rel=1e-6)
    # and the assistant's first step is the direct run's loss shape: a fresh model against the teacher
    assert _losses(chain / "assistant" / "metrics.jsonl")[0] > 0


def test_bad_assistant_override_is_one_line(char_teacher, tmp_path):
    with pytest.raises(DistilError, match=r"takd\.assistant\.num_layers: not a field .*num_hidden_layers"):
        pipeline.run(_recipe(char_teacher, tmp_path, assistant={"num_layers": 2}), echo=_quiet)
