"""Teacher-data methods on a verifiable task: which way of learning from a teacher's text makes the best student?

    python benchmarks/teacher_data_methods.py --steps 2500 --workers 2
        # 38.5 min on the shared 2-core machine at load 5-8 (the teacher already trained; ~8 min more if not)
    python benchmarks/teacher_data_methods.py --quick          # a smoke run (tiny budgets, 1 seed)

The task is `sum3` (distil/eval/tasks.py: '436+760+20=' -> '436+760=1196\\n1196+20=1216\\n#### 1216', one token per
character). The teacher is a tiny Llama trained from scratch on the gold chain of thought by
`recipes/arithmetic_teacher.yaml` (trained once, reused from runs/arithmetic_teacher/student when it is there). Every
row trains the same smaller student from scratch through distil's own pipeline (`distil.pipeline.run` on
`recipes/cot_arithmetic.yaml` with overrides), with the same budget (steps x batch), on the same training questions:

  gold answers only   hard labels on '#### 1216' (the references without their rationale)
  SeqKD               the teacher's greedy answers (its chain of thought) replace the references
  synthetic           the teacher writes new questions (it was trained on whole 'question=CoT' texts, so it can:
                      sampled from BOS, stopped at '='), then answers them; the task verifies the answers
  CoT (rejection)     n teacher samples per question, the verified ones are learned
  CoT + token KD      the same traces, plus the teacher's token distributions on them

Scores on the task's held-out questions (hash split: never in any training set): accuracy = pass@1 of greedy
decoding, pass@8 (unbiased, Chen et al. 2021) and distinct-2 over 8 samples per question at temperature 0.7; mean
and spread (min..max) over 3 seeds. Writes benchmarks/results/teacher_data_methods.json.
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
N_EVAL = 200  # held-out questions
K = 8  # samples per question for pass@k and distinct-2
SAMPLE_T = 0.7


def score(model_dir: str | Path, n_eval: int = N_EVAL, k: int = K, temperature: float = SAMPLE_T,
          prefix: str = "", batch_size: int = 100) -> dict:
    """Accuracy (greedy pass@1), pass@k and distinct-2 (k samples per question) of a saved model on the task's
    eval split, through distil's own generate() and generation metrics."""
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
    # the prompt exactly as distil/data.py renders it with data.chat_template: false: the bare question, after the
    # BOS only if the tokenizer adds one itself (the character tokenizer does not)
    prompts = [ensure_bos(tok, tok(prefix + ex.prompt, add_special_tokens=False)["input_ids"]) for ex in held]
    golds = [ex.answer for ex in held]
    torch.manual_seed(0)
    greedy = generate(loaded.model, tok, prompts, GenParams(max_new_tokens=48, temperature=0.0),
                      batch_size=batch_size).records
    out = {"accuracy": generation_metrics(greedy, task, golds)["accuracy"]}
    if k:
        sampled = generate(loaded.model, tok, prompts, GenParams(max_new_tokens=48, temperature=temperature, n=k,
                                                                 seed=1), batch_size=batch_size).records
        m = generation_metrics(sampled, task, golds, ks=(1, k), distinct=(2,))
        out.update({f"pass@{k}": m[f"pass@{k}"], "sample_accuracy": m["accuracy"],
                    "distinct-2": distinct_n([r["completion"] for r in sampled], 2)})
    return out


RECIPE = ROOT / "recipes" / "cot_arithmetic.yaml"
TEACHER_RECIPE = ROOT / "recipes" / "arithmetic_teacher.yaml"
TEACHER_DIR = ROOT / "runs" / "arithmetic_teacher" / "student"

# row -> recipe overrides on recipes/cot_arithmetic.yaml (the CoT rows are that recipe as it is)
ROWS = {
    "gold answers only": ["distill.method=hard_labels", "data.source=builtin:sum3_answers"],
    "SeqKD": ["distill.method=seqkd", "seqkd.max_new_tokens=40", "seqkd.batch_size=256"],
    # the teacher WRITES the questions (sampled from BOS at T=1, cut at '='; kept when they parse as sum3 questions
    # on the train side of the hash split, ~80%), then answers them greedily; answers that do not verify are
    # dropped. 2,400 written for about as many questions as the CoT rows see (the recipe's 1,900 training records).
    "synthetic": ["distill.method=synthetic", "synthetic.task=sum3", "synthetic.task_questions=teacher",
                  "synthetic.question_temperature=1.0", "synthetic.question_max_tokens=16",
                  "synthetic.max_prompts=2400", "synthetic.max_new_tokens=40", "synthetic.batch_size=256",
                  "synthetic.min_tokens=0"],
    "CoT (rejection sampling)": [],
    "CoT + token KD": ["cot.token_kd=true"],
}


def synthetic_available() -> bool:
    return (ROOT / "distil" / "methods" / "synthetic.py").is_file()


def run_row(row: str, seed: int, out: str, steps: int, n_eval: int, k: int, teacher: str) -> dict:
    """One row, one seed: distil's own pipeline on the recipe with this row's overrides, then the scores."""
    import torch

    torch.set_num_threads(1)
    from distil.pipeline import run
    from distil.recipe import load_recipe

    name = f"{row.split()[0].lower().replace('(', '')}-{ROWS_SLUG[row]}-s{seed}"
    overrides = ROWS[row] + [f"seed={seed}", f"name={name}", f"output.dir={out}", f"train.steps={steps}",
                             f"teacher.source={teacher}", "train.progress=false", "eval.enabled=false"]
    if row.startswith("CoT"):  # both CoT rows of a seed learn from the same teacher samples (generated once)
        overrides.append(f"cot.dir={out}/cot-samples-s{seed}")
    recipe = load_recipe(RECIPE, overrides)
    lines: list[str] = []
    start = time.perf_counter()
    result = run(recipe, overwrite=True, echo=lines.append)
    trained = time.perf_counter() - start
    scores = score(result.student_dir, n_eval=n_eval, k=k)
    extra = {}
    cot_json = Path(out) / name / "cot.json"
    if cot_json.is_file():
        extra["teacher_samples"] = json.loads(cot_json.read_text())["summary"]
    prov = Path(out) / f"{name}-synthetic" / "provenance.json"
    if prov.is_file():
        p = json.loads(prov.read_text())
        extra["synthetic_provenance"] = {k: p.get(k) for k in ("question_filters", "filters")}
    return {"row": row, "seed": seed, **scores, "train_s": round(trained, 1),
            "examples": next((ln for ln in lines if ln.startswith("student:")), ""), **extra}


ROWS_SLUG = {row: str(i) for i, row in enumerate(ROWS)}


def run_rows(rows: list[str], seed: int, *args) -> list[dict]:
    """Rows of one seed in one worker, one after the other (the CoT rows share their teacher samples)."""
    out = []
    for row in rows:
        try:
            out.append(run_row(row, seed, *args))
        except Exception as exc:  # a row that fails is reported, the others still count
            out.append({"row": row, "seed": seed, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
    return out


def summarize(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def write_report(path: str, info: dict, teacher: dict, rows: list[str], results: list[dict], gaps: list[str],
                 wall: float, partial: bool = False) -> tuple[str, dict | None]:
    """The table (mean [min..max] over seeds), the verdict on the target, and the JSON file."""
    metrics = ("accuracy", f"pass@{K}", "distinct-2")
    table = {}
    for row in rows:
        ok = [r for r in results if r["row"] == row and "error" not in r]
        if ok:
            table[row] = {m: summarize([r[m] for r in ok]) for m in metrics}
            table[row]["seeds"] = len(ok)
    gold = table.get("gold answers only", {}).get("accuracy", {}).get("mean")
    header = f"{'row':<26}{'accuracy (pass@1)':>24}{'pass@8':>22}{'distinct-2':>12}{'acc / gold':>12}"
    lines = [header, "-" * len(header)]
    if teacher:
        lines.append(f"{'teacher':<26}{teacher['accuracy']:>9.3f}{'':>15}{teacher[f'pass@{K}']:>8.3f}{'':>14}"
                     f"{teacher['distinct-2']:>12.3f}")
    for row, t in table.items():
        a, p, d = t["accuracy"], t[f"pass@{K}"], t["distinct-2"]
        ratio = "1.0x" if row == "gold answers only" else (f"{a['mean'] / gold:.1f}x" if gold else "-")
        lines.append(f"{row:<26}{a['mean']:>9.3f} [{a['min']:.3f}..{a['max']:.3f}]"
                     f"{p['mean']:>8.3f} [{p['min']:.3f}..{p['max']:.3f}]{d['mean']:>12.3f}{ratio:>12}")
    text = "\n".join(lines)
    cot, base = table.get("CoT (rejection sampling)"), table.get("gold answers only")
    verdict = None
    if cot and base:
        gap = cot["accuracy"]["mean"] - base["accuracy"]["mean"]
        spread = max(cot["accuracy"]["max"] - cot["accuracy"]["min"], base["accuracy"]["max"] - base["accuracy"]["min"])
        verdict = {"cot_minus_gold": gap, "largest_seed_spread": spread, "target_met": gap > spread}
    report = {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **info,
              "load_average_now": os.getloadavg(), "partial": partial, "wall_s": round(wall, 1),
              "teacher": teacher, "table": table, "verdict": verdict, "gaps": gaps, "runs": results, "text": text}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")
    return text, verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=0, help="training steps per row (default: the recipe's)")
    ap.add_argument("--n-eval", type=int, default=N_EVAL)
    ap.add_argument("--workers", type=int, default=2, help="rows trained at once (one thread each)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_teacher_data"))
    ap.add_argument("--quick", action="store_true", help="smoke run: 30 steps, 1 seed, 20 eval questions")
    ap.add_argument("--teacher", default=str(TEACHER_DIR), help="the trained teacher (trained first if missing)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "teacher_data_methods.json"))
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.steps, args.n_eval = 1, args.steps or 30, 20
        args.json = str(Path(args.out) / "quick.json")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import yaml

    steps = args.steps or yaml.safe_load(RECIPE.read_text())["train"]["steps"]
    t0 = time.perf_counter()
    teacher_dir = Path(args.teacher)
    if not (teacher_dir / "config.json").is_file():
        print(f"training the teacher once: distil run {TEACHER_RECIPE.relative_to(ROOT)}", flush=True)
        from distil.pipeline import run
        from distil.recipe import load_recipe

        run(load_recipe(TEACHER_RECIPE, [f"output.dir={teacher_dir.parent.parent}", f"name={teacher_dir.parent.name}",
                                         "train.progress=false"]),
            overwrite=True)
    teacher_s = time.perf_counter() - t0
    rows = [r for r in ROWS if r != "synthetic" or synthetic_available()]
    gaps = [] if synthetic_available() else ["synthetic: distil/methods/synthetic.py is not in this tree"]

    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing as mp

    # the long jobs (the CoT pair of a seed) first, then one row at a time over the seeds
    cot_rows = [r for r in rows if r.startswith("CoT")]
    jobs = [(cot_rows, seed) for seed in range(args.seeds)]
    jobs += [([row], seed) for row in rows if row not in cot_rows for seed in range(args.seeds)]
    results: list[dict] = []
    info = {"command": "nice python benchmarks/teacher_data_methods.py " + " ".join(sys.argv[1:]),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
            "load_average_at_start": os.getloadavg(), "task": TASK, "n_eval": args.n_eval, "k": K,
            "sample_temperature": SAMPLE_T, "steps": steps, "seeds": args.seeds, "workers": args.workers,
            "recipe": str(RECIPE.relative_to(ROOT)), "teacher_train_s": round(teacher_s, 1)}
    teacher: dict = {}
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=mp.get_context("spawn")) as pool:
        teacher_future = pool.submit(score, teacher_dir, args.n_eval, K)
        futures = [pool.submit(run_rows, group, seed, args.out, steps, args.n_eval, K, str(teacher_dir))
                   for group, seed in jobs]
        for fut in as_completed([teacher_future, *futures]):
            if fut is teacher_future:
                teacher = {"dir": str(teacher_dir), **fut.result()}
                print(json.dumps({"row": "teacher", **teacher}), flush=True)
            else:
                for res in fut.result():
                    if "error" in res:
                        gaps.append(f"{res['row']} seed {res['seed']}: {res['error']}")
                    results.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "examples"}), flush=True)
            # written after every finished job, so an interrupted benchmark still leaves what it measured
            write_report(args.json, info, teacher, rows, results, gaps, time.perf_counter() - t0, partial=True)
    text, verdict = write_report(args.json, info, teacher, rows, results, gaps, time.perf_counter() - t0)
    print(text)
    if verdict:
        print(f"target (CoT beats gold answers only by more than the seed spread): gap "
              f"{verdict['cot_minus_gold']:+.3f}, largest spread {verdict['largest_seed_spread']:.3f}: "
              f"{'met' if verdict['target_met'] else 'NOT met'}")
    print(f"wrote {args.json} ({(time.perf_counter() - t0) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
