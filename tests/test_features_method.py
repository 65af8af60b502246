"""Method `features` (distil/methods/features.py) through `pipeline.run` on tiny models: its section, its loss
against the formula (from the models' own hidden states, in float64), its columns, its projections in checkpoints
(restored on resume, never in the saved student), bad input, and hooks under DDP."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from distil import pipeline
from distil.data import collate, micro_batch
from distil.errors import DistilError
from distil.recipe import explain, recipe_from_dict


def _quiet(*a, **k):
    pass


def _recipe(teacher, tmp_path, name="f", **sections):
    base = {
        "name": name, "teacher": {"source": str(teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": "features"},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False},
        "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe_from_dict(base)


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# ------------------------------------------------------------------------------------------------ the section


def test_features_section_is_validated_and_explained():
    text = "\n".join(explain())
    for key in ("features.layer_map", "features.every_k", "features.projection", "features.attention_weight"):
        assert key in text
    base = {"teacher": {"source": "x"}, "distill": {"method": "features"}}
    with pytest.raises(DistilError, match=r"features\.loss: expected one of 'mse', 'cosine', 'nmse', found 'l2'"):
        recipe_from_dict({**base, "features": {"loss": "l2"}})
    with pytest.raises(DistilError, match=r"features\.weight: expected a value >= 0"):
        recipe_from_dict({**base, "features": {"weight": -1}})
    with pytest.raises(DistilError) as err:  # a layer map longer than the student's layers: known at validation
        recipe_from_dict({**base, "student": {"source": "teacher", "layers": [0, 3]},
                          "features": {"layer_map": [0, 1, 2]}})
    assert "features.layer_map: 3 entries, but the student has 2 layers" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DistilError, match=r"features\.every_k: expected layer_map or every_k, found both"):
        recipe_from_dict({**base, "features": {"layer_map": [0], "every_k": 2}})
    with pytest.raises(DistilError, match=r"features\.layer_map: the student \('config:x'\) is not a copy"):
        recipe_from_dict({**base, "student": {"source": "config:x"}})
    with pytest.raises(DistilError, match=r"features\.attention_heads: only with attention: mapped"):
        recipe_from_dict({**base, "features": {"attention_heads": [0]}})
    ok = recipe_from_dict({**base, "features": {"layer_map": [3, None], "attention": "mapped"}})
    assert ok.features.layer_map == [3, None]


def test_a_bad_layer_map_is_one_line_and_exit_2_at_validation(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe(distill={"method": "features"}, features={"layer_map": [0, 1, 2]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "features.layer_map: 3 entries, but the student has 2 layers" in err
    assert main(["run", str(path)]) == 2
    assert not (path.parent / "runs").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------------------ the loss


@pytest.mark.parametrize("attention,heads,fused", [("mean", None, True), ("mapped", [1, 0, 3, 2], False)])
def test_first_step_matches_the_formula(tiny_teacher, tmp_path, attention, heads, fused):
    """Step 1's feature and attention columns = the formula on the initial models' hidden states / attention
    probabilities (float64, from output_hidden_states / output_attentions, not the hooks), and its kd column =
    method offline's on the same batch."""
    from distil.losses import distillation_loss
    from distil.models import load_model, student_from_teacher

    recipe = _recipe(tiny_teacher, tmp_path, student={"layers": [0, 2, 3]}, train={"steps": 1},
                     distill={"method": "features", "fused": fused},
                     features={"layer_map": [1, 2, None], "attention": attention, "attention_heads": heads,
                               "attention_weight": 0.5})
    res = pipeline.run(recipe, echo=_quiet)
    row = _rows(res.run_dir)[0]

    teacher = load_model(str(tiny_teacher))
    student = student_from_teacher(teacher, [0, 2, 3])
    from distil.data import load_examples, pad_id

    train, _ = load_examples(recipe.data, teacher.tokenizer, recipe.seed)
    batch = collate(micro_batch(train, 0, 2, recipe.seed, 0, 1), pad_id(teacher.tokenizer))
    outs = {}
    for who, m in (("s", student.model.double()), ("t", teacher.model.double())):
        m.set_attn_implementation("eager")
        with torch.no_grad():
            outs[who] = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          output_hidden_states=True, output_attentions=True)
    labels = batch["labels"]
    targets = [(b, t) for b in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
               if labels[b, t + 1] != -100]
    feat, attn = 0.0, 0.0
    for i, j in ((0, 1), (1, 2)):  # student layer i <- teacher layer j; hidden_states[k + 1] = layer k's output
        hs, ht = outs["s"].hidden_states[i + 1], outs["t"].hidden_states[j + 1]
        feat += sum(float((hs[b, t] - ht[b, t]).pow(2).mean()) for b, t in targets) / len(targets) / 2
        a_s, a_t = outs["s"].attentions[i], outs["t"].attentions[j]  # [B, H, T, T]
        if heads is None:  # heads averaged
            head_pairs, a_s, a_t = [(0, 0)], a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
        else:  # student head h <- teacher head heads[h]
            head_pairs = list(enumerate(heads))
        kl = [sum(sum(p * math.log(p / q) for p, q in zip(a_t[b, ht, t].tolist(), a_s[b, hs, t].tolist()) if p > 0)
                  for hs, ht in head_pairs) / len(head_pairs)
              for b, t in targets]  # KL(teacher row || student row), 0 log 0 = 0
        attn += sum(kl) / len(kl) / 2
    assert row["feature"] == pytest.approx(feat, rel=1e-4)
    # the run computes in fp32: a KL between nearly equal rows (~1e-5 here) loses digits to cancellation, so its
    # relative error is ~eps32 / KL (3e-4 seen on generic kernels); a wrong formula is off by far more
    assert row["attention"] == pytest.approx(attn, rel=2e-3)
    kd = distillation_loss(outs["s"].logits[:, :-1], outs["t"].logits[:, :-1], labels[:, 1:]).metrics["kd"]
    assert row["kd"] == pytest.approx(float(kd), rel=1e-4)
    assert row["loss"] == pytest.approx(row["kd"] + row["feature"] + 0.5 * row["attention"], rel=1e-5)
    assert row["feature"] > 0 and row["attention"] > 0


def test_projections_are_checkpointed_restored_on_resume_and_not_saved_with_the_student(tiny_teacher, tmp_path,
                                                                                       monkeypatch):
    sections = dict(features={"projection": "on", "attention": "mapped"}, train={"save_every": 2})
    saved_with = []
    save = pipeline.save_student
    monkeypatch.setattr(pipeline, "save_student",
                        lambda s, target: saved_with.append(s.model.config._attn_implementation) or save(s, target))
    whole = pipeline.run(_recipe(tiny_teacher, tmp_path, "whole", **sections), echo=_quiet)
    assert saved_with == ["sdpa"]  # eager attention was for training only
    rows = _rows(whole.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all({"kd", "feature", "attention"} <= set(r) for r in rows)

    # the same run, resumed from its step-2 checkpoint: steps 3 and 4 again, from the restored student, projections,
    # optimizer moments and RNG
    part = _recipe(tiny_teacher, tmp_path, "part", **sections)
    pipeline.run(part, echo=_quiet)
    step2 = whole.run_dir.parent / "part" / "checkpoints" / "step-000002"
    with torch.no_grad():  # a resume that forgot the projections would start from a different one
        tampered = _keys(step2 / "model.safetensors")["extras.features.proj.1.weight"]
    assert not torch.equal(tampered, torch.eye(32))
    pipeline.run(part, resume=str(step2), echo=_quiet)
    resumed = _rows(whole.run_dir.parent / "part")
    assert [r["loss"] for r in resumed] == [r["loss"] for r in rows]  # the same run, step for step
    assert [r["feature"] for r in resumed] == [r["feature"] for r in rows]

    ckpt = _keys(whole.run_dir / "checkpoints" / "step-000004" / "model.safetensors")
    again = _keys(whole.run_dir.parent / "part" / "checkpoints" / "step-000004" / "model.safetensors")
    proj = sorted(k for k in ckpt if k.startswith("extras.features.proj."))
    assert proj == ["extras.features.proj.0.bias", "extras.features.proj.0.weight",
                    "extras.features.proj.1.bias", "extras.features.proj.1.weight"]
    for k in proj:
        assert torch.equal(ckpt[k], again[k])
    assert not torch.equal(ckpt["extras.features.proj.1.weight"], torch.eye(32))  # trained (from the identity)
    student = _keys(whole.student_dir / "model.safetensors")
    assert not any("extras" in k for k in student)
    assert all(f"student.{k}" in ckpt or k == "model.embed_tokens.weight" for k in student)  # (tied: lm_head)
    config = json.loads((whole.student_dir / "config.json").read_text())
    assert config.get("_attn_implementation") in (None, "sdpa")  # eager was for training only


def test_a_narrower_student_gets_a_projection_and_projection_off_is_refused(tiny_teacher, tmp_path):
    narrow = {"source": "config:tiny-llama-char", "layers": None, "config": {"hidden_size": 16, "num_hidden_layers": 2}}
    res = pipeline.run(_recipe(tiny_teacher, tmp_path, "narrow", student=narrow, train={"steps": 2},
                               features={"layer_map": [1, 3]}), echo=_quiet)
    ckpt = _keys(res.run_dir / "checkpoints" / "step-000002" / "model.safetensors")
    assert ckpt["extras.features.proj.0.weight"].shape == (32, 16)  # FitNets regressor: 16 -> 32
    with pytest.raises(DistilError) as err:
        pipeline.run(_recipe(tiny_teacher, tmp_path, "off", student=narrow, train={"steps": 2},
                             features={"layer_map": [1, 3], "projection": "off"}), echo=_quiet)
    msg = str(err.value)
    assert msg.startswith("features.projection: off: ") and "\n" not in msg
    assert "'model.layers.0' [1, 32, 16]" in msg and "'model.layers.1' [1, 32, 32]" in msg


def test_layer_maps_that_do_not_fit_the_models_are_one_line(tiny_teacher, tmp_path):
    with pytest.raises(DistilError, match=r"features\.layer_map: teacher layer 9 does not exist; the teacher has 4 "
                                          r"layers \(0\.\.3\)"):
        pipeline.run(_recipe(tiny_teacher, tmp_path, "past", features={"layer_map": [0, 9]}), echo=_quiet)
    with pytest.raises(DistilError, match=r"features\.every_k: teacher layer 5 does not exist"):
        pipeline.run(_recipe(tiny_teacher, tmp_path, "k", features={"every_k": 3}), echo=_quiet)
    config_student = {"source": "config:tiny-llama-char", "layers": None, "config": {"num_hidden_layers": 2}}
    with pytest.raises(DistilError, match=r"features\.layer_map: 3 entries, but the student has 2 layers"):
        pipeline.run(_recipe(tiny_teacher, tmp_path, "long", student=config_student,
                             features={"layer_map": [0, 1, 2]}), echo=_quiet)


def test_bad_feature_path_names_the_nearest_paths(tiny_teacher):
    from distil.features import resolve
    from distil.models import load_model

    model = load_model(str(tiny_teacher)).model
    with pytest.raises(DistilError, match=r"'model\.layer\.3'.*nearest valid paths: model\.layers\.3"):
        resolve(model, "model.layer.3")


# ------------------------------------------------------------------------------------------------ DDP

HOOKS_UNDER_DDP = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from distil.features import capture
    from distil.models import load_model
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = load_model(sys.argv[1]).model
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    ddp = DDP(model)
    with capture(ddp, ["model.layers.1", "model.layers.2.self_attn"]) as feats:  # paths without DDP's 'module.'
        out = ddp(input_ids=ids[2 * rank: 2 * rank + 2])
    out.logits.sum().backward()  # a backward through DDP with the hooks in place
    torch.save({k: v.detach() for k, v in feats.items()}, f"{sys.argv[2]}/rank{rank}.pt")
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_hooks_see_the_same_tensors_under_ddp(tiny_teacher, tmp_path):
    """2 processes (gloo, torchrun on CPU): each rank's hooked tensors are one process's tensors for its half of the
    batch; and the features method's losses with 2 x batch 2 equal 1 x batch 4 (as tests/test_ddp.py)."""
    from distil.features import capture
    from distil.models import load_model

    script = tmp_path / "hooks.py"
    script.write_text(HOOKS_UNDER_DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29547", str(script), str(tiny_teacher), str(tmp_path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = load_model(str(tiny_teacher)).model
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), capture(model, ["model.layers.1", "model.layers.2.self_attn"]) as feats:
        model(input_ids=ids)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for k, v in feats.items():
            torch.testing.assert_close(got[k], v[2 * rank: 2 * rank + 2], rtol=1e-5, atol=1e-6)

    import yaml

    base = {"teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
            "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
            "distill": {"method": "features"}, "features": {"projection": "on", "attention": "mean"},
            "train": {"steps": 3, "lr": 1e-2, "warmup_steps": 0, "progress": False}, "eval": {"enabled": False},
            "output": {"dir": str(tmp_path / "runs")}}
    for name, bs in (("one", 4), ("two", 2)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**base, "name": name,
                                                               "train": {**base["train"], "batch_size": bs}}))
    subprocess.run([sys.executable, "-m", "distil", "run", str(tmp_path / "one.yaml")], check=True, env=env,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29548", "-m", "distil", "run", str(tmp_path / "two.yaml")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = _rows(tmp_path / "runs" / "one"), _rows(tmp_path / "runs" / "two")
    for key in ("loss", "kd", "feature", "attention"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-4), key
