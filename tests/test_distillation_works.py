"""Distillation does what it is for: a short run brings the student closer to the teacher on held-out examples.

A tiny 4-layer teacher with spread-out weights (initializer_range 0.2: its next-token distributions are far from
uniform, so there is something to learn), a student made of its layers [0, 3], 40 steps of forward-KL distillation
through the public API (recipe_from_dict + pipeline.run), about a second on one CPU thread.
"""

import json
import math

import pytest

from distil import pipeline
from distil.recipe import recipe_from_dict
from distil.testing import save_tiny_model


@pytest.fixture(scope="module")
def sharp_teacher(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("sharp-teacher"), seed=0, num_hidden_layers=4,
                           initializer_range=0.2)


def distil_run(teacher, out_dir, lr=3e-3):
    recipe = recipe_from_dict({
        "name": "works",
        "teacher": {"source": str(teacher)},
        "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 40, "seq_len": 32, "eval_size": 8},
        "distill": {"method": "offline", "loss": "forward_kl", "alpha": 1.0},
        "train": {"steps": 40, "batch_size": 4, "lr": lr, "warmup_steps": 3, "progress": False},
        "eval": {"enabled": True},
        "output": {"dir": str(out_dir), "save_student": False},
    })
    return pipeline.run(recipe, echo=lambda *a, **k: None)


def test_a_short_distillation_moves_the_student_towards_the_teacher(sharp_teacher, tmp_path, fp32):
    result = distil_run(sharp_teacher, tmp_path / "runs")
    rows = result.eval
    before, after, teacher = rows["student (before)"], rows["student (offline)"], rows["teacher"]
    # Same held-out tokens for every row.
    assert before["tokens"] == after["tokens"] == teacher["tokens"] > 100
    assert teacher["kl"] == fp32.approx(0.0, terms=teacher["tokens"], scale=teacher["ce"])
    assert teacher["agreement"] == 1.0
    # The pruned student starts far from the teacher (0.72 nats/token, 8% top-1 agreement when written) ...
    assert before["kl"] > 0.3 and math.isfinite(before["ppl"])
    # ... and 40 steps of distillation roughly halve its KL (0.72 -> 0.41) and raise its agreement (8% -> 21%).
    assert after["kl"] < 0.75 * before["kl"]
    assert after["agreement"] > before["agreement"] + 0.04
    # The run directory's eval.json holds the same rows.
    written = json.loads((result.run_dir / "eval.json").read_text())["results"]
    assert written["student (offline)"]["kl"] == after["kl"] and written["student (before)"]["kl"] == before["kl"]


def test_the_control_without_learning_stays_where_it_started(sharp_teacher, tmp_path):
    """With a learning rate too small to move the weights, "after" equals "before": the improvement above comes
    from training, not from how the two rows are evaluated."""
    rows = distil_run(sharp_teacher, tmp_path / "runs", lr=1e-12).eval
    before, after = rows["student (before)"], rows["student (offline)"]
    assert after["kl"] == pytest.approx(before["kl"], rel=1e-4)
    assert after["agreement"] == pytest.approx(before["agreement"], abs=0.01)
