"""Why Hinton's KD recovers little of the gap in the classic table (MNIST-1D), measured: two probes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_probes.py     # ~4 min on one core

The classic table's conv student (4-8-8 channels, 3.7k params) gains nothing from KD at T = 4 / 20 although the
teacher is 10 points better. Two things could be missing: dark knowledge in the teacher's targets, or a student
that can use it. The probes, with the classic table's data, teacher, budget (AdamW 1e-2 cosine, batch 128, 40
epochs) and KD (0.9 T^2 KL + 0.1 CE):
  1. the teacher's soft targets on its own training set: the mean probability outside its top-1 at T = 1, 4, 20,
     for the table's teacher and for the same teacher trained with dropout 0.5 before its classifier (Hinton's
     teacher was trained with dropout); each teacher's test accuracy.
  2. an over-parameterised student that overfits, as Hinton's was (an MLP 40-256-256-10, 77k params, no
     convolution): alone vs KD at T = 1, 4, 20 from the table's teacher, --seeds seeds.
Results: benchmarks/results/kd_probes.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import classic_table as ct  # noqa: E402
from distil import api  # noqa: E402

RESULT = Path(__file__).parent / "results" / "kd_probes.json"


def mlp(seed: int, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(40, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=float, default=40)
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ds = ct.mnist1d()
    x = ds["train"][0]
    budget = {"epochs": args.epochs, "batch_size": 128, "lr": 1e-2, "warmup_steps": 0, "log_every": 100_000}
    accuracy = lambda m: api.evaluate({"m": m}, ds["test"])["m"]["accuracy"]  # noqa: E731

    teachers = {}
    for dropout in (0.0, 0.5):
        t = ct.model(ds, ct.TEACHER, 0)
        if dropout:
            t.head = nn.Sequential(nn.Dropout(dropout), t.head)
        api.distill(None, t, ds["train"], loss="ce", seed=0, **budget)
        t.eval()
        teachers[dropout] = t
        print(f"teacher, dropout {dropout}: test {100 * accuracy(t):.2f}%, mass outside top-1 on its training set "
              f"{ct.soft_target_mass(t, x)}", flush=True)
    probe1 = {f"dropout {d}": {"test_accuracy": accuracy(t), "mass_outside_top1_on_train": ct.soft_target_mass(t, x)}
              for d, t in teachers.items()}

    memo = ct.Memo(teachers[0.0], x)
    rows = {"MLP alone": None, "KD, T=1": 1.0, "KD, T=4": 4.0, "KD, T=20": 20.0}
    per_seed: dict[str, list[float]] = {r: [] for r in rows}
    for seed in range(args.seeds):
        for row, temp in rows.items():
            s = mlp(1000 * seed + 1)
            if temp is None:
                api.distill(None, s, ds["train"], loss="ce", seed=seed, **budget)
            else:
                api.distill(memo, s, ds["train"], loss="kd", temperature=temp, alpha=0.9, seed=seed, **budget)
            per_seed[row].append(accuracy(s))
            print(f"  seed {seed} {row}: {100 * per_seed[row][-1]:.2f}%", file=sys.stderr, flush=True)
    teacher_acc = probe1["dropout 0.0"]["test_accuracy"]
    alone = statistics.fmean(per_seed["MLP alone"])
    probe2 = {r: {"accuracy_mean": statistics.fmean(v), "accuracy_std": statistics.stdev(v) if len(v) > 1 else 0.0,
                  "per_seed": v, "recovered": None if r == "MLP alone"
                  else (statistics.fmean(v) - alone) / (teacher_acc - alone)} for r, v in per_seed.items()}
    lines = [f"{'MLP student (40-256-256-10)':<28} {'accuracy':>16} {'gap recovered':>14}"]
    for r, v in probe2.items():
        rec = "" if v["recovered"] is None else f"{100 * v['recovered']:.0f}%"
        lines.append(f"{r:<28} {100 * v['accuracy_mean']:>7.2f} +- {100 * v['accuracy_std']:<5.2f} {rec:>14}")
    print("\n".join(lines))
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, 1 thread",
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/kd_probes.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "dataset": "mnist1d", "budget": {k: v for k, v in budget.items() if k != "log_every"},
              "teachers": probe1, "mlp_student_params": sum(q.numel() for q in mlp(0).parameters()),
              "mlp_student": probe2, "seconds": round(time.perf_counter() - t0, 1)}
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} ({record['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
