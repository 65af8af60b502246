"""Multi-process: the loop runs unchanged under any launcher that sets the torch.distributed
environment (`torchrun` on CPU, as here; `accelerate launch` on GPUs; accelerate's own multi-CPU
launcher needs MPI). 2 CPU processes (gloo) with
batch B each must match 1 process with batch 2B (same global batches, same update)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_processes_match_one(make_recipe, tmp_path):
    single = make_recipe(name="one", train={"batch_size": 4, "steps": 3})
    multi = single.parent / "two.yaml"
    multi.write_text(single.read_text().replace("name: one", "name: two").replace("batch_size: 4", "batch_size: 2"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "distil", "run", str(single)], check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29533", "-m", "distil", "run", str(multi)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = tmp_path / "runs"

    def losses(name):
        return [json.loads(x)["loss"] for x in (runs / name / "metrics.jsonl").read_text().splitlines()]

    assert len(losses("two")) == 3
    assert losses("two") == pytest.approx(losses("one"), rel=1e-4)
    a = load_file(str(runs / "one" / "student" / "model.safetensors"))
    b = load_file(str(runs / "two" / "student" / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
