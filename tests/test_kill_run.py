"""kill -9 at any moment of `distil run`, then `--resume`: the same losses and the same student as a run that
was never interrupted; under every final name either the previous state or a complete new one.

The kills are real SIGKILLs (the process kills itself at a named point: errors.crash_point), in a subprocess.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(recipe, *args, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("DISTIL_TEST_KILL_AT", None)
    if kill_at:
        env["DISTIL_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "distil.cli", "run", str(recipe), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def _losses(run_dir):
    return [json.loads(x)["loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher):
    import yaml

    root = tmp_path_factory.mktemp("kill")
    recipe = {"name": "t", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "train": {"steps": 6, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False,
                        "save_every": 2},
              "eval": {"enabled": True, "hard_label_baseline": True}, "output": {"dir": str(root / "ref")}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    done = _run(path)
    assert done.returncode == 0, done.stderr
    run_dir = root / "ref" / "t"
    return path, run_dir, yaml.safe_load(path.read_text())


@pytest.mark.parametrize("kill_at", ["train:step-3", "train:saved-4", "train:step-6", "run:saved-student"])
def test_kill_then_resume_gives_the_uninterrupted_run(reference, tmp_path, kill_at):
    import yaml

    ref_recipe, ref_dir, data = reference
    data["output"]["dir"] = str(tmp_path / "runs")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    killed = _run(path, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    run_dir = tmp_path / "runs" / "t"
    # every final name holds a complete thing: checkpoints are complete, the student (if any) is loadable
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        assert (ckpt / "trainer_state.json").is_file(), ckpt
    if (run_dir / "student").exists():
        assert (run_dir / "student" / "model.safetensors").is_file()
    resumed = _run(path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(run_dir) == _losses(ref_dir)  # step for step, bit for bit
    assert _losses(run_dir / "hard_labels") == _losses(ref_dir / "hard_labels")
    mine = (run_dir / "student" / "model.safetensors").read_bytes()
    assert mine == (ref_dir / "student" / "model.safetensors").read_bytes()
    ref_eval = json.loads((ref_dir / "eval.json").read_text())["results"]
    assert json.loads((run_dir / "eval.json").read_text())["results"] == ref_eval
    leftovers = [p for p in run_dir.rglob(".*") if p.name.startswith((".tmp-", ".del-", ".old-"))]
    assert not leftovers
