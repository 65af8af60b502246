"""Method mutual (distil/methods/mutual.py): deep mutual learning and the online teacher, on tiny LMs."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from distil import pipeline
from distil.methods.mutual import peer_kl
from distil.recipe import recipe_from_dict


def _quiet(*a, **k):
    pass


def _recipe(tiny_teacher, tmp_path, **mutual):
    return recipe_from_dict({
        "name": "dml", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": "mutual", "alpha": 0.5},
        "mutual": mutual,
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
        "output": {"dir": str(tmp_path / "runs")}})


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _kl64(p, q):
    return float((p * (p.log() - q.log())).sum(-1).sum())


def test_peer_kl_is_the_mean_kl_to_the_other_peers_detached():
    z = [torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]], dtype=torch.float64, requires_grad=True),
         torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True),
         torch.tensor([[2.0, -2.0, 0.0], [0.0, 0.0, 3.0]], dtype=torch.float64, requires_grad=True)]
    labels = torch.tensor([0, -100])  # the second row is not an item
    t = 2.0
    p = [torch.softmax(x.detach()[:1] / t, -1) for x in z]
    expected = t * t * (_kl64(p[1], p[0]) + _kl64(p[2], p[0])) / 2 / 4  # num_items = 4
    value = peer_kl(z, 0, labels, temperature=t, num_items=4)
    assert float(value.detach()) == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert z[1].grad is None and z[2].grad is None  # the others' predictions are targets, not trained through
    assert z[0].grad[1].abs().max() == 0  # the masked row


def test_two_peers_train_together_and_only_the_student_is_saved(tiny_teacher, tmp_path):
    result = pipeline.run(_recipe(tiny_teacher, tmp_path), echo=_quiet)
    keys = _keys(result.run_dir / "checkpoints" / "step-000003" / "model.safetensors")
    assert any(k.startswith("student.model.layers.1.") for k in keys)
    assert any(k.startswith("extras.peer2.model.layers.1.") for k in keys)
    assert not any(k.startswith("extras.teacher.") for k in keys)  # the frozen teacher is never in a checkpoint
    saved = load_file(str(result.student_dir / "model.safetensors"))
    assert not any("peer" in k for k in saved)
    ckpt = load_file(str(result.run_dir / "checkpoints" / "step-000003" / "model.safetensors"))
    shared = [k for k in saved if f"student.{k}" in ckpt]  # tied weights are stored once
    assert len(shared) > 10 and all(torch.equal(saved[k], ckpt[f"student.{k}"]) for k in shared)
    assert set(result.eval) == {"teacher", "student (before)", "student (mutual)", "student (peer 2)"}
    assert result.eval["student (mutual)"] != result.eval["student (peer 2)"]  # perturbed: not the same model
    import json

    row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"kd", "ce", "mutual", "kd_2", "ce_2", "mutual_2"} <= set(row) and row["mutual"] > 0


def test_online_teacher_trains_as_a_peer(tiny_teacher, tmp_path):
    result = pipeline.run(_recipe(tiny_teacher, tmp_path, peers=1, online_teacher=True), echo=_quiet)
    ckpt = load_file(str(result.run_dir / "checkpoints" / "step-000003" / "model.safetensors"))
    original = load_file(str(tiny_teacher / "model.safetensors"))
    trained = {k[len("extras.teacher."):]: v for k, v in ckpt.items() if k.startswith("extras.teacher.")}
    assert trained and set(trained) <= set(original) | {"lm_head.weight"}
    assert not torch.equal(trained["model.layers.2.mlp.up_proj.weight"], original["model.layers.2.mlp.up_proj.weight"])
    assert set(result.eval) == {"teacher", "student (before)", "student (mutual)", "teacher (online, trained)"}
    # the "teacher" row is the frozen original: KL 0 to itself; the trained peer has moved away from it
    assert result.eval["teacher"]["kl"] == 0 and result.eval["teacher (online, trained)"]["kl"] > 0
    saved = load_file(str(result.student_dir / "model.safetensors"))
    assert not any(k.startswith("extras") or "teacher" in k for k in saved)


def test_mutual_with_one_model_is_refused_in_one_line(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe(distill={"method": "mutual"}, mutual={"peers": 1})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "mutual.peers: deep mutual learning trains two or more models together" in err and "found 1" in err
    assert not (path.parent / "runs").exists()


def test_online_teacher_lr_scale_sets_its_own_step(tiny_teacher, tmp_path):
    """AdamW's first step moves each weight by lr * g / (|g| + eps), i.e. by lr wherever |g| >> eps: so the largest
    change of a teacher weight after one step is teacher_lr_scale x train.lr, and of a student weight train.lr."""
    import json

    recipe = _recipe(tiny_teacher, tmp_path, peers=1, online_teacher=True, teacher_lr_scale=0.1)
    recipe.train.steps, recipe.train.weight_decay = 1, 0.0
    result = pipeline.run(recipe, echo=_quiet)
    step = result.run_dir / "checkpoints" / "step-000001"
    ckpt = load_file(str(step / "model.safetensors"))
    original = load_file(str(tiny_teacher / "model.safetensors"))
    name = "model.layers.2.mlp.up_proj.weight"
    moved_teacher = float((ckpt[f"extras.teacher.{name}"] - original[name]).abs().max())
    moved_student = float((ckpt["student.model.layers.1.mlp.up_proj.weight"]
                           - original["model.layers.3.mlp.up_proj.weight"]).abs().max())  # student layer 1 = 3
    assert moved_teacher == pytest.approx(0.1 * 1e-2, rel=1e-3)
    assert moved_student == pytest.approx(1e-2, rel=1e-3)
    groups = json.loads((step / "optimizer_groups.json").read_text())["param_groups"]
    assert sorted(g.get("lr_scale", 1.0) for g in groups) == [0.1, 1.0]  # what a resume restores


def test_teacher_lr_scale_without_an_online_teacher_is_refused(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe(distill={"method": "mutual"}, mutual={"teacher_lr_scale": 0.1})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mutual.teacher_lr_scale" in err and "online_teacher: false" in err
