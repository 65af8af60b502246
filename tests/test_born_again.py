"""Method born_again (distil/methods/born_again.py): Born-Again generations through pipeline.run on tiny LMs."""

import json

import pytest
import torch

from distil import pipeline
from distil.errors import DistilError
from distil.recipe import recipe_from_dict


def _quiet(*a, **k):
    pass


def _recipe(tiny_teacher, tmp_path, **born_again):
    return recipe_from_dict({
        "name": "ban", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": "born_again", "temperature": 2.0, "alpha": 0.8},
        "born_again": {"generations": 3, **born_again},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False, "save_every": 2},
        "output": {"dir": str(tmp_path / "runs")}})


def _losses(path):
    return [json.loads(x)["loss"] for x in path.read_text().splitlines()]


def test_generations_train_in_turn_each_with_a_row(tiny_teacher, tmp_path):
    result = pipeline.run(_recipe(tiny_teacher, tmp_path), echo=_quiet)
    run = result.run_dir
    for g in (1, 2, 3):
        assert len(_losses(run / f"gen-{g}" / "metrics.jsonl")) == 4
    assert not (run / "metrics.jsonl").exists()
    assert set(result.eval) == {"teacher", "student (before)", "student (born_again)", "student (gen 1)",
                                "student (gen 2)", "student (gen 3)", "student (ensemble)"}
    # the deliverable is the last generation: saved, and evaluated as the method's row
    assert result.eval["student (born_again)"] == result.eval["student (gen 3)"]
    assert result.eval["student (gen 1)"] != result.eval["student (gen 2)"]
    from safetensors.torch import load_file

    saved = load_file(str(result.student_dir / "model.safetensors"))
    last = load_file(str(run / "gen-3" / "checkpoints" / "step-000004" / "model.safetensors"))
    shared = [k for k in saved if f"student.{k}" in last]  # tied weights are stored once
    assert len(shared) > 10 and all(torch.equal(saved[k], last[f"student.{k}"]) for k in shared)
    # generation 2 learned from generation 1, not from the teacher: its first loss is the KD loss against gen 1
    # at the shared initial weights, which differs from generation 1's first loss (against the teacher)
    assert _losses(run / "gen-2" / "metrics.jsonl")[0] != _losses(run / "gen-1" / "metrics.jsonl")[0]


def test_resume_mid_generation_gives_the_uninterrupted_run(tiny_teacher, tmp_path, monkeypatch):
    ref = pipeline.run(_recipe(tiny_teacher, tmp_path / "ref"), echo=_quiet)

    import distil.trainer as trainer

    class Killed(Exception):
        pass

    calls = []

    def crash(name):  # gen-2, after its step 3 (a checkpoint at step 2 exists): as kill -9 would
        calls.append(name)
        if name == "train:step-3" and calls.count("train:step-3") == 2:
            raise Killed

    monkeypatch.setattr(trainer, "crash_point", crash)
    recipe = _recipe(tiny_teacher, tmp_path / "cut")
    with pytest.raises(Killed):
        pipeline.run(recipe, echo=_quiet)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "runs" / "ban" / "gen-2" / "checkpoints" / "step-000002").is_dir()
    assert not (tmp_path / "cut" / "runs" / "ban" / "gen-3").exists()
    resumed = pipeline.run(recipe, resume="latest", echo=_quiet)
    for g in (1, 2, 3):
        assert _losses(resumed.run_dir / f"gen-{g}" / "metrics.jsonl") == \
            _losses(ref.run_dir / f"gen-{g}" / "metrics.jsonl"), g
    assert resumed.eval == ref.eval


def test_random_init_and_no_ensemble(tiny_teacher, tmp_path):
    recipe = _recipe(tiny_teacher, tmp_path, generations=2, ensemble=False, init="random")
    recipe.train.steps, recipe.train.lr = 1, 1e-6
    result = pipeline.run(recipe, echo=_quiet)
    assert "student (ensemble)" not in result.eval and "student (gen 2)" in result.eval
    # generation 1 starts from the teacher's layers 0 and 3; a random generation 2 does not (one step of 1e-6 moves
    # no weight by more than ~1e-6)
    from safetensors.torch import load_file

    teacher = load_file(str(tiny_teacher / "model.safetensors"))["model.layers.3.mlp.up_proj.weight"]
    for g, far in ((1, False), (2, True)):
        ckpt = load_file(str(result.run_dir / f"gen-{g}" / "checkpoints" / "step-000001" / "model.safetensors"))
        moved = float((ckpt["student.model.layers.1.mlp.up_proj.weight"] - teacher).abs().max())
        assert (moved > 1e-2) == far, (g, moved)


def test_the_section_is_validated(tiny_teacher, tmp_path):
    base = {"teacher": {"source": "x"}, "distill": {"method": "born_again"}}
    with pytest.raises(DistilError, match=r"born_again\.generations: expected a value >= 1, found 0"):
        recipe_from_dict({**base, "born_again": {"generations": 0}})
    with pytest.raises(DistilError, match=r"born_again\.init: expected one of 'initial', 'random', found 'zeros'"):
        recipe_from_dict({**base, "born_again": {"init": "zeros"}})
    with pytest.raises(DistilError, match=r"born_again\.ensemble: the ensemble row cannot generate answers"):
        recipe_from_dict({**base, "eval": {"answers": 2}})
    recipe_from_dict({**base, "eval": {"answers": 2}, "born_again": {"ensemble": False}})  # fine


def test_cli_refuses_a_bad_section_in_one_line(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe(distill={"method": "born_again"}, born_again={"generations": -1})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "born_again.generations" in err
