"""Peak memory and time of one distillation-loss forward+backward: plain vs chunked vs fused vs TRL.

    .venv/bin/python benchmarks/loss_memory.py            # 2048 and 8192 tokens, ~4 min on 2 cores
    .venv/bin/python benchmarks/loss_memory.py --tokens 2048

Every row starts from the same state: student last hidden states h [N, 576] (requires grad), student lm_head
W [49152, 576] (requires grad), teacher hidden states [N, 960] and teacher lm_head [49152, 960], all fp32, all
labels valid, forward KL at T=1. One step computes what a training step needs: the loss and the gradients on
h and W. So the rows that take logits as input include the lm_head projections (the student's with autograd,
the teacher's under no_grad), and the fused rows project chunk by chunk themselves.

  plain        both logits materialised, `distillation_loss(..., chunk_size=None)` (ordinary autograd)
  chunked      both logits materialised, `distillation_loss(...)` (1024 tokens per chunk, grads in forward)
  fused        `fused_distillation_loss(h, W, labels, teacher_from_hidden(...))`: logits never whole
  trl_gkd      TRL's `GKDTrainer.generalized_jsd_loss(beta=0)` on materialised logits
  trl_fused    TRL's `DistillationTrainer` loss (`_chunked_divergence_loss`, tiled, beta=0) from hidden states

Memory method: torch's CPU allocator is invisible to tracemalloc, so each configuration runs in its own
subprocess and we read the kernel's counters in /proc/self/status. After building the inputs and running the
same step once on 64 tokens (library initialisation is not what we measure), the worker records VmRSS, resets
the peak counter (`echo 5 > /proc/self/clear_refs` resets VmHWM to the current RSS), runs one step and reads
VmHWM: peak extra = VmHWM - VmRSS before. Large tensors are mmap'd by glibc and returned to the OS when freed,
so RSS follows the live tensors closely; the gradients every method must return (h.grad, W.grad) are included.

Time: wall seconds (time.perf_counter) and CPU seconds of the process (user + sys, from resource.getrusage),
best of `--repeats` steps (default 2 at <= 2048 tokens, else 1), torch on 2 threads. On a shared machine the
wall time swings with other load; CPU time (the work done) is the steadier number to compare.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VOCAB = 49_152
H_STUDENT = 576
H_TEACHER = 960
METHODS = ("plain", "chunked", "fused", "trl_gkd", "trl_fused")
ROOT = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024  # kB -> bytes
    raise KeyError(key)


def _meminfo(key: str) -> int:
    for line in open("/proc/meminfo"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _make_step(method: str):
    import torch

    from distil.fused import fused_distillation_loss, teacher_from_hidden
    from distil.losses import distillation_loss

    if method in ("plain", "chunked"):
        chunk = None if method == "plain" else 1024

        def step(h, w, ht, wt, y):
            zs = h @ w.T
            with torch.no_grad():
                zt = ht @ wt.T
            distillation_loss(zs, zt, y, kind="forward_kl", chunk_size=chunk).loss.backward()

    elif method == "fused":

        def step(h, w, ht, wt, y):
            fused_distillation_loss(h, w, y, teacher_from_hidden(ht, wt), kind="forward_kl").loss.backward()

    elif method == "trl_gkd":
        from trl.experimental.gkd import GKDTrainer

        def step(h, w, ht, wt, y):
            zs = h @ w.T
            with torch.no_grad():
                zt = ht @ wt.T
            GKDTrainer.generalized_jsd_loss(zs[None], zt[None], labels=y[None], beta=0.0).backward()

    elif method == "trl_fused":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def step(h, w, ht, wt, y):
            mask = (y != -100).long()[None]
            loss, _, _ = _chunked_divergence_loss(h[None], ht[None], w, wt, mask, beta=0.0)
            loss.backward()

    else:
        raise ValueError(method)
    return step


def worker(method: str, n_tokens: int, repeats: int) -> dict:
    """Run one configuration in this process and return its measurements."""
    import torch

    sys.path.insert(0, str(ROOT))
    try:
        step = _make_step(method)
    except ImportError as e:
        return {"method": method, "tokens": n_tokens, "status": f"not installed ({e.name})"}

    g = torch.Generator().manual_seed(0)

    def inputs(n):
        h = torch.randn(n, H_STUDENT, generator=g).requires_grad_()
        ht = torch.randn(n, H_TEACHER, generator=g)
        y = torch.randint(0, VOCAB, (n,), generator=g)
        return h, ht, y

    w = (torch.randn(VOCAB, H_STUDENT, generator=g) * H_STUDENT**-0.5).requires_grad_()
    wt = torch.randn(VOCAB, H_TEACHER, generator=g) * H_TEACHER**-0.5
    h0, ht0, y0 = inputs(64)
    step(h0, w, ht0, wt, y0)  # warm-up: library init, lazily allocated buffers
    h, ht, y = inputs(n_tokens)
    w.grad = None
    times, cpus, peak = [], [], 0
    for _ in range(repeats):
        h.grad, w.grad = None, None
        base = _status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        step(h, w, ht, wt, y)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        times.append(t1 - t0)
        cpus.append(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        peak = max(peak, _status("VmHWM") - base)  # h.grad / w.grad are still alive here, as they should
    return {
        "method": method,
        "tokens": n_tokens,
        "status": "ok",
        "peak_extra_mb": peak / 2**20,
        "time_s": min(times),
        "cpu_s": min(cpus),
        "threads": torch.get_num_threads(),
    }


def _cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=None, help="steps per row (default 2 at <=2048 tokens, else 1)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/loss_memory.json"))
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "TOKENS", "REPEATS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return

    import torch

    rows = []
    for n in args.tokens:
        repeats = args.repeats or (2 if n <= 2048 else 1)
        for method in args.methods:
            # the materialising rows hold ~9 fp32 [N x V] tensors; don't push a shared machine into OOM
            need = 9.5 * n * VOCAB * 4 if method in ("plain", "trl_gkd") else 0
            if need > 0.9 * _meminfo("MemAvailable"):
                rows.append(
                    {
                        "method": method,
                        "tokens": n,
                        "status": f"skipped (needs ~{need / 2**30:.0f} GiB, "
                        f"{_meminfo('MemAvailable') / 2**30:.0f} GiB available)",
                    }
                )
                continue
            cmd = [sys.executable, __file__, "--worker", method, str(n), str(repeats)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if r.returncode != 0:
                row = {
                    "method": method,
                    "tokens": n,
                    "status": f"failed (exit {r.returncode})",
                    "stderr_tail": r.stderr[-500:],
                }
            else:
                row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {n:>5} {method:<10} {row.get('status')}", file=sys.stderr, flush=True)

    # ratios against the plain row at the same token count
    plain = {r["tokens"]: r for r in rows if r["method"] == "plain" and r["status"] == "ok"}
    for r in rows:
        base = plain.get(r["tokens"])
        if r["status"] == "ok" and base:
            r["mem_vs_plain"] = r["peak_extra_mb"] / base["peak_extra_mb"]
            r["time_vs_plain"] = r["time_s"] / base["time_s"]
            r["cpu_vs_plain"] = r["cpu_s"] / base["cpu_s"]

    print(
        f"\nforward+backward of the loss from hidden states, V={VOCAB}, student H={H_STUDENT}, "
        f"teacher H={H_TEACHER}, fp32, torch {torch.__version__}, {os.cpu_count()} cores\n"
    )
    nan = float("nan")
    print("| tokens | method | peak extra MB | x plain | wall s | x plain | CPU s | x plain |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if r["status"] != "ok":
            print(f"| {r['tokens']} | {r['method']} | {r['status']} | | | | | |")
            continue
        print(
            f"| {r['tokens']} | {r['method']} | {r['peak_extra_mb']:,.0f} | {r.get('mem_vs_plain', nan):.2f} "
            f"| {r['time_s']:.2f} | {r.get('time_vs_plain', nan):.2f} | {r['cpu_s']:.2f} "
            f"| {r.get('cpu_vs_plain', nan):.2f} |"
        )

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    result = {
        "benchmark": "loss_memory",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": _cpu_model(),
            "platform": platform.platform(),
            "loadavg_at_end": os.getloadavg(),
        },
        "torch": torch.__version__,
        "trl": trl_version,
        "setup": {
            "vocab": VOCAB,
            "student_hidden": H_STUDENT,
            "teacher_hidden": H_TEACHER,
            "dtype": "float32",
            "kind": "forward_kl (TRL: beta=0)",
            "temperature": 1.0,
            "labels": "all valid",
            "chunk_size": 1024,
        },
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
