"""Compression on the embedded SmolLM2-135M: structured pruning (depth by Block Influence vs uniform, MLP + head
width), unstructured pruning (Wanda vs magnitude, 2:4), int4/int8 PTQ and int4 QAT, each row "before" (the
compressed model, no training) and "after" (recovered by distillation from the full model), in one table.

    .venv/bin/python benchmarks/compression.py                 # runs every row with `distil run` (~1 h busy 2 cores)
    .venv/bin/python benchmarks/compression.py --collect DIR   # only read DIR/<row>/eval.json of runs already made
    .venv/bin/python benchmarks/compression.py --no-recovery   # every compression without training, one process

Every row is `distil run <recipe> <overrides> name=<row> output.dir=DIR` (the commands are printed and stored in the
JSON): the recipes' budgets (seq_len 64, batch 4) with 6 recovery steps (~1,500 target tokens: the machine was
busy); 16 held-out examples (~1,000 tokens); calibration: the first 32 training examples (2,048 tokens).
KL = KL(teacher || row) per token, top-1 = agreement with the teacher's argmax, ppl = held-out perplexity
(distil.eval.metrics).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STEPS = "train.steps=6"  # the recovery budget measured here (the recipes say 20): 6 x 4 x 63 = 1,512 target tokens
# row -> (recipe, overrides, eval row of the compressed model before training, eval row after)
ROWS = {
    "ptq_int4": ("recipes/qat.yaml", ["distill.method=ptq"], "student (ptq)", None),
    "ptq_int8": ("recipes/qat.yaml", ["distill.method=ptq", "ptq.bits=8", "ptq.group_size=0"], "student (ptq)", None),
    "qat": ("recipes/qat.yaml", [STEPS], "student (ptq, no training)", "student (qat)"),
    "sparse_wanda": ("recipes/sparse_wanda.yaml", [STEPS], "student (sparse, no recovery)", "student (sparse)"),
    "sparse_magnitude": ("recipes/sparse_wanda.yaml", ["sparse.score=magnitude", "train.steps=1"],
                         "student (sparse, no recovery)", None),
    "sparse_wanda_2of4": ("recipes/sparse_wanda.yaml", ["sparse.pattern=2:4", "train.steps=1"],
                          "student (sparse, no recovery)", None),
    "prune_depth": ("recipes/prune_depth.yaml", [STEPS], "student (pruned, no recovery)", "student (prune)"),
    "prune_depth_uniform": ("recipes/prune_depth.yaml", ["prune.depth_score=uniform", STEPS],
                            "student (pruned, no recovery)", "student (prune)"),
    "prune_width": ("recipes/prune_width.yaml", [STEPS], "student (pruned, no recovery)", "student (prune)"),
}


def command(row: str, out: Path) -> list[str]:
    recipe, overrides, _, _ = ROWS[row]
    return ["distil", "run", recipe, *overrides, f"name={row}", f"output.dir={out}", "train.progress=false",
            "--overwrite"]


def collect(out: Path) -> dict:
    table = {}
    for row, (_, _, before, after) in ROWS.items():
        path = out / row / "eval.json"
        if not path.is_file():
            continue
        record = json.loads(path.read_text())
        results, params = record["results"], record.get("params", {})
        entry = {"command": " ".join(command(row, Path("DIR"))), "date": record.get("date")}
        for tag, name in (("dense", "student (before)"), ("before", before), ("after", after)):
            if name and name in results:
                r = results[name]
                entry[tag] = {"row": name, "params": params.get(name), "ppl": r.get("ppl"), "kl": r.get("kl"),
                              "top1": r.get("agreement")}
        table[row] = entry
    return table


def show(table: dict) -> str:
    lines = [f"{'row':<22}{'params':>9}{'ppl before':>12}{'KL before':>11}{'top-1 before':>14}"
             f"{'ppl after':>11}{'KL after':>10}{'top-1 after':>13}"]

    def cell(d, key, fmt):
        return format(d[key], fmt) if d and d.get(key) is not None else "-"

    dense = next((e["dense"] for e in table.values() if e.get("dense")), None)
    if dense:
        lines.append(f"{'dense (the teacher)':<22}{(dense['params'] or 0) / 1e6:>8.1f}M{cell(dense, 'ppl', '.2f'):>12}"
                     f"{cell(dense, 'kl', '.4f'):>11}{cell(dense, 'top1', '.3f'):>14}")
    for row, e in table.items():
        b, a = e.get("before"), e.get("after")
        params = (a or b or {}).get("params")
        lines.append(f"{row:<22}{(params or 0) / 1e6:>8.1f}M{cell(b, 'ppl', '.2f'):>12}{cell(b, 'kl', '.4f'):>11}"
                     f"{cell(b, 'top1', '.3f'):>14}{cell(a, 'ppl', '.2f'):>11}{cell(a, 'kl', '.4f'):>10}"
                     f"{cell(a, 'top1', '.3f'):>13}")
    return "\n".join(lines)


def no_recovery(threads: int) -> dict:
    """Every compression of the embedded SmolLM2-135M without any training, evaluated side by side in one process
    (one teacher load, one pass over the held-out data): the recipes' calibration data and held-out split."""
    import copy
    import time

    import torch

    from distil import data as data_mod
    from distil.compress import prune as P
    from distil.compress import qat as Q
    from distil.compress.calibration import calibration_batches
    from distil.compress.quantize import QuantConfig, quantize_
    from distil.compress.sparsity import Masks, compute_masks, sparsity_report
    from distil.eval.metrics import evaluate
    from distil.models import count_params, load_student, load_teacher
    from distil.recipe import load_recipe

    torch.set_num_threads(threads)
    recipe = load_recipe(ROOT / "recipes" / "prune_depth.yaml", ["train.threads=0"])
    teacher = load_teacher(recipe)
    student = load_student(recipe, teacher).model.eval()
    tok = teacher.tokenizer
    train_ex, eval_ex = data_mod.load_examples(recipe.data, tok, recipe.seed)
    pad = data_mod.pad_id(tok)
    calib = calibration_batches(train_ex, 32, 8, pad)
    rows, seconds = {}, {}

    def add(name, fn):
        t0 = time.time()
        rows[name] = fn()
        seconds[name] = round(time.time() - t0, 1)
        print(f"built {name} in {seconds[name]} s", flush=True)

    def sparse(score, pattern, sparsity=0.5):
        m = copy.deepcopy(student)
        spec = argparse.Namespace(score=score, pattern=pattern, sparsity=sparsity)
        Masks(m, compute_masks(m, spec, calib)).apply()
        assert abs(sparsity_report(m)["all"] - 0.5) < 1e-3
        return m

    def pruned(**kw):
        spec = argparse.Namespace(**{**dict(depth=0, depth_score="block_influence", mlp=0.0, heads=0, kv_heads=0,
                                            multiple_of=1), **kw})
        return P.prune(student, spec, calib)[0].eval()

    def quantized(bits, group, grid=None):
        m = copy.deepcopy(student)
        if grid:
            from distil.methods.qat import ptq_copy

            return ptq_copy(m, argparse.Namespace(grid=grid, group_size=group))
        quantize_(m, QuantConfig(bits=bits, group_size=group, backend="fake"))
        return m

    add("magnitude 50%", lambda: sparse("magnitude", "unstructured"))
    add("wanda 50%", lambda: sparse("wanda", "unstructured"))
    add("wanda 2:4", lambda: sparse("wanda", "2:4"))
    add("magnitude 2:4", lambda: sparse("magnitude", "2:4"))
    add("depth 20/30 BI", lambda: pruned(depth=20))
    add("depth 20/30 uniform", lambda: pruned(depth=20, depth_score="uniform"))
    add("depth 15/30 BI", lambda: pruned(depth=15))
    add("depth 15/30 uniform", lambda: pruned(depth=15, depth_score="uniform"))
    add("width mlp 50% + 6/9 heads", lambda: pruned(mlp=0.5, heads=6, multiple_of=256))
    add("int8 per channel", lambda: quantized(8, 0))
    add("int4 g32", lambda: quantized(4, 32))
    add("q4_0 grid", lambda: quantized(4, 32, grid="q4_0"))
    t0 = time.time()
    results = evaluate(teacher.model, rows, eval_ex, batch_size=8, pad_id=pad, vocab=len(tok), device="cpu")
    print(f"evaluated {len(rows) + 1} rows in {time.time() - t0:.0f} s", flush=True)
    table = {name: {"params": count_params(m) if name in rows else count_params(teacher.model),
                    "ppl": r["ppl"], "kl": r["kl"], "top1": r["agreement"]}
             for name, r in results.items() for m in [rows.get(name, teacher.model)]}
    lines = [f"{'no training':<28}{'params':>9}{'ppl':>10}{'KL':>9}{'top-1':>8}"]
    for name, r in table.items():
        lines.append(f"{name:<28}{r['params'] / 1e6:>8.1f}M{r['ppl']:>10.2f}{r['kl']:>9.4f}{r['top1']:>8.3f}")
    print("\n".join(lines))
    return {"rows": table, "eval_tokens": results["teacher"]["tokens"], "calibration_tokens": 32 * 64}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compression", help="parent of the run directories")
    ap.add_argument("--collect", default=None, help="only collect eval.json of runs already in this directory")
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to run")
    ap.add_argument("--no-recovery", action="store_true",
                    help="only evaluate every compression without training, in this process")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.no_recovery:
        sys.path.insert(0, str(ROOT))
        result = {"benchmark": "compression (no recovery)",
                  "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "machine": platform.machine(),
                  "cpu_count": os.cpu_count(), "teacher": "embedded:smollm2-135m-instruct",
                  "command": "python benchmarks/compression.py --no-recovery", **no_recovery(args.threads)}
        target = ROOT / "benchmarks" / "results" / "compression.json"
        saved = json.loads(target.read_text()) if target.is_file() else {}
        target.write_text(json.dumps({**saved, "no_recovery": result}, indent=2) + "\n")
        print(f"wrote {target} (no_recovery)")
        return
    out = Path(args.collect or args.out)
    if not args.collect:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for row in args.rows:
            cmd = command(row, out)
            print("$", " ".join(cmd), flush=True)
            subprocess.run([sys.executable, "-m", "distil", *cmd[1:]], cwd=ROOT, env=env, check=True)
    table = collect(out)
    print(show(table))
    result = {"benchmark": "compression", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": platform.machine(), "cpu_count": os.cpu_count(), "teacher": "embedded:smollm2-135m-instruct",
              "rows": table}
    target = ROOT / "benchmarks" / "results" / "compression.json"
    saved = json.loads(target.read_text()) if target.is_file() else {}
    if "no_recovery" in saved:  # written by --no-recovery: kept
        result["no_recovery"] = saved["no_recovery"]
    target.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
