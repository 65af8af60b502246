"""kill -9 at chosen moments of `distil export` and `distil cache`: under every final name there is either the
previous state or a complete new one, and the next successful run leaves no temporary file behind (the cache's
result byte for byte the uninterrupted build's).

The moments are named crash points (`DISTIL_TEST_KILL_AT=<name>`, see distil.errors.crash_point: the process
SIGKILLs itself there), plus kills from outside after seeded random delays, which land wherever they land.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent


def distil(*args, kill_at: str | None = None, started=None, delay: float = 0.0):
    """Run `python -m distil ARGS` in a subprocess. With `kill_at` it must die of SIGKILL at that crash point.
    With `started` (a function polled every few ms) it is SIGKILLed from outside `delay` seconds after
    `started()` first returns true, if it still runs then; returns its return code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("DISTIL_TEST_KILL_AT", None)
    if kill_at:
        env["DISTIL_TEST_KILL_AT"] = kill_at
    cmd = [sys.executable, "-m", "distil", *map(str, args)]
    if started is None:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if kill_at:
            assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-2000:])
        else:
            assert proc.returncode == 0, proc.stderr[-2000:]
        return proc
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while proc.poll() is None and not started() and time.monotonic() < deadline:
        time.sleep(0.005)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=600)


def files(root: Path) -> dict[str, bytes]:
    """Every file under root, hidden ones included, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# distil export


@pytest.fixture(scope="module")
def export_case(tmp_path_factory):
    """A tiny model wide enough for k-quants (hidden 256), and its uninterrupted Q4_K_M export."""
    from distil.testing import save_tiny_model

    root = tmp_path_factory.mktemp("kill-export")
    model = save_tiny_model(root / "m", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    (root / "ref").mkdir()
    distil("export", model, "--gguf", root / "ref" / "m.gguf", "--quant", "Q4_K_M")
    ref = files(root / "ref")
    assert set(ref) == {"m.gguf", "m.Modelfile"}
    return model, ref


PREVIOUS = {"m.gguf": b"GGUF the previous export", "m.Modelfile": b"FROM ./m.gguf\n# previous\n"}


def check_export_dir(out: Path, ref: dict, previous: dict) -> None:
    """Final names hold the previous file or the complete new one; temporary files may remain (hidden)."""
    for name in ("m.gguf", "m.Modelfile"):
        found = (out / name).read_bytes() if (out / name).exists() else None
        assert found in (previous.get(name), ref[name]), f"{name}: neither the previous nor the new file"
    for p in out.iterdir():
        assert p.name in ("m.gguf", "m.Modelfile") or p.name.startswith("."), p.name


def rerun_export_and_check(model: Path, out: Path, ref: dict) -> None:
    distil("export", model, "--gguf", out / "m.gguf", "--quant", "Q4_K_M")
    assert files(out) == ref  # the new export, and no temporary file left by the killed one


@pytest.mark.parametrize("point", ["export:temp-created", "export:tensor-0", "export:tensor-9",
                                   "export:before-rename", "export:after-rename"])
@pytest.mark.parametrize("before", ["nothing", "previous"])
def test_export_killed_at_a_crash_point(point, before, export_case, tmp_path):
    model, ref = export_case
    previous = PREVIOUS if before == "previous" else {}
    for name, data in previous.items():
        (tmp_path / name).write_bytes(data)
    distil("export", model, "--gguf", tmp_path / "m.gguf", "--quant", "Q4_K_M", kill_at=point)
    check_export_dir(tmp_path, ref, previous)
    if point != "export:after-rename":
        assert files(tmp_path).get("m.gguf") == previous.get("m.gguf")  # the new file was never renamed in
    rerun_export_and_check(model, tmp_path, ref)


@pytest.mark.parametrize("seed", range(4))
def test_export_killed_after_a_random_delay(seed, export_case, tmp_path):
    model, ref = export_case
    for name, data in PREVIOUS.items():
        (tmp_path / name).write_bytes(data)
    delay = random.Random(seed).uniform(0.0, 0.5)  # the export itself takes ~0.5 s here

    def started():  # its temporary file exists
        return any(p.name.endswith(".tmp") for p in tmp_path.iterdir())

    distil("export", model, "--gguf", tmp_path / "m.gguf", "--quant", "Q4_K_M", started=started, delay=delay)
    check_export_dir(tmp_path, ref, PREVIOUS)
    rerun_export_and_check(model, tmp_path, ref)


# ----------------------------------------------------------------------------------------------
# distil cache


RECIPE = {
    "name": "t",
    "student": {"source": "teacher", "layers": [0, 3]},
    "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
    "distill": {"method": "cache"},
    "cache": {"k": 8, "shard_tokens": 2048},
    "train": {"steps": 4, "batch_size": 2, "progress": False},
    "eval": {"enabled": False},
}


def write_recipe(path: Path, teacher: Path, output_dir: Path) -> Path:
    path.write_text(yaml.safe_dump({**RECIPE, "teacher": {"source": str(teacher)}, "output": {"dir": str(output_dir)}}))
    return path


@pytest.fixture(scope="module")
def cache_ref(tiny_teacher, tmp_path_factory):
    """The files of the uninterrupted build of a cache with several shards."""
    root = tmp_path_factory.mktemp("kill-cache-ref")
    distil("cache", write_recipe(root / "ref.yaml", tiny_teacher, root / "runs"))
    ref = files(root / "runs" / "t-cache")
    assert sum(name.startswith("shard-") for name in ref) >= 3
    return ref


@pytest.fixture
def cache_case(cache_ref, tiny_teacher, tmp_path):
    """(recipe, its cache dir, the uninterrupted build's files): the same recipe, another output directory."""
    return write_recipe(tmp_path / "recipe.yaml", tiny_teacher, tmp_path / "runs"), tmp_path / "runs" / "t-cache", \
        cache_ref


def check_cache_dir(cdir: Path, ref: dict) -> None:
    """Every shard under its final name is complete (the reference's bytes); the manifest, if any, is the
    reference's identity listing a prefix of its shards."""
    if not cdir.exists():
        return
    found = files(cdir)
    for name, data in found.items():
        if name.startswith("shard-"):
            assert data == ref[name], f"{name}: a partial shard under its final name"
        else:
            assert name == "manifest.json" or name.startswith(".tmp-"), name
    if "manifest.json" in found:
        got, want = json.loads(found["manifest.json"]), json.loads(ref["manifest.json"])
        n = len(got["shards"])
        assert got["shards"] == want["shards"][:n]
        assert {k: v for k, v in got.items() if k not in ("shards", "complete")} == \
            {k: v for k, v in want.items() if k not in ("shards", "complete")}
        for s in got["shards"]:
            assert s["file"] in found  # listed means on disk


def rerun_cache_and_check(path: Path, cdir: Path, ref: dict) -> None:
    distil("cache", path)
    assert files(cdir) == ref  # byte for byte the uninterrupted build, and no temporary file left


@pytest.mark.parametrize("point", ["cache:manifest-new:tmp", "cache:shard-0:tmp", "cache:shard-1:renamed",
                                   "cache:manifest-1:tmp", "cache:manifest-1:renamed"])
def test_cache_killed_at_a_crash_point(point, cache_case):
    path, cdir, ref = cache_case
    distil("cache", path, kill_at=point)
    check_cache_dir(cdir, ref)
    rerun_cache_and_check(path, cdir, ref)


def test_cache_killed_twice_after_random_delays(cache_case):
    path, cdir, ref = cache_case
    rng = random.Random(1)
    for _ in range(2):  # the second kill lands in a build that resumes the first's
        listed = len(json.loads((cdir / "manifest.json").read_text())["shards"]) if cdir.exists() else -1

        def started():  # the build has begun (the first time) or written one more shard (the second)
            try:
                return len(json.loads((cdir / "manifest.json").read_text())["shards"]) > listed
            except (OSError, ValueError):
                return False

        distil("cache", path, started=started, delay=rng.uniform(0.0, 0.6))  # the build takes ~1 s here
        check_cache_dir(cdir, ref)
    rerun_cache_and_check(path, cdir, ref)
