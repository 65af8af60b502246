"""One distillation job, three ways: distil with the live teacher, distil from its top-k cache, TRL's GKDTrainer.

    .venv/bin/python benchmarks/throughput_vs_trl.py              # ~9 min on 2 busy cores (1 thread)
    .venv/bin/python benchmarks/throughput_vs_trl.py --steps 4 --repeats 1   # a quick look

The job (identical for all three rows):
  teacher  embedded:smollm2-135m-instruct (SmolLM2-135M-Instruct, 30 layers, V = 49,152), fp32
  student  `student_from_teacher(teacher, [0, 15, 29])`: its embeddings/head + 3 of its layers (38.9M params),
           the same initial weights for every row
  data     builtin:pydoc packed into 128-token blocks; the first steps x batch training blocks (one epoch), in
           the SAME order for every row (distil's seeded stream; TRL gets that stream with a sequential sampler)
  loss     forward KL(p_T || p_S) at T = 1, sum over target tokens / target tokens of the batch
           (TRL: GKDTrainer with lmbda = 0 (no on-policy batches), beta = 0 (forward KL in TRL's convention,
           `F.kl_div(log p_S, log p_T, log_target=True)`), seq_kd = False, temperature 1)
  optim    AdamW lr 5e-4, betas (0.9, 0.95), no weight decay, clip 1.0, linear warmup 2 steps then cosine to
           0.1 x lr (TRL is handed the same torch AdamW and a LambdaLR of distil's schedule), batch 4, no
           accumulation, fp32, CPU, 1 thread
Rows:
  distil live    distil.trainer.train + method `offline` (teacher forward every step, chunked dense KL)
  distil cache   distil.trainer.train + method `cache` (top-64 from disk, tail_term; the teacher is not used)
  trl gkd        trl.experimental.gkd.GKDTrainer.train()
Tokens/s = target tokens / wall time of the training steps, step 1 excluded (warm-up: allocator, lazy init),
from the per-step timestamps of each loop; the median step time is also reported (robust to the other jobs on
this shared machine). The cache's one-off build (one teacher forward over the data) is reported separately and
as an amortised figure over this one epoch. Eval KL = mean KL(p_T || p_S) per token (full vocabulary) on 16 held-
out blocks, computed for the three students in one pass (distil.eval.metrics.evaluate).
All three run back to back in one process after the cache is built: distil live, trl, distil cache, then
(--repeats 2, the default) again in reverse order with fresh students; tokens/s pools both passes, eval KL is
the first pass's students.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import statistics
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
LAYERS = [0, 15, 29]


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def summarize(name: str, stamps: list[float], tokens_per_step: list[int]) -> dict:
    """stamps[0] = loop start, stamps[i] = end of step i. Step 1 is excluded from the rate."""
    dts = step_times(stamps)
    steady = dts[1:] if len(dts) > 1 else dts
    toks = tokens_per_step[1:] if len(dts) > 1 else tokens_per_step
    return {"name": name, "steps": len(dts), "seconds_total": round(stamps[-1] - stamps[0], 2),
            "seconds_steady": round(sum(steady), 2), "median_step_s": round(statistics.median(steady), 3),
            "tokens_per_s": round(sum(toks) / sum(steady), 1),
            "tokens_per_s_median": round(statistics.median(toks) / statistics.median(steady), 1)}


def run_distil(student, loss_fn, examples, spec, seed, pad, run_dir):
    from distil.trainer import train

    train(student, loss_fn, examples, spec, run_dir=run_dir, seed=seed, pad_id=pad)
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [0.0] + [r["elapsed_s"] for r in rows], [r["loss"] for r in rows]  # elapsed_s: from the loop start


def run_trl(student, teacher_model, tok, stream, spec, seed, pad, out_dir):
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distil.data import collate

    class Sequential(GKDTrainer):  # the exact batch stream distil saw, in order
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    ds = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in stream])
    cfg = GKDConfig(
        output_dir=str(out_dir), per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1,
        max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": spec.min_lr_ratio}, warmup_steps=spec.warmup_steps,
        adam_beta1=spec.betas[0], adam_beta2=spec.betas[1], weight_decay=0.0, max_grad_norm=spec.max_grad_norm,
        optim="adamw_torch", lmbda=0.0, beta=0.0, temperature=1.0, seq_kd=False, bf16=False, fp16=False,
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
        gradient_checkpointing=False, disable_dropout=True, seed=seed, remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True}, max_length=None,
    )
    # The same optimizer and schedule as distil's loop (HF's warmup would start at lr 0, one step behind).
    from distil.trainer import lr_at

    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=spec.lr, betas=tuple(spec.betas),
                            weight_decay=spec.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, spec) / spec.lr)
    trainer = Sequential(model=student, teacher_model=teacher_model, args=cfg, train_dataset=ds,
                         processing_class=tok, data_collator=lambda rows: collate(rows, pad),
                         callbacks=[Clock(), Losses()], optimizers=(opt, sched))
    trainer.train()
    return stamps, losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="passes over the three rows (2: A B C then C B A)")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/throughput_vs_trl.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import trl

    from distil.data import load_examples, micro_batch, pad_id
    from distil.eval.metrics import evaluate
    from distil.methods import build_cache, build_offline
    from distil.methods.cache import ensure_cache, info, with_index
    from distil.models import count_params, freeze, load_model, student_from_teacher
    from distil.recipe import recipe_from_dict

    work = Path(tempfile.mkdtemp(prefix="distil-bench-trl-"))
    recipe = recipe_from_dict({
        "name": "bench", "seed": 0, "teacher": {"source": TEACHER}, "student": {"source": "teacher", "layers": LAYERS},
        "data": {"source": "builtin:pydoc", "seq_len": args.seq_len, "eval_size": 16},
        "distill": {"method": "cache", "loss": "forward_kl", "chunk_size": 1024},
        "cache": {"k": args.k, "tail": "tail_term", "batch_size": args.batch_size},
        "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 2,
                  "progress": False},
        "output": {"dir": str(work)},
    }, "benchmark")
    spec = recipe.train
    teacher = load_model(TEACHER)
    freeze(teacher.model)
    tok, vocab = teacher.tokenizer, len(teacher.tokenizer)
    init = student_from_teacher(teacher, LAYERS).model
    train_all, eval_ex = load_examples(recipe.data, tok, recipe.seed)
    train_ex = train_all[: args.steps * args.batch_size]  # exactly one epoch of the job
    pad = pad_id(tok)
    stream = [e for i in range(args.steps) for e in micro_batch(train_ex, i, args.batch_size, recipe.seed)]
    tokens_per_step = [sum(sum(1 for y in e["labels"][1:] if y != -100) for e in stream[i: i + args.batch_size])
                       for i in range(0, len(stream), args.batch_size)]
    print(f"teacher {count_params(teacher.model) / 1e6:.1f}M, student {count_params(init) / 1e6:.1f}M params; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens; torch threads {args.threads}", flush=True)

    def fresh():
        s = copy.deepcopy(init)
        s.train()
        for q in s.parameters():
            q.requires_grad_(True)
        return s

    print("distil cache: building the cache (one teacher forward over the data) ...", flush=True)
    t0 = time.perf_counter()
    cache = ensure_cache(recipe, train_ex, tok, teacher=teacher, echo=lambda *a: None)
    build_s = time.perf_counter() - t0
    ci = info(cache)
    live_fn = build_offline(teacher.model, recipe.distill, vocab)
    cache_fn = build_cache(cache, recipe.distill, vocab)

    def run_row(name: str, tag: str):
        student = fresh()
        if name == "distil live":
            stamps, losses = run_distil(student, live_fn, train_ex, spec, recipe.seed, pad, work / f"live{tag}")
        elif name == "distil cache":
            stamps, losses = run_distil(student, cache_fn, with_index(train_ex), spec, recipe.seed, pad,
                                        work / f"cache{tag}")
        else:
            stamps, losses = run_trl(student, teacher.model, tok, stream, spec, recipe.seed, pad, work / f"trl{tag}")
        return student, stamps, losses

    # Back to back in one process; with --repeats 2 the order is reversed for the second pass (A B C C B A), so
    # a drift in the machine's other load weighs on every row alike. Eval uses the first pass's students.
    names = ["distil live", "trl gkd", "distil cache"]
    order = [(n, r) for r in range(args.repeats) for n in (names if r % 2 == 0 else names[::-1])]
    students, runs = {}, {n: [] for n in names}
    for name, r in order:
        print(f"{name} (pass {r + 1}) ...", flush=True)
        student, stamps, losses = run_row(name, str(r))
        runs[name].append((stamps, losses))
        if r == 0:
            students[name] = student
    results = {}
    for name in names:
        per_pass = [summarize(name, st, tokens_per_step) for st, _ in runs[name]]
        steady = sum(p_["seconds_steady"] for p_ in per_pass)
        tokens = sum(sum(tokens_per_step[1:]) for _ in per_pass)
        meds = [step for st, _ in runs[name] for step in step_times(st)[1:]]
        results[name] = {"name": name, "passes": per_pass, "tokens_per_s": round(tokens / steady, 1),
                         "median_step_s": round(statistics.median(meds), 3),
                         "tokens_per_s_median": round(statistics.median(tokens_per_step[1:])
                                                      / statistics.median(meds), 1),
                         "seconds_total": round(sum(p_["seconds_total"] for p_ in per_pass), 2),
                         "losses": runs[name][0][1]}
    results["distil cache"].update({"cache_build_s": round(build_s, 1),
                                    "cache_bytes_per_token": round(ci.bytes_per_token, 1)})
    total_tokens = sum(tokens_per_step)
    results["distil cache"]["tokens_per_s_incl_build"] = round(
        total_tokens / (results["distil cache"]["seconds_total"] / args.repeats + build_s), 1)

    print("eval ...", flush=True)
    ev = evaluate(teacher.model, students, eval_ex, batch_size=8, pad_id=pad, vocab=vocab, chunk_size=1024)
    for name in students:
        results[name]["eval_kl"] = round(ev[name]["kl"], 4)
        results[name]["eval_ppl"] = round(ev[name]["ppl"], 3)
        results[name]["eval_agreement"] = round(ev[name]["agreement"], 4)
    with torch.no_grad():
        ev0 = evaluate(teacher.model, {"init": init}, eval_ex, batch_size=8, pad_id=pad, vocab=vocab)["init"]

    trl_tps = results["trl gkd"]["tokens_per_s"]
    trl_med = results["trl gkd"]["tokens_per_s_median"]
    head = (f"{'row':<14} {'tokens/s':>9} {'x TRL':>7} {'median x TRL':>12} {'s/step (med)':>12} {'eval KL':>8} "
            f"{'ppl':>8}")
    lines = [head, "-" * len(head)]
    for name in ("distil live", "distil cache", "trl gkd"):
        r = results[name]
        r["x_trl"] = round(r["tokens_per_s"] / trl_tps, 2)
        r["x_trl_median"] = round(r["tokens_per_s_median"] / trl_med, 2)
        lines.append(f"{name:<14} {r['tokens_per_s']:>9.1f} {r['x_trl']:>7.2f} {r['x_trl_median']:>12.2f} "
                     f"{r['median_step_s']:>12.2f} {r['eval_kl']:>8.4f} {r['eval_ppl']:>8.2f}")
    c = results["distil cache"]
    lines.append(f"(initial student: eval KL {ev0['kl']:.4f}; cache build {c['cache_build_s']:.0f}s once, "
                 f"{c['cache_bytes_per_token']:.0f} bytes/token; distil cache incl. build: "
                 f"{c['tokens_per_s_incl_build']:.1f} tokens/s = {c['tokens_per_s_incl_build'] / trl_tps:.2f}x TRL)")
    table = "\n".join(lines)
    print(table)
    speed_ok = c["x_trl"] >= 2.0
    kl_gap = c["eval_kl"] - results["trl gkd"]["eval_kl"]
    kl_ok = kl_gap <= 0
    ok = speed_ok and kl_ok
    print(f"target (cache >= 2x TRL tokens/s at equal or better eval KL): {'met' if ok else 'MISSED'} -- speed "
          f"{c['x_trl']:.2f}x ({'met' if speed_ok else 'missed'}), eval KL {c['eval_kl']:.4f} vs TRL "
          f"{results['trl gkd']['eval_kl']:.4f} ({kl_gap:+.4f}, {100 * kl_gap / results['trl gkd']['eval_kl']:+.2f}%: "
          f"{'met' if kl_ok else 'missed'})")

    out = {"benchmark": "throughput_vs_trl", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "load_avg_before_eval": os.getloadavg(), "torch": torch.__version__,
           "trl": trl.__version__, "teacher": TEACHER, "student_layers": LAYERS, "steps": args.steps,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads, "k": args.k,
           "repeats": args.repeats,
           "tokens_per_step": tokens_per_step, "initial_eval_kl": round(ev0["kl"], 4), "rows": results,
           "target_met": ok, "target_speed_met": speed_ok, "target_kl_met": kl_ok,
           "eval_kl_gap_vs_trl": round(kl_gap, 4), "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)  # students' checkpoints and the caches: ~0.5 GB per training row
    return 0


if __name__ == "__main__":
    sys.exit(main())
