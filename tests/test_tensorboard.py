"""train.report_to: tensorboard: every metrics.jsonl row also as TensorBoard scalars (run_dir/tensorboard/), a
resumed run continuing the same event stream; the option without the package is refused in one line."""

import json
import sys

import pytest

from distil.cli import main
from distil.methods import build_hard_labels
from distil.models import load_model, student_from_teacher
from distil.recipe import TrainSpec
from distil.trainer import train


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_the_metrics_rows(tmp_path, tiny_teacher):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'distil[tensorboard]')")
    from distil.data import build_examples

    t = load_model(str(tiny_teacher))
    examples = build_examples([{"prompt": "q" * (1 + i % 3), "response": "abcd"} for i in range(8)], t.tokenizer, 32)
    student = student_from_teacher(t, [0, 3]).model.requires_grad_(True)
    spec = TrainSpec(steps=4, batch_size=2, lr=1e-3, warmup_steps=1, progress=False, report_to="tensorboard",
                     save_every=2)
    fn = build_hard_labels(vocab=len(t.tokenizer))
    train(student, fn, examples, spec, run_dir=tmp_path, seed=0, pad_id=0, tag="hard_labels")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = _events(tmp_path / "tensorboard")
    want = {f"hard_labels/{k}" for k, v in rows[0].items() if k != "step" and v is not None}
    assert {"hard_labels/loss", "hard_labels/lr", "hard_labels/grad_norm", "hard_labels/tokens"} <= want
    assert set(events) == want
    for tag, series in events.items():
        key = tag.split("/", 1)[1]
        assert [s for s, _ in series] == [r["step"] for r in rows]
        assert [v for _, v in series] == pytest.approx([r[key] for r in rows], rel=1e-6)  # stored as float32


def test_off_by_default_and_through_a_run(make_recipe):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'distil[tensorboard]')")
    path = make_recipe()
    assert main(["run", str(path)]) == 0
    assert not (path.parent / "runs" / "t" / "tensorboard").exists()
    assert main(["run", str(path), "--overwrite", "train.report_to=tensorboard"]) == 0
    events = _events(path.parent / "runs" / "t" / "tensorboard")
    assert [s for s, _ in events["offline/loss"]] == [1, 2, 3, 4] and "offline/kd" in events


def test_missing_package_is_one_line_before_anything_runs(make_recipe, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now raises ImportError
    path = make_recipe(train={"report_to": "tensorboard"})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.report_to: 'tensorboard' needs the tensorboard package" in err
    assert "pip install 'distil[tensorboard]'" in err
    assert not (path.parent / "runs").exists()  # refused at validation: nothing written


def test_switched_on_at_resume(make_recipe):
    """train.report_to only changes what is logged: a resumed run may turn it on (its events start after the
    checkpoint it resumes from)."""
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'distil[tensorboard]')")
    path = make_recipe(train={"steps": 2, "save_every": 1})
    assert main(["run", str(path)]) == 0
    assert main(["run", str(path), "train.steps=4", "train.report_to=tensorboard", "--resume"]) == 0
    events = _events(path.parent / "runs" / "t" / "tensorboard")
    assert [s for s, _ in events["offline/loss"]] == [3, 4]
