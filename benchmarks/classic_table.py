"""The classic distillation table at our scale, through the Python API (distil.distill / born_again / mutual).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/classic_table.py            # the full table
    .venv/bin/python benchmarks/classic_table.py --seeds 1 --epochs 2 --dataset digits   # a quick look

Needs the `bench` extra (pip install -e .[bench]: scikit-learn for the digits, mnist1d for its generator). Offline:
MNIST-1D is regenerated procedurally (mnist1d.data.make_dataset with its default arguments: 4,000 train / 1,000
test sequences of 40 values, 10 classes; nothing is downloaded) and scikit-learn's digits ship with it (1,797 8x8
images; a fixed 1,297 / 500 split).

Models (both datasets; MNIST-1D's sequences are 40 x 1 images, so every feature map is [B, C, H, W]):
  teacher  3 conv blocks (conv + ReLU, no pooling) of 32, 64, 64 channels + a linear classifier
  student  the same 3 blocks with 4, 8, 8 channels (the same spatial sizes: maps pair up block for block)
Budget: every student row trains the same student architecture (the same initial weights within a seed) for the
same epochs (60 on the digits: 600 steps; 40 on MNIST-1D: 1,250 steps; the students' losses have flattened by
then), batch (128) and learning rate (AdamW 1e-2, cosine to 1e-3);
the teacher is trained once per dataset (seed 0) on the labels alone with that budget, and is run once per
training example (its outputs and feature maps are replayed: `Memo`). Born-Again trains 4 students of that
budget in a row (generation 0 on the labels, then 3 generations), DML 2 peers in one step.

Rows (CE = the labels' cross-entropy; the feature/relation rows are CE + that term, without KD, so that each row
measures its own signal, as in CRD's table):
  teacher alone / student alone               CE
  KD (Hinton), T in {1, 4, 20}                0.9 * T^2 KL(p_T^T || p_S^T) + 0.1 * CE
  FitNets                                     CE + MSE(regressor(student block 2), teacher block 2)  (1x1 conv)
  RKD                                         CE + RKD distance + 2 x angle on the last block's flattened maps
                                              (64 samples of each batch: the angle term costs B^3)
  FSP                                         CE + FSP(block1 -> block2, block2 -> block3), normalised matrices
  attention transfer                          CE + sum over the 3 blocks of AT (p = 2)
  DML pair                                    2 students, each CE + KL(other || self); the first peer is the row
  Born-Again, 3 generations                   generation g + 1 learns from generation g by KD (T = 4, alpha 0.9),
                                              generation 0 from the labels; rows for generation 3 and the
                                              ensemble of generations 1-3
Each row: test accuracy, mean and std over the seeds (the seed sets the students' initialisation and the data
order; the teacher is one model), test errors, and the recovered fraction of the teacher-student gap:
(acc(row) - acc(student alone)) / (acc(teacher) - acc(student alone)), from the seed means. Hinton et al.
2015's MNIST is the shape to compare with: teacher 67 errors, student alone 146, distilled 74 (91% recovered).
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

from distil import api  # noqa: E402
from distil.features import FeaturePair  # noqa: E402

RESULT = Path(__file__).parent / "results" / "classic_table.json"
TEACHER, STUDENT = (32, 64, 64), (4, 8, 8)
BLOCKS = ("body.1", "body.3", "body.5")  # the ReLU after each conv: the feature maps the terms match


# ----------------------------------------------------------------------------------------------------------------
# Data


def mnist1d() -> dict:
    """MNIST-1D regenerated procedurally with the package's default arguments (seed 42): [N, 1, 40, 1] inputs."""
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32)[:, None, :, None]
    xt = torch.tensor(d["x_test"], dtype=torch.float32)[:, None, :, None]
    return {"name": "mnist1d", "train": (x, torch.tensor(d["y"]).long()),
            "test": (xt, torch.tensor(d["y_test"]).long()), "kernel": (5, 1), "classes": 10}


def digits() -> dict:
    """scikit-learn's 8x8 digits, scaled to [0, 1]; a fixed permutation: 1,297 train / 500 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(d.target).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:500], order[500:]
    return {"name": "digits", "train": (x[train], y[train]), "test": (x[test], y[test]), "kernel": (3, 3),
            "classes": 10}


# ----------------------------------------------------------------------------------------------------------------
# Models


class ConvNet(nn.Module):
    """3 x (conv, ReLU) at full resolution ('same' padding), then a linear classifier on the flattened maps."""

    def __init__(self, widths: tuple[int, ...], kernel: tuple[int, int], size: int, classes: int):
        super().__init__()
        layers, cin = [], 1
        for w in widths:
            layers += [nn.Conv2d(cin, w, kernel, padding=(kernel[0] // 2, kernel[1] // 2)), nn.ReLU()]
            cin = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(cin * size, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


class Memo(nn.Module):
    """The frozen teacher, run once per training example and replayed: forward(x) returns its stored logits for
    those examples, and the modules at the BLOCKS paths re-emit its stored feature maps, so the hooks of the
    feature and relation terms see exactly the teacher's maps. Saves a teacher forward per step and row; the
    values are the teacher's own (eval mode, no dropout: a pure function of the input)."""

    def __init__(self, teacher: ConvNet, x: torch.Tensor):
        super().__init__()
        from distil.features import capture

        self.body = nn.Sequential(*[nn.Identity() for _ in teacher.body])
        teacher.eval()
        maps, logits = {p: [] for p in BLOCKS}, []
        with torch.no_grad(), capture(teacher, list(BLOCKS)) as feats:
            for chunk in x.split(256):
                logits.append(teacher(chunk))
                for p in BLOCKS:
                    maps[p].append(feats[p])
        self.logits = torch.cat(logits)
        self.maps = {p: torch.cat(v) for p, v in maps.items()}
        self.rows = {r.numpy().tobytes(): i for i, r in enumerate(x)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([self.rows[r.numpy().tobytes()] for r in x])
        for p in BLOCKS:
            self.body[int(p.split(".")[1])](self.maps[p][idx])
        return self.logits[idx]


def model(ds: dict, widths: tuple[int, ...], seed: int) -> ConvNet:
    torch.manual_seed(seed)
    size = ds["train"][0][0].numel()
    return ConvNet(widths, ds["kernel"], size, ds["classes"])


# ----------------------------------------------------------------------------------------------------------------
# Rows


def train_teacher(ds: dict, budget: dict) -> tuple[ConvNet, float]:
    """The teacher, once per dataset (seed 0), on the labels alone with the students' budget; its test accuracy."""
    teacher = model(ds, TEACHER, 0)
    api.distill(None, teacher, ds["train"], loss="ce", seed=0, **budget)
    teacher.eval()
    return teacher, api.evaluate({"m": teacher}, ds["test"])["m"]["accuracy"]


def soft_target_mass(teacher: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How much the teacher's soft targets on its own training set say beyond the label: the mean probability
    outside its top-1 at T = 1, 4, 20 (Hinton's dark knowledge lives there; near 0 = the targets are one-hot)."""
    with torch.no_grad():
        z = teacher(x).double()
    return {f"T={t}": float(1 - (z / t).softmax(-1).max(-1).values.mean()) for t in (1, 4, 20)}


def rows_for_seed(ds: dict, seed: int, budget: dict, teacher: nn.Module, teacher_acc: float) -> dict[str, float]:
    """Every row's test accuracy for one seed (the students' initialisation and data order)."""
    train, test = ds["train"], ds["test"]
    acc: dict[str, float] = {"teacher alone": teacher_acc}
    clock = [time.perf_counter()]

    def timed(name: str, value: float) -> None:  # a row's accuracy, and its seconds on stderr
        acc[name] = value
        now = time.perf_counter()
        print(f"  seed {seed} {name}: {100 * value:.2f}% ({now - clock[0]:.0f}s)", file=sys.stderr, flush=True)
        clock[0] = now

    def student(offset: int = 0) -> ConvNet:
        return model(ds, STUDENT, 1000 * seed + 1 + offset)  # the same initial student in every row of a seed

    def score(m: nn.Module) -> float:
        return api.evaluate({"m": m}, test)["m"]["accuracy"]

    s = student()
    api.distill(None, s, train, loss="ce", seed=seed, **budget)
    timed("student alone", score(s))
    for t in (1.0, 4.0, 20.0):
        s = student()
        api.distill(teacher, s, train, loss="kd", temperature=t, alpha=0.9, seed=seed, **budget)
        timed(f"KD (Hinton), T={t:g}", score(s))
    s = student()
    api.distill(teacher, s, train, loss="ce", seed=seed, features=[FeaturePair(BLOCKS[1], BLOCKS[1], "mse")],
                **budget)
    timed("FitNets (hint, block 2)", score(s))
    s = student()
    api.distill(teacher, s, train, loss="ce", seed=seed,
                relations=[api.RelationPair("rkd", BLOCKS[2], BLOCKS[2], samples=64)],
                **budget)
    timed("RKD (distance + angle)", score(s))
    s = student()
    pairs = [(BLOCKS[0], BLOCKS[1]), (BLOCKS[1], BLOCKS[2])]
    api.distill(teacher, s, train, loss="ce", seed=seed, relations=[api.RelationPair("fsp", pairs, pairs)], **budget)
    timed("FSP", score(s))
    s = student()
    api.distill(teacher, s, train, loss="ce", seed=seed, features=[api.AttentionPair(b, b) for b in BLOCKS], **budget)
    timed("attention transfer", score(s))
    peers = [student(), student(500)]
    api.mutual(peers, train, seed=seed, **budget)
    timed("DML pair (peer 1)", score(peers[0]))
    ban = api.born_again(student(), train, generations=3, temperature=4.0, alpha=0.9, seed=seed,
                         eval_data=test, **budget)
    timed("Born-Again, generation 3", ban.eval["generation 3"]["accuracy"])
    timed("Born-Again, ensemble of 1-3", ban.eval["ensemble"]["accuracy"])
    return acc


def summarise(per_seed: list[dict[str, float]], n_test: int) -> list[dict]:
    names = list(per_seed[0])
    mean = {n: statistics.fmean(r[n] for r in per_seed) for n in names}
    gap = mean["teacher alone"] - mean["student alone"]
    out = []
    for n in names:
        values = [r[n] for r in per_seed]
        out.append({"row": n, "accuracy_mean": mean[n], "accuracy_std": statistics.stdev(values) if len(values) > 1
                    else 0.0, "errors_mean": n_test * (1 - mean[n]), "per_seed": values,
                    "recovered": None if n in ("teacher alone", "student alone") or gap <= 0
                    else (mean[n] - mean["student alone"]) / gap})
    return out


def table(name: str, rows: list[dict], n_test: int) -> str:
    head = f"{name}  ({n_test} test examples)\n{'row':<30} {'accuracy':>16} {'errors':>7} {'gap recovered':>14}"
    lines = [head, "-" * len(head.splitlines()[1])]
    for r in rows:
        rec = "" if r["recovered"] is None else f"{100 * r['recovered']:.0f}%"
        lines.append(f"{r['row']:<30} {100 * r['accuracy_mean']:>7.2f} +- {100 * r['accuracy_std']:<5.2f} "
                     f"{r['errors_mean']:>7.1f} {rec:>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=["digits", "mnist1d", "both"], default="both")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=float, default=None, help="per model (default: 40 for MNIST-1D, 60 for digits)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default=str(RESULT))
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    makers = {"digits": (digits, 60), "mnist1d": (mnist1d, 40)}
    names = list(makers) if args.dataset == "both" else [args.dataset]
    record = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{torch.get_num_threads()} thread(s)",
              "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classic_table.py "
                         + " ".join(argv if argv is not None else sys.argv[1:]),
              "teacher_channels": TEACHER, "student_channels": STUDENT, "datasets": {}}
    t_all = time.perf_counter()
    for name in names:
        make, default_epochs = makers[name]
        ds = make()
        budget = {"epochs": args.epochs or default_epochs, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": 0, "log_every": 1000}
        t0 = time.perf_counter()
        teacher, teacher_acc = train_teacher(ds, budget)
        memo = Memo(teacher, ds["train"][0])  # the teacher's stored outputs on the training set, for every row
        mass = soft_target_mass(teacher, ds["train"][0])
        print(f"{name}: teacher {100 * teacher_acc:.2f}% ({time.perf_counter() - t0:.0f}s)", file=sys.stderr,
              flush=True)
        per_seed = []
        n_test = len(ds["test"][1])
        params = {k: sum(p.numel() for p in model(ds, w, 0).parameters()) for k, w in (("teacher", TEACHER),
                                                                                       ("student", STUDENT))}
        for seed in range(args.seeds):
            per_seed.append(rows_for_seed(ds, seed, budget, memo, teacher_acc))
            print(f"{name}: seed {seed} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
            rows = summarise(per_seed, n_test)
            record["datasets"][name] = {"train": len(ds["train"][1]), "test": n_test, "params": params,
                                        "budget": {k: v for k, v in budget.items() if k != "log_every"},
                                        "seeds": len(per_seed), "seconds": round(time.perf_counter() - t0, 1),
                                        "teacher_mass_outside_top1_on_train": mass,
                                        "rows": rows}
            record["seconds"] = round(time.perf_counter() - t_all, 1)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")  # after every seed: a partial table
        print(table(name, rows, n_test) + "\n", flush=True)
    print(f"wrote {args.out} ({record['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
