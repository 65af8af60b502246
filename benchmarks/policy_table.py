"""Where the student's training text comes from, and which divergence: the policy table on a verifiable task.

    nice python benchmarks/policy_table.py --workers 2          # ~25 min on the 2-core machine, teacher trained
    python benchmarks/policy_table.py --quick                   # a smoke run (tiny budgets, 1 seed)

The task is `sum3` (distil/eval/tasks.py), the teacher the tiny Llama of `recipes/arithmetic_teacher.yaml` (trained
once, reused from runs/arithmetic_teacher/student; the teacher-data benchmark trains it when it is missing). Every
row starts from the SAME warm start per seed - the smaller student of `recipes/cot_arithmetic.yaml` trained from
scratch by SeqKD (the teacher's greedy chains of thought) for --warm steps - and then trains --steps more steps of
batch 64 with its own method, through distil's own pipeline (`distil.pipeline.run` with recipe overrides):

  warm start           no further training (the common starting point)
  SFT on gold          hard labels on the gold chain of thought (builtin:sum3)
  SeqKD (off-policy)   the teacher's greedy answers (the warm start's own method, continued)
  on-policy fwd KL     lmbda=1: the student samples, the teacher scores every token, KL(p_T || p_S)
  on-policy rev KL     lmbda=1, KL(p_S || p_T) (mode-seeking)
  GKD JSD(0.5)         lmbda=0.5 (half the steps on the dataset's gold text), JSD with beta=0.5
  sampled-token        lmbda=1, the sampled-token estimator of the reverse KL (policy gradient, clipped ratio)
  DPO after SeqKD      pairs: chosen = the teacher's greedy answer, rejected = the student's own sample; DPO beta 0.1

The GKD paper's setting (Agarwal et al. 2024) is this one: on-policy methods start from a supervised student, the
same budget after it. Scores on the task's 200 held-out questions (never in any training set): accuracy = greedy
pass@1; pass@1/4/16 unbiased (Chen et al. 2021) from 16 samples per question at temperature 1.0 (the student's own
distribution: where mode collapse would show); distinct-2 over those samples; mean completion length. Mean and
min..max over 3 seeds. Writes benchmarks/results/policy_table.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TASK = "sum3"
N_EVAL = 200
K = 16
SAMPLE_T = 1.0
RECIPE = ROOT / "recipes" / "cot_arithmetic.yaml"
TEACHER_DIR = ROOT / "runs" / "arithmetic_teacher" / "student"

GEN = ["onpolicy.max_new_tokens=40", "onpolicy.sample_temperature=1.0"]
ROWS = {
    "warm start": None,
    "SFT on gold": ["distill.method=hard_labels"],
    "SeqKD (off-policy)": ["distill.method=seqkd", "seqkd.max_new_tokens=40", "seqkd.batch_size=256"],
    "on-policy fwd KL": ["distill.method=onpolicy", "onpolicy.lmbda=1.0", "onpolicy.loss=forward_kl", *GEN],
    "on-policy rev KL": ["distill.method=onpolicy", "onpolicy.lmbda=1.0", "onpolicy.loss=reverse_kl", *GEN],
    "GKD JSD(0.5)": ["distill.method=onpolicy", "onpolicy.lmbda=0.5", "onpolicy.loss=jsd", "onpolicy.beta=0.5",
                     *GEN],
    "sampled-token": ["distill.method=onpolicy", "onpolicy.lmbda=1.0", "onpolicy.loss=sampled_reverse_kl", *GEN],
    "DPO after SeqKD": ["distill.method=preference", "preference.max_new_tokens=40", "preference.batch_size=256",
                        "preference.beta=0.1", "preference.student_temperature=1.0"],
    # DPO at the shared lr (1e-3) unlearns the end of its answers (see the README); at a DPO-sized lr:
    "DPO after SeqKD, lr 5e-5": ["distill.method=preference", "preference.max_new_tokens=40",
                                 "preference.batch_size=256", "preference.beta=0.1",
                                 "preference.student_temperature=1.0", "train.lr=5.0e-5"],
}
SLUG = {row: f"r{i}" for i, row in enumerate(ROWS)}


def score(model_dir: str | Path, n_eval: int = N_EVAL, k: int = K) -> dict:
    """Greedy accuracy, pass@1/4/16 (k samples at SAMPLE_T), distinct-2 and mean length of a saved model."""
    import torch

    from distil.data import ensure_bos
    from distil.eval.generation import distinct_n, generation_metrics
    from distil.eval.tasks import get_task
    from distil.generation import GenParams, generate
    from distil.models import load_model

    task = get_task(TASK)
    _, held = task.split(0, n_eval, seed=0)
    loaded = load_model(str(model_dir))
    tok = loaded.tokenizer
    prompts = [ensure_bos(tok, tok(ex.prompt, add_special_tokens=False)["input_ids"]) for ex in held]
    golds = [ex.answer for ex in held]
    torch.manual_seed(0)
    greedy = generate(loaded.model, tok, prompts, GenParams(max_new_tokens=48, temperature=0.0),
                      batch_size=100).records
    out = {"accuracy": generation_metrics(greedy, task, golds)["accuracy"]}
    sampled = generate(loaded.model, tok, prompts, GenParams(max_new_tokens=48, temperature=SAMPLE_T, n=k, seed=1),
                       batch_size=200).records
    ks = tuple(x for x in (1, 4, 16) if x <= k)
    m = generation_metrics(sampled, task, golds, ks=ks, distinct=(2,))
    out.update({f"pass@{x}": m[f"pass@{x}"] for x in ks})
    out.update({"distinct-2": distinct_n([r["completion"] for r in sampled], 2), "mean_length": m["mean_length"],
                "truncated": m["truncated"]})
    return out


def _run(overrides: list[str]) -> tuple[object, list[str]]:
    import torch

    torch.set_num_threads(1)
    from distil.pipeline import run
    from distil.recipe import load_recipe

    lines: list[str] = []
    return run(load_recipe(RECIPE, overrides), overwrite=True, echo=lines.append), lines


def _common(seed: int, out: str, teacher: str) -> list[str]:
    return [f"seed={seed}", f"output.dir={out}", f"teacher.source={teacher}", "train.progress=false",
            "eval.enabled=false"]


def warm_job(seed: int, out: str, warm: int, teacher: str) -> float:
    """The common starting point of a seed: SeqKD from scratch for `warm` steps (reused when it is there)."""
    t0 = time.perf_counter()
    if not (Path(out) / f"warm-s{seed}" / "student" / "config.json").is_file():
        _run(["distill.method=seqkd", "seqkd.max_new_tokens=40", "seqkd.batch_size=256", f"name=warm-s{seed}",
              f"train.steps={warm}", *_common(seed, out, teacher)])
    return time.perf_counter() - t0


def row_job(row: str, seed: int, out: str, steps: int, n_eval: int, k: int, teacher: str) -> dict:
    """One row, one seed: from the seed's warm start, `steps` more steps of the row's method, then the scores."""
    warm_dir = Path(out) / f"warm-s{seed}" / "student"
    start = time.perf_counter()
    try:
        if ROWS[row] is None:
            return {"row": row, "seed": seed, **score(warm_dir, n_eval, k), "train_s": 0.0}
        # the continuation: the warm start's weights, a short warmup, a lower peak lr than from scratch
        # (the row's own overrides come last: they win over the shared ones)
        result, _ = _run([f"name={SLUG[row]}-s{seed}", f"student.source={warm_dir}", f"train.steps={steps}",
                          "train.warmup_steps=10", "train.lr=1.0e-3", "student.config={}",
                          *_common(seed, out, teacher), *ROWS[row]])
        trained = time.perf_counter() - start
        return {"row": row, "seed": seed, **score(result.student_dir, n_eval, k), "train_s": round(trained, 1)}
    except Exception as exc:  # a failing row is reported; the others still count
        return {"row": row, "seed": seed,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"}


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def write_report(path: str, info: dict, teacher: dict, results: list[dict], gaps: list[str], wall: float,
                 partial: bool) -> str:
    metrics = ("accuracy", "pass@1", "pass@4", "pass@16", "distinct-2", "mean_length")
    table = {}
    for row in ROWS:
        ok = [r for r in results if r["row"] == row and "error" not in r]
        if ok:
            table[row] = {m: summarize([r[m] for r in ok]) for m in metrics if m in ok[0]}
            table[row]["seeds"] = len(ok)
    head = f"{'row':<22}{'accuracy':>22}{'pass@1':>9}{'pass@4':>9}{'pass@16':>9}{'distinct-2':>12}{'length':>8}"
    lines = [head, "-" * len(head)]
    if teacher:
        lines.append(f"{'teacher':<22}{teacher['accuracy']:>9.3f}{'':>13}{teacher.get('pass@1', 0):>9.3f}"
                     f"{teacher.get('pass@4', 0):>9.3f}{teacher.get('pass@16', 0):>9.3f}"
                     f"{teacher['distinct-2']:>12.3f}{teacher['mean_length']:>8.1f}")
    for row, t in table.items():
        a = t["accuracy"]
        lines.append(f"{row:<22}{a['mean']:>9.3f} [{a['min']:.3f}..{a['max']:.3f}]"
                     + "".join(f"{t[m]['mean']:>9.3f}" for m in ("pass@1", "pass@4", "pass@16") if m in t)
                     + f"{t['distinct-2']['mean']:>12.3f}{t['mean_length']['mean']:>8.1f}")
    text = "\n".join(lines)
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **info,
              "load_average_now": os.getloadavg(), "partial": partial, "wall_s": round(wall, 1), "teacher": teacher,
              "table": table, "gaps": gaps, "runs": results, "text": text}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--warm", type=int, default=1500, help="SeqKD steps of the common warm start")
    ap.add_argument("--steps", type=int, default=300, help="steps of every row after the warm start")
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    ap.add_argument("--workers", type=int, default=2, help="seeds trained at once (one thread each)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_policy"))
    ap.add_argument("--teacher", default=str(TEACHER_DIR))
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 + 4 steps, 1 seed, 10 questions, k=4")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "policy_table.json"))
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), help="only these rows; the other rows' results are "
                    "kept from the existing --json file (same warm starts: reused from --out)")
    args = ap.parse_args()
    k = K
    if args.quick:
        args.seeds, args.warm, args.steps, args.n_eval, k = 1, 20, 4, 10, 4
        args.json = str(Path(args.out) / "quick.json")
    for var, value in (("OMP_NUM_THREADS", "1"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)
    if not (Path(args.teacher) / "config.json").is_file():
        print(f"no teacher at {args.teacher}: run `distil run recipes/arithmetic_teacher.yaml` (or "
              f"benchmarks/teacher_data_methods.py, which trains it) first", file=sys.stderr)
        return 2
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    t0 = time.perf_counter()
    info = {"command": "nice python benchmarks/policy_table.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "load_average_at_start": os.getloadavg(), "task": TASK, "n_eval": args.n_eval, "k": k,
            "sample_temperature": SAMPLE_T, "warm_steps": args.warm, "steps": args.steps, "batch_size": 64,
            "seeds": args.seeds, "workers": args.workers, "recipe": str(RECIPE.relative_to(ROOT)),
            "rows": {row: o for row, o in ROWS.items()}}
    results: list[dict] = []
    gaps: list[str] = []
    teacher: dict = {}
    rows = list(ROWS)
    if args.rows:  # keep what the file holds for the other rows (and its teacher row)
        old = json.loads(Path(args.json).read_text()) if Path(args.json).is_file() else {}
        rows = list(args.rows)
        results = [r for r in old.get("runs", []) if r["row"] not in rows]
        info["command"] = old.get("command", "") + " ; then: " + info["command"]
        info["rerun"] = rows
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        t_future = pool.submit(score, args.teacher, args.n_eval, k)
        warm = {pool.submit(warm_job, seed, args.out, args.warm, args.teacher): seed for seed in range(args.seeds)}
        for fut in as_completed(list(warm)):
            info.setdefault("warm_s", {})[warm[fut]] = round(fut.result(), 1)
        futures = [pool.submit(row_job, row, seed, args.out, args.steps, args.n_eval, k, args.teacher)
                   for row in rows for seed in range(args.seeds)]
        for fut in as_completed([t_future, *futures]):
            if fut is t_future:
                teacher = fut.result()
                print(json.dumps({"row": "teacher", **teacher}), flush=True)
            else:
                res = fut.result()
                if "error" in res:
                    gaps.append(f"{res['row']} seed {res['seed']}: {res['error']}")
                results.append(res)
                print(json.dumps(res), flush=True)
            write_report(args.json, info, teacher, results, gaps, time.perf_counter() - t0, partial=True)
    text = write_report(args.json, info, teacher, results, gaps, time.perf_counter() - t0, partial=False)
    print(text)
    print(f"wrote {args.json} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
