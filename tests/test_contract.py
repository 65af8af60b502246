"""The method contract (distil/methods/contract.py): a method is one file; pipeline.run has no branch for it.

A toy method defined here (never registered in the package) exercises every part of the contract through
`pipeline.run`: a trainable module with an extra learned part, two phases (the second in a sub-directory),
per-step hooks, a custom item count, a named metric, extra eval rows and a finalize step.
"""

import copy
import dataclasses
import json
import typing

import pytest
import torch

from distil import pipeline
from distil.errors import DistilError
from distil.losses import LossOutput
from distil.methods import METHODS, build_hard_labels
from distil.methods.contract import Method, Phase, Stage, Trainable, count_targets
from distil.recipe import DistillSpec, Recipe, explain, recipe_from_dict


def _quiet(*a, **k):
    pass


def test_every_registered_method_has_a_literal_name_and_its_own_section():
    names = typing.get_args(typing.get_type_hints(DistillSpec)["method"])
    assert tuple(METHODS) == names
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    text = "\n".join(explain())
    for name, m in METHODS.items():
        assert m.name == name and m.teacher_use(Recipe()) in ("train", "prepare", "none") and callable(m.build)
        assert isinstance(m.loss_name(Recipe()), str)  # its loss_key names a real recipe key
        assert f"{name}: {m.summary}" in text
        if m.options is not None:
            section = m.section_name
            assert fields[section].default_factory is m.options  # typed by the method's own dataclass
            assert f"\n{section}: " in text
            assert isinstance(getattr(Recipe(), section), m.options)
    with pytest.raises(DistilError, match=r"distill\.method: expected one of 'offline', 'hard_labels', 'cache'"):
        recipe_from_dict({"distill": {"method": "distil.methods.offline"}, "teacher": {"source": "x"}})


def test_method_sections_are_validated_like_core_sections():
    with pytest.raises(DistilError, match=r"<recipe>: cache\.k: expected an integer, found 'many'"):
        recipe_from_dict({"teacher": {"source": "x"}, "cache": {"k": "many"}})
    with pytest.raises(DistilError, match=r"cache\.shard_tokens: expected .*> 0"):
        recipe_from_dict({"teacher": {"source": "x"}, "cache": {"shard_tokens": 0}})
    with pytest.raises(DistilError, match=r"cache\.kk: unknown key; did you mean 'k'"):
        recipe_from_dict({"teacher": {"source": "x"}, "cache": {"kk": 3}})
    # the method's own cross-key check runs at validation
    with pytest.raises(DistilError, match=r"distill\.loss: method 'cache' .* expected 'forward_kl', found 'jsd'"):
        recipe_from_dict({"teacher": {"source": "x"}, "distill": {"method": "cache", "loss": "jsd"}})


def test_hard_label_baseline_without_eval_is_refused_at_validation():
    with pytest.raises(DistilError, match=r"eval\.hard_label_baseline: .* expected eval\.enabled: true, found false"):
        recipe_from_dict({"teacher": {"source": "x"}, "eval": {"enabled": False, "hard_label_baseline": True}})


def _toy_method(log):
    """Two phases on one Trainable holding the student and a learned `scale`; hooks; a custom count."""

    def loss_fn(module, batch, num_items):
        out = build_hard_labels(vocab=106)(module, batch, num_items)
        scale = module.extras["scale"] if hasattr(module, "extras") else module.module.extras["scale"]
        penalty = (scale.weight - 2.0).pow(2).sum()  # pulls the extra part towards 2
        n = count_targets(batch)
        loss = out.loss + penalty * n / num_items  # summed over the global batch's items, like the loss
        return LossOutput(loss, {**out.metrics, "penalty": penalty.detach() * n / num_items}, out.n_tokens)

    def before_step(module, batches, step):
        log["before"].append(step)
        for b in batches:  # keep only the first half of each example's targets: the count must follow
            half = b["labels"].shape[1] // 2
            b["labels"][:, half:] = -100
        return batches

    def after_step(module, step):
        log["after"].append(step)

    def build(ctx):
        module = Trainable(ctx.student.model, {"scale": torch.nn.Linear(1, 1, bias=False)})
        log["module"] = module

        def phases():
            yield Phase("toy", module, loss_fn, ctx.train_examples, before_step=before_step, after_step=after_step)
            log["between"] = float(module.extras["scale"].weight.detach())  # phase 1 is trained when phase 2 is made
            yield Phase("toy-2", module, loss_fn, ctx.train_examples, subdir="gen2")

        def finalize():
            log["finalized"] = True
            return module.student

        return Stage(phases=phases(), finalize=finalize, eval_rows=lambda: {"student (copy)": module.student})

    return Method(name="toy", summary="a test method", teacher="train", build=build)


def test_a_new_method_runs_through_the_pipeline_without_a_branch(tiny_teacher, tmp_path, monkeypatch):
    log = {"before": [], "after": []}
    monkeypatch.setitem(pipeline.METHODS, "toy", _toy_method(log))
    recipe = recipe_from_dict({
        "name": "toy", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-1, "warmup_steps": 0, "progress": False},
        "output": {"dir": str(tmp_path / "runs")}})
    recipe.distill.method = "toy"  # not a registered name: set after validation, as a plugin would be
    result = pipeline.run(recipe, echo=_quiet)

    assert log["before"] == [0, 1, 2] and log["after"] == [0, 1, 2] and log["finalized"]
    assert log["between"] != 0.0
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["penalty"] > 0 for r in rows)
    # the count came after before_step: labels 0..15 of each 32-token block are kept, so 15 shifted targets
    # (positions 1..15) per block, 2 blocks a step
    assert [r["tokens"] for r in rows] == [30, 60, 90]
    assert (result.run_dir / "gen2" / "metrics.jsonl").is_file()
    # the checkpoint holds every trainable part, and never the teacher
    from safetensors import safe_open

    with safe_open(str(result.run_dir / "checkpoints" / "step-000003" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "extras.scale.weight" in keys and any(k.startswith("student.model.layers.1.") for k in keys)
    assert not any(k.startswith("student.model.layers.2.") for k in keys)  # the student has 2 layers only
    assert set(result.eval) == {"teacher", "student (before)", "student (toy)", "student (copy)"}
    assert result.eval["student (toy)"] == result.eval["student (copy)"]


def test_distil_eval_keeps_the_runs_rows(make_recipe, capsys):
    """`distil eval RUN` refreshes the rows it can recompute (the control from its checkpoint) and drops none."""
    from distil.cli import main

    path = make_recipe(eval={"enabled": True, "hard_label_baseline": True})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    recorded = json.loads((run / "eval.json").read_text())
    (run / "eval.json").write_text(json.dumps({**recorded, "results": {**recorded["results"],
                                                                     "student (by hand)": {"ppl": 1.0}}}))
    assert main(["eval", str(run)]) == 0
    again = json.loads((run / "eval.json").read_text())["results"]
    assert list(again) == list(recorded["results"]) + ["student (by hand)"]
    for name, row in recorded["results"].items():  # same weights, same data: the same numbers
        assert again[name]["kl"] == pytest.approx(row["kl"], rel=1e-5, abs=1e-7), name
        assert again[name]["ppl"] == pytest.approx(row["ppl"], rel=1e-5), name
    assert "student (hard_labels)" in capsys.readouterr().out


def test_resume_with_a_changed_recipe_is_refused_before_anything_is_written(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe(train={"save_every": 2})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert main(["run", str(path), "train.lr=0.5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr: the run was made with 0.001, the recipe now says 0.5" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["run", str(path), "train.steps=6", "--resume"]) == 0  # a longer run is the same run
    assert main(["run", str(path), "--resume", str(path.parent / "elsewhere")]) == 2
    assert "checkpoint directory not found" in capsys.readouterr().err


def test_resume_of_a_run_made_before_a_key_existed(make_recipe, capsys):
    """A run started by an older distil has no line for a key added since: that key reads as its default (what the
    run did), not as a change, so the run resumes; a key that is present and differs is still refused."""
    import yaml

    from distil.cli import main

    path = make_recipe(train={"save_every": 2})
    assert main(["run", str(path)]) == 0
    saved = path.parent / "runs" / "t" / "recipe.yaml"
    old = yaml.safe_load(saved.read_text())
    del old["eval"]["dark_knowledge"], old["output"]["report_html"], old["train"]["grad_accum"]
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    assert main(["run", str(path), "train.steps=6", "--resume"]) == 0
    saved.write_text(yaml.safe_dump(old, sort_keys=False))
    assert main(["run", str(path), "train.steps=8", "train.grad_accum=2", "--resume"]) == 2
    assert "train.grad_accum: the run was made with 1, the recipe now says 2" in capsys.readouterr().err


def test_resume_of_a_run_that_never_started_creates_nothing(make_recipe, capsys):
    from distil.cli import main

    path = make_recipe()
    assert main(["run", str(path), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert not (path.parent / "runs").exists()


@pytest.mark.parametrize("where", ["output_is_a_file", "parent_is_a_file"])
def test_output_dir_that_is_not_a_directory(make_recipe, tmp_path, capsys, where):
    from distil.cli import main

    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    out = blocker if where == "output_is_a_file" else blocker / "runs"
    assert main(["run", str(make_recipe(output={"dir": str(out)}))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "output.dir" in err
    assert blocker.read_text() == "keep me"


def test_a_refusal_while_building_leaves_no_half_made_run(tiny_teacher, tmp_path, monkeypatch):
    """A method that refuses its input in build (after the run directory was made) leaves nothing behind, so the
    same command reruns without --overwrite; a directory the method already wrote into is kept."""
    def refuse(ctx):
        raise DistilError("prune.mlp: expected a ratio in (0, 1), found 1.5")

    def refuse_after_writing(ctx):
        (ctx.run_dir / "calibration.json").write_text("{}")
        raise DistilError("prune: calibration data too short")

    monkeypatch.setitem(pipeline.METHODS, "refuse", Method(name="refuse", summary="", teacher="none", build=refuse))
    monkeypatch.setitem(pipeline.METHODS, "refuse2", Method(name="refuse2", summary="", teacher="none",
                                                            build=refuse_after_writing))
    recipe = recipe_from_dict({
        "name": "r", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "train": {"progress": False}, "output": {"dir": str(tmp_path / "runs")}})
    recipe.distill.method = "refuse"
    for _ in range(2):  # the second time without --overwrite: no "run directory already exists"
        with pytest.raises(DistilError, match=r"found 1\.5"):
            pipeline.run(recipe, echo=_quiet)
        assert not (tmp_path / "runs" / "r").exists()
    recipe.distill.method = "refuse2"
    with pytest.raises(DistilError, match="too short"):
        pipeline.run(recipe, echo=_quiet)
    assert sorted(p.name for p in (tmp_path / "runs" / "r").iterdir()) == ["calibration.json", "recipe.yaml"]


def test_a_stage_with_no_phase_and_a_finalize(tiny_teacher, tmp_path, monkeypatch):
    """PTQ-like: no training, only a conversion. The deliverable is what finalize returns: it is saved and
    evaluated as the method's row, and nothing is trained (no metrics.jsonl, no checkpoints)."""
    def build(ctx):
        def finalize():
            halved = copy.deepcopy(ctx.student.model)
            with torch.no_grad():
                halved.lm_head.weight.mul_(0.5)  # tied: the embeddings too
            return halved
        return Stage(phases=[], finalize=finalize)

    monkeypatch.setitem(pipeline.METHODS, "convert", Method(name="convert", summary="", teacher="none", build=build))
    recipe = recipe_from_dict({
        "name": "c", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "train": {"progress": False}, "output": {"dir": str(tmp_path / "runs")}})
    recipe.distill.method = "convert"
    result = pipeline.run(recipe, echo=_quiet)
    assert not (result.run_dir / "metrics.jsonl").exists() and not (result.run_dir / "checkpoints").exists()
    from safetensors.torch import load_file

    saved = load_file(str(result.student_dir / "model.safetensors"))
    from distil.models import load_model, student_from_teacher

    initial = student_from_teacher(load_model(str(tiny_teacher)), [0, 3]).model
    assert torch.equal(saved["model.embed_tokens.weight"], initial.model.embed_tokens.weight * 0.5)
    assert result.eval["student (convert)"] != result.eval["student (before)"]
