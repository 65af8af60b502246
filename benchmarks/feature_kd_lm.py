"""Feature-based KD for an LM: does matching the teacher's hidden states (or attention maps) help a depth-pruned
student beyond logit KD, at the same budget?

    nice -n 10 .venv/bin/python benchmarks/feature_kd_lm.py              # ~15 min on 2 busy cores (1 thread)
    nice -n 10 .venv/bin/python benchmarks/feature_kd_lm.py --steps 2    # a quick look

Setup (identical for every row; each row is one `distil run`, i.e. pipeline.run, of the recipe below):
  teacher  embedded:smollm2-135m-instruct (SmolLM2-135M-Instruct, 30 layers, width 576), fp32
  student  the depth-pruned init of recipes/features_hidden.yaml: teacher layers [0, 1, 2, 10, 20, 27, 28, 29],
           embeddings and head frozen (56.6M params), the same initial weights for every row
  data     builtin:pydoc in --seq-len-token blocks, the same order for every row; --eval-size held-out blocks
  train    forward KL at T = 1 (alpha 1, the fused loss), AdamW --lr, warmup 10% + cosine, --steps x --batch-size
Rows:
  logit KD                      method offline
  + hidden states, direct       method features, cosine loss on the init's layer map, projection off (the depth-
                                pruned student keeps the teacher's width, so direct matching is possible)
  + hidden states, projection   the same with a learned projection per layer (identity-initialised, trained)
  + attention maps              method features, hidden-state term off, attention probabilities (KL per query row,
                                heads mapped one to one)
Evaluation: every row and the initial student in one pass over the held-out blocks with one teacher forward per
batch (distil.eval.metrics.evaluate): mean KL(p_T || p_S) per token, top-1 agreement, perplexity.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TEACHER = "embedded:smollm2-135m-instruct"
LAYERS = [0, 1, 2, 10, 20, 27, 28, 29]
ROWS = {  # row name -> (method, features section)
    "logit KD": ("offline", None),
    "+ hidden states, direct": ("features", {"loss": "cosine", "weight": 1.0, "projection": "off"}),
    "+ hidden states, projection": ("features", {"loss": "cosine", "weight": 1.0, "projection": "on"}),
    "+ attention maps": ("features", {"weight": 0.0, "attention": "mapped", "attention_weight": 1.0}),
}


def recipe_for(name: str, method: str, features: dict | None, args: argparse.Namespace, out: Path) -> dict:
    data = {
        "name": name, "seed": args.seed, "teacher": {"source": TEACHER},
        "student": {"source": "teacher", "layers": LAYERS, "freeze_embeddings": True},
        "data": {"source": "builtin:pydoc", "seq_len": args.seq_len, "eval_size": args.eval_size},
        "distill": {"method": method, "loss": "forward_kl", "alpha": 1.0},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
                  "warmup_steps": max(1, args.steps // 10), "threads": args.threads, "progress": False},
        "eval": {"enabled": False}, "output": {"dir": str(out)},
    }
    if features is not None:
        data["features"] = features
    return data


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-size", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the first seed (the data order of every row)")
    p.add_argument("--seeds", type=int, default=1, help="seeds --seed, --seed + 1, ...: every row once per seed; "
                   "the table shows the mean and each row's per-seed difference to logit KD (paired: same order)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/feature_kd_lm.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from distil import pipeline
    from distil.data import load_examples, pad_id
    from distil.eval.metrics import evaluate, format_table
    from distil.models import load_model, load_teacher, student_from_teacher
    from distil.recipe import recipe_from_dict

    load_before = os.getloadavg()
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="feature-kd-lm-"))
    trained, rows = {}, {}
    seeds = list(range(args.seed, args.seed + args.seeds))
    first_seed = args.seed
    for seed in seeds:
        args.seed = seed
        for i, (row, (method, features)) in enumerate(ROWS.items()):
            recipe = recipe_from_dict(recipe_for(f"row{i}-seed{seed}", method, features, args, work))
            t0 = time.perf_counter()
            res = pipeline.run(recipe, echo=lambda *a: None)
            seconds = time.perf_counter() - t0
            metrics = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
            trained[f"{row} #{seed}"] = load_model(str(res.student_dir)).model
            shutil.rmtree(res.run_dir, ignore_errors=True)  # the model is in memory; keep the disk small
            keep = ("kd", "feature", "attention")
            rows.setdefault(row, {"method": method, "features": features, "train_seconds": [], "first": [],
                                  "last": []})
            rows[row]["train_seconds"].append(round(seconds, 1))
            rows[row]["first"].append({k: round(v, 4) for k, v in metrics[0].items() if k in keep})
            rows[row]["last"].append({k: round(v, 4) for k, v in metrics[-1].items() if k in keep})
            print(f"seed {seed} {row}: {seconds:.0f}s; first step {rows[row]['first'][-1]}, last step "
                  f"{rows[row]['last'][-1]}", flush=True)
    args.seed = first_seed

    recipe = recipe_from_dict(recipe_for("eval", "offline", None, args, work))
    teacher = load_teacher(recipe)
    initial = student_from_teacher(teacher, LAYERS).model
    _, held_out = load_examples(recipe.data, teacher.tokenizer, recipe.seed)
    results = evaluate(teacher.model, {"student (initial)": initial, **trained}, held_out, batch_size=8,
                       pad_id=pad_id(teacher.tokenizer), vocab=len(teacher.tokenizer))
    for row in rows:  # the mean over the seeds, and every seed's value
        for k in ("kl", "agreement", "ppl"):
            per = [results[f"{row} #{seed}"][k] for seed in seeds]
            rows[row][k] = round(sum(per) / len(per), 4)
            rows[row][k + "_per_seed"] = [round(x, 4) for x in per]
        # paired with logit KD on the same seed (the same data order): negative = this row's KL is lower
        rows[row]["kl_minus_logit_kd_per_seed"] = [round(results[f"{row} #{seed}"]["kl"]
                                                         - results[f"logit KD #{seed}"]["kl"], 4) for seed in seeds]
    mean_rows = {"teacher": results["teacher"], "student (initial)": results["student (initial)"],
                 **{row: {"kl": rows[row]["kl"], "agreement": rows[row]["agreement"], "ppl": rows[row]["ppl"]}
                    for row in rows}}
    table = format_table(mean_rows)
    if len(seeds) > 1:
        table += "\n" + "\n".join(f"{row:<30} KL - logit KD per seed: "
                                   + " ".join(f"{d:+.4f}" for d in rows[row]["kl_minus_logit_kd_per_seed"])
                                   for row in rows if row != "logit KD")
    print(table)
    base = rows["logit KD"]["kl"]
    best = min((r for r in rows if r != "logit KD"), key=lambda r: rows[r]["kl"])
    for row in rows:
        rows[row]["kl_vs_logit_kd"] = round(rows[row]["kl"] / base, 4)
    verdict = (f"{best} improves eval KL over logit KD alone ({rows[best]['kl']:.4f} vs {base:.4f}) at "
               f"{args.steps} steps" if rows[best]["kl"] < base else
               f"no feature term improves eval KL over logit KD alone ({base:.4f}) at {args.steps} steps")
    hidden = min(rows["+ hidden states, direct"]["kl"], rows["+ hidden states, projection"]["kl"])
    target = hidden < base
    every_seed = {row: all(d < 0 for d in rows[row]["kl_minus_logit_kd_per_seed"]) for row in rows
                  if row != "logit KD"}
    print("lower eval KL than logit KD on every seed: " + ", ".join(f"{r}: {'yes' if v else 'no'}"
                                                                     for r, v in every_seed.items()))
    print(f"target (hidden-state matching improves eval KL over logit KD alone): {'met' if target else 'MISSED'}; "
          f"{verdict}")
    out = {"benchmark": "feature_kd_lm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average_before": load_before,
           "load_average_after": os.getloadavg(), "wall_seconds": round(time.perf_counter() - t_start, 1),
           "teacher": TEACHER, "student_layers": LAYERS, "steps": args.steps, "seeds": seeds,
           "batch_size": args.batch_size,
           "seq_len": args.seq_len, "lr": args.lr, "threads": args.threads, "eval_blocks": len(held_out),
           "eval_tokens": results["teacher"]["tokens"] if "tokens" in results["teacher"] else None,
           "initial": {k: round(results["student (initial)"][k], 4) for k in ("kl", "agreement", "ppl")},
           "teacher_ppl": round(results["teacher"]["ppl"], 4), "rows": rows,
           "target_hidden_beats_logit_kd": target, "lower_kl_on_every_seed": every_seed, "verdict": verdict,
           "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
