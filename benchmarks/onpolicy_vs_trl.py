"""One GKD job, two ways: distil's method `onpolicy` and TRL's GKDTrainer (the on-policy twin of throughput_vs_trl.py).

    .venv/bin/python benchmarks/onpolicy_vs_trl.py                          # both configurations, 2 passes
    .venv/bin/python benchmarks/onpolicy_vs_trl.py --steps 2 --repeats 1    # a quick look (smoke test)
    .venv/bin/python benchmarks/onpolicy_vs_trl.py --steps 30 --repeats 3 --lmbdas 0.5 \
        --out benchmarks/results/onpolicy_vs_trl_30steps.json                # the longer run of the README

The job (identical for both rows of a configuration):
  teacher  embedded:smollm2-135m-instruct (SmolLM2-135M-Instruct, 30 layers, V = 49,152), fp32, frozen
  student  `student_from_teacher(teacher, [0, 15, 29])` (embeddings/head + 3 of its layers), the same initial
           weights for every row
  data     builtin:python_qa prompt/response records through the chat template; the first steps x batch training
           examples (one epoch: a few dozen prompts), in the SAME order for every row (distil's seeded stream; TRL
           gets that stream through a sequential sampler); 16 held-out examples for the eval
  GKD      lmbda (0.5, and 1.0: every step on-policy), beta = 0.5 (JSD, TRL's convention, both), seq_kd off, the
           student samples at temperature 1.0 without top-p/top-k, max_new_tokens 24, the loss at temperature 1;
           completions are masked after their first EOS (the EOS itself is a target) in both
  optim    AdamW lr 5e-4, betas (0.9, 0.95), no weight decay, clip 1.0, linear warmup 2 steps then cosine to
           0.1 x lr (TRL is handed the same torch AdamW and a LambdaLR of distil's schedule), batch 4, no
           accumulation (--grad-accum), fp32, CPU, 1 thread
The lmbda draws: distil draws once per optimizer step from (onpolicy.seed, step); TRL draws `random.random()` per
training_step call. So that both rows do the same KIND of work on the same steps, TRL's draw is forced to
distil's sequence (a GKDTrainer subclass sets its lmbda to 1 or 0 before each step); the realised on-policy
fraction of each row is reported. onpolicy.seed is the first seed whose draws make the share of on-policy steps
among the measured ones closest to lmbda (with ~10 steps seed 0 gives 7 of 10 at lmbda 0.5); --onpolicy-seed
overrides it. With lmbda = 1.0 the forcing is a no-op: every step generates. Passes after the first use seeds with
the same draws (--pass-draws same, up to ~14 steps) or their own balanced draws (own, beyond): see --pass-draws.

Rows:
  distil   distil.trainer.train + onpolicy's before_step (one generate batch per optimizer step, KV cache, per-row
           seeded sampler) and loss (method offline's fused, chunked JSD on the completion tokens only)
  trl      trl.experimental.gkd.GKDTrainer.train() (model.generate per micro-batch with the KV cache, dense JSD
           over the full [B, S, V] logits of both models, masked afterwards)
Tokens = the target tokens each step trains on: on an on-policy step the student's generated completion tokens
(up to and including the first EOS; each counted once, although it was both generated and trained on), on an
off-policy step the dataset's response tokens. Tokens/s = those tokens / the wall time of the training steps,
step 1 excluded (warm-up), from each loop's own per-step timestamps; the median step time is also reported (the
two rows' samples differ, so their token counts may differ slightly). Phases of a step: generation (distil's
`generate_s` from metrics.jsonl; TRL: a timer around its generate_on_policy_outputs), teacher forward and student
forward (hooks on the modules, the same for both; the student's no-grad forwards inside generate are not counted:
distil's forwards stop at the final hidden states, both heads run chunked on the completion rows only inside the
fused loss; TRL's include the full [B, S, V] heads), and the rest = loss + backward + optimizer + the framework's
own overhead (for distil that includes both heads and the JSD; for TRL the dense JSD).
Eval KL = mean KL(p_T || p_S) per token (full vocabulary) on the held-out examples' responses (teacher-forced),
computed for every student in one pass (distil.eval.metrics.evaluate).
All rows run back to back in one process: distil, trl per configuration; with --repeats 2 (the default) again
in reverse order with fresh students; tokens/s pools the passes. Each pass draws its own samples (distil: an
onpolicy.seed whose lmbda draws equal the first pass's, so the same steps generate; TRL: its seed = the pass
index), so the passes also measure how much the eval KL moves with the samples alone: eval KL is the mean over
the passes' students, with each pass's value beside it.
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


class PhaseClock:
    """Seconds spent per step generating, in the teacher's forward and in the student's training forward (module
    hooks; the student's forwards under no_grad are generation's and not counted), closed at each step's end."""

    def __init__(self, teacher: torch.nn.Module):
        self.active = False
        self.steps: list[dict] = []
        self._t = {"teacher": 0.0, "student": 0.0}
        self._handles: list = []
        self._reset()
        teacher.register_forward_pre_hook(self._start("teacher"))
        teacher.register_forward_hook(self._stop("teacher"))

    def _reset(self):
        self.gen = self.teacher = self.student = 0.0
        self.generated = self.tokens = self.items = 0
        self.on_policy = False

    def _start(self, who: str):
        def hook(*_):
            self._t[who] = time.perf_counter()
        return hook

    def _stop(self, who: str):
        def hook(*_):
            if self.active and (who == "teacher" or torch.is_grad_enabled()):
                setattr(self, who, getattr(self, who) + time.perf_counter() - self._t[who])
        return hook

    def begin(self, student: torch.nn.Module):
        self.active, self.steps = True, []
        self._reset()
        self._handles = [student.register_forward_pre_hook(self._start("student")),
                         student.register_forward_hook(self._stop("student"))]

    def close_step(self):
        self.steps.append({"generate_s": self.gen, "teacher_s": self.teacher, "student_fwd_s": self.student,
                           "generated": self.generated, "tokens": self.tokens, "num_items": self.items,
                           "on_policy": self.on_policy})
        self._reset()

    def end(self) -> list[dict]:
        self.active = False
        for h in self._handles:
            h.remove()
        return self.steps


def is_balanced(seed: int, lmbdas: list[float], steps: int, uniform) -> bool:
    """Whether the seed's per-step draws make round(lmbda x (steps - 1)) of the measured steps (2..N) on-policy for
    every lmbda."""
    return all(sum(uniform(seed, k) < lm for k in range(1, steps)) == round(lm * (steps - 1)) for lm in lmbdas)


def balanced_seed(lmbdas: list[float], steps: int, uniform) -> int:
    """The first balanced onpolicy.seed: with a handful of steps a seed can otherwise make lmbda 0.5 all on- or
    off-policy."""
    return next((seed for seed in range(10_000) if is_balanced(seed, lmbdas, steps, uniform)), 0)


def twin_seeds(base: int, lmbdas: list[float], steps: int, uniform, n: int) -> list[int]:
    """base and the next n - 1 seeds whose per-step draws equal base's for every lmbda: the same steps generate,
    from different samples (a pass's samples are its own; the kind of work per step stays the same)."""
    draws = lambda s: [[uniform(s, k) < lm for k in range(steps)] for lm in lmbdas]  # noqa: E731
    want, out = draws(base), [base]
    for cand in range(base + 1, base + 1 + 200_000):  # ~1,000 candidates per twin at 10 steps; 2^-steps each
        if len(out) == n:
            break
        if draws(cand) == want:
            out.append(cand)
    if len(out) < n:
        raise SystemExit(f"--repeats {n}: no {n - 1} further onpolicy seeds draw the same {steps} on/off-policy "
                         f"steps as seed {base} among 200,000 (each matches with probability ~2^-{steps}); "
                         f"expected fewer --steps (10 takes seconds) or --repeats 1, found --steps {steps}")
    return out


def balanced_seeds(base: int, lmbdas: list[float], steps: int, uniform, n: int) -> list[int]:
    """base and the next n - 1 balanced seeds (each puts round(lmbda x (steps - 1)) of the measured steps on-policy):
    for runs too long for twin_seeds. The passes then generate on different steps but as many of them, and within a
    pass TRL is still forced to that pass's draws, so each distil/TRL pair does the same work step by step."""
    out = [base]
    for cand in range(base + 1, base + 100_000):  # ~1 in 7 seeds is balanced at 30 steps
        if len(out) == n:
            break
        if is_balanced(cand, lmbdas, steps, uniform):
            out.append(cand)
    if len(out) < n:
        raise SystemExit(f"--repeats {n}: fewer than {n - 1} further balanced onpolicy seeds among 100,000 for "
                         f"lmbdas {lmbdas} and {steps} steps; expected other --lmbdas or --steps")
    return out


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip(stamps, stamps[1:])]


def summarize(stamps: list[float], steps: list[dict]) -> dict:
    """stamps[0] = loop start, stamps[i] = end of step i; steps[i]: tokens, generate_s, teacher_s, on_policy.
    Step 1 is excluded from the rates and the phase split."""
    dts = step_times(stamps)
    k = 1 if len(dts) > 1 else 0
    dt, st = dts[k:], steps[k:]
    toks = [s["tokens"] for s in st]
    gen, tea = sum(s["generate_s"] for s in st), sum(s["teacher_s"] for s in st)
    stu = sum(s["student_fwd_s"] for s in st)
    on = [d for d, s in zip(dt, st) if s["on_policy"]]
    off = [d for d, s in zip(dt, st) if not s["on_policy"]]
    return {"steps": len(dts), "seconds_total": round(stamps[-1] - stamps[0], 2), "seconds_steady": round(sum(dt), 2),
            "median_step_s": round(statistics.median(dt), 3), "tokens_steady": sum(toks),
            "tokens_per_s": round(sum(toks) / sum(dt), 1),
            "tokens_per_s_median": round(statistics.median(toks) / statistics.median(dt), 1),
            "on_policy_steps": sum(s["on_policy"] for s in steps), "on_policy_fraction": round(
                sum(s["on_policy"] for s in steps) / len(steps), 3),
            "median_on_policy_step_s": round(statistics.median(on), 3) if on else None,
            "median_off_policy_step_s": round(statistics.median(off), 3) if off else None,
            "generated_tokens": sum(s["generated"] for s in steps),
            "phases_s": {"generate": round(gen, 2), "teacher_forward": round(tea, 2),
                         "student_forward": round(stu, 2),
                         "loss_backward_optimizer_rest": round(sum(dt) - gen - tea - stu, 2)},
            "per_step": [{"dt": round(d, 3), **{n: (round(v, 3) if isinstance(v, float) else v) for n, v in s.items()}}
                         for d, s in zip(dts, steps)]}


def run_distil(student, teacher, recipe, on_spec, train_ex, eos, pad, vocab, run_dir, clock):
    from distil.methods.onpolicy import build_onpolicy_loss, make_before_step
    from distil.trainer import train

    quiet = lambda *a: None  # noqa: E731
    loss_fn = build_onpolicy_loss(teacher, on_spec, recipe.distill, vocab, echo=quiet)
    before = make_before_step(on_spec, teacher, eos, pad, quiet)
    clock.begin(student)
    train(student, loss_fn, train_ex, recipe.train, run_dir=run_dir, seed=recipe.seed, pad_id=pad,
          before_step=before, after_step=lambda model, step: clock.close_step())
    steps = clock.end()
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    seen = 0
    for s, r in zip(steps, rows):  # the loop's own numbers: tokens trained, seconds generating, the step's source
        s["tokens"], seen = r["tokens"] - seen, r["tokens"]
        s["num_items"] = s["tokens"]
        s["generate_s"] = r["generate_s"]
        s["on_policy"] = bool(r["student_samples"] > 0.5)
        s["generated"] = s["tokens"] if s["on_policy"] else 0
        s["truncated"] = r["truncated"]
    return [0.0] + [r["elapsed_s"] for r in rows], steps, [r["loss"] for r in rows]


def run_trl(student, teacher, tok, stream, spec, seed, pad, lmbda, draws, max_new_tokens, out_dir, clock,
            generated_denominator=False):
    import datasets
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from distil.data import collate
    from distil.eval.answers import prompt_part
    from distil.trainer import lr_at

    class Bench(GKDTrainer):
        def _get_train_sampler(self, *args, **kwargs):  # the exact batch stream distil saw, in order
            return SequentialSampler(self.train_dataset)

        def training_step(self, model, inputs, num_items_in_batch=None):
            # distil's per-step draw, forced: lmbda 1 -> random.random() <= 1 always, 0 -> (almost surely) never
            self.lmbda = 1.0 if draws[self.state.global_step] else 0.0
            return super().training_step(model, inputs, num_items_in_batch)

        def generate_on_policy_outputs(self, model, inputs, generation_config):  # TRL's own, timed
            t = time.perf_counter()
            ids, mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
            clock.gen += time.perf_counter() - t
            clock.generated += int((labels != -100).sum())
            clock.on_policy = True
            return ids, mask, labels

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            clock.tokens += int((inputs["labels"][:, 1:] != -100).sum())  # the targets this micro-batch trains on
            if generated_denominator:  # the diagnostic row: divide by the targets this step really trains on
                num_items_in_batch = (inputs["labels"][:, 1:] != -100).sum()
            if num_items_in_batch is not None:
                clock.items += int(num_items_in_batch)  # TRL's denominator (counted on the dataset's labels)
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    stamps: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())
            clock.close_step()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    def collate_with_prompts(rows):
        """distil's right-padded batch plus TRL's prompt-only inputs (left-padded, as generate needs)."""
        batch = collate(rows, pad)
        prompts = [prompt_part({"input_ids": r["input_ids"], "labels": r["labels"]}) for r in rows]
        width = max(len(p) for p in prompts)
        batch["prompts"] = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        batch["prompt_attention_mask"] = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        return batch

    ds = datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in stream])
    cfg = GKDConfig(
        output_dir=str(out_dir), per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.grad_accum, max_steps=spec.steps, learning_rate=spec.lr,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec.min_lr_ratio},
        warmup_steps=spec.warmup_steps, adam_beta1=spec.betas[0], adam_beta2=spec.betas[1], weight_decay=0.0,
        max_grad_norm=spec.max_grad_norm, optim="adamw_torch", lmbda=lmbda, beta=0.5, temperature=1.0,
        max_new_tokens=max_new_tokens, seq_kd=False, bf16=False, fp16=False, use_cpu=True, report_to="none",
        save_strategy="no", logging_steps=1, dataloader_num_workers=0, gradient_checkpointing=False,
        disable_dropout=True, seed=seed, remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
    )
    # The same optimizer and schedule as distil's loop (HF's warmup would start at lr 0, one step behind).
    opt = torch.optim.AdamW([q for q in student.parameters() if q.requires_grad], lr=spec.lr, betas=tuple(spec.betas),
                            weight_decay=spec.weight_decay, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_at(step, spec) / spec.lr)
    trainer = Bench(model=student, teacher_model=teacher, args=cfg, train_dataset=ds, processing_class=tok,
                    data_collator=collate_with_prompts, callbacks=[Clock()], optimizers=(opt, sched))
    clock.begin(student)
    trainer.train()
    return stamps, clock.end(), losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--lmbdas", default="0.5,1.0", help="comma-separated lmbda values, one configuration each")
    p.add_argument("--onpolicy-seed", type=int, default=-1,
                   help="onpolicy.seed (the per-step lmbda draws); -1 = the first seed whose draws put the share of "
                        "on-policy steps among the measured ones (2..N) closest to lmbda, for every lmbda")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="passes over the rows (2: forward then reversed order)")
    p.add_argument("--pass-draws", choices=("auto", "same", "own"), default="auto",
                   help="same: every pass generates on the same steps (twin onpolicy seeds; ~2^-steps candidates "
                        "match, so at most ~14 steps); own: each pass its own balanced draws (TRL still forced to "
                        "each pass's); auto: same up to 14 steps, own beyond")
    p.add_argument("--trl-generated-denominator", action="store_true",
                   help="add a diagnostic row per lmbda: TRL with its loss divided by the completion tokens it trains "
                        "on (stock TRL divides on-policy steps by the dataset's response tokens, counted before the "
                        "batch is replaced by the student's samples); needs --grad-accum 1")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/onpolicy_vs_trl.json"))
    args = p.parse_args()
    if args.trl_generated_denominator and args.grad_accum != 1:
        p.error("--trl-generated-denominator counts one micro-batch's targets: use it with --grad-accum 1")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import datasets
    import trl

    datasets.disable_progress_bars()
    from distil.data import load_examples, micro_batch, pad_id
    from distil.eval.metrics import evaluate
    from distil.generation.hf import eos_ids
    from distil.methods.onpolicy import _uniform
    from distil.models import count_params, freeze, load_model, student_from_teacher
    from distil.recipe import recipe_from_dict

    lmbdas = [float(x) for x in args.lmbdas.split(",")]
    seed = args.onpolicy_seed if args.onpolicy_seed >= 0 else balanced_seed(lmbdas, args.steps, _uniform)
    draws_mode = args.pass_draws if args.pass_draws != "auto" else ("same" if args.steps <= 14 else "own")
    pick = twin_seeds if draws_mode == "same" else balanced_seeds
    seeds = pick(seed, lmbdas, args.steps, _uniform, args.repeats)  # pass r samples from seeds[r] (TRL: r)
    work = Path(tempfile.mkdtemp(prefix="distil-bench-onpolicy-"))

    def recipe_for(lmbda: float, seed: int):
        return recipe_from_dict({
            "name": "bench", "seed": 0, "teacher": {"source": TEACHER},
            "student": {"source": "teacher", "layers": LAYERS},
            "data": {"source": "builtin:python_qa", "seq_len": 192, "eval_size": 16},
            "distill": {"method": "onpolicy"},
            "onpolicy": {"lmbda": lmbda, "seq_kd": False, "loss": "jsd", "beta": 0.5, "loss_temperature": 1.0,
                         "sample_temperature": 1.0, "sample_top_p": 1.0, "sample_top_k": 0,
                         "max_new_tokens": args.max_new_tokens, "seed": seed},
            "train": {"steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": 5e-4,
                      "warmup_steps": 2, "threads": args.threads, "progress": False, "log_every": 1},
            "output": {"dir": str(work)},
        }, "benchmark")

    recipes = {(lm, r): recipe_for(lm, seeds[r]) for lm in lmbdas for r in range(args.repeats)}
    r0 = recipes[(lmbdas[0], 0)]
    spec = r0.train
    teacher = load_model(TEACHER)
    freeze(teacher.model)
    tok, vocab = teacher.tokenizer, len(teacher.tokenizer)
    init_wrapped = student_from_teacher(teacher, LAYERS)
    init = init_wrapped.model
    eos = eos_ids(init, init_wrapped.tokenizer)
    train_all, eval_ex = load_examples(r0.data, tok, r0.seed)
    n_micro = args.steps * args.grad_accum
    train_ex = train_all[: n_micro * args.batch_size]  # exactly one epoch of the job
    pad = pad_id(tok)
    stream = [e for i in range(n_micro) for e in micro_batch(train_ex, i, args.batch_size, r0.seed)]
    print(f"teacher {count_params(teacher.model) / 1e6:.1f}M, student {count_params(init) / 1e6:.1f}M params; "
          f"{args.steps} steps x {args.grad_accum} x {args.batch_size} prompts ({len(train_ex)} distinct), "
          f"max_new_tokens {args.max_new_tokens}, EOS {eos}, onpolicy.seed {seeds} (one per pass, draws: "
          f"{draws_mode}; TRL: seed = pass index); torch threads {args.threads}",
          flush=True)
    clock = PhaseClock(teacher.model)

    def fresh():
        s = copy.deepcopy(init)
        s.train()
        for q in s.parameters():
            q.requires_grad_(True)
        return s

    def run_row(fw: str, lmbda: float, r: int):
        student, tag = fresh(), str(r)
        rec = recipes[(lmbda, r)]
        if fw == "distil":
            stamps, steps, losses = run_distil(student, teacher.model, rec, rec.onpolicy, train_ex, eos, pad, vocab,
                                               work / f"distil{lmbda}{tag}", clock)
        else:
            draws = [_uniform(rec.onpolicy.seed, s) < lmbda for s in range(args.steps)]  # distil's sequence
            stamps, steps, losses = run_trl(student, teacher.model, tok, stream, spec, r, pad, lmbda, draws,
                                            args.max_new_tokens, work / f"{fw}{lmbda}{tag}", clock,
                                            generated_denominator=fw == "trl-gen")
        return student, stamps, steps, losses

    fws = ("distil", "trl", "trl-gen") if args.trl_generated_denominator else ("distil", "trl")
    names = [(fw, lm) for lm in lmbdas for fw in fws]
    order = [(n, r) for r in range(args.repeats) for n in (names if r % 2 == 0 else names[::-1])]
    students, runs = {}, {n: [] for n in names}
    for (fw, lm), r in order:
        print(f"{fw} lmbda={lm} (pass {r + 1}) ...", flush=True)
        t = time.perf_counter()
        student, stamps, steps, losses = run_row(fw, lm, r)
        runs[(fw, lm)].append((stamps, steps, losses))
        print(f"  {time.perf_counter() - t:.1f}s", flush=True)
        students[(f"{fw} lmbda={lm}", r)] = student

    results = {}
    for fw, lm in names:
        per_pass = [summarize(st, steps) for st, steps, _ in runs[(fw, lm)]]
        steady = sum(q["seconds_steady"] for q in per_pass)
        tokens = sum(q["tokens_steady"] for q in per_pass)
        dts = [d for st, _, _ in runs[(fw, lm)] for d in step_times(st)[1:]]
        toks = [s["tokens"] for _, steps, _ in runs[(fw, lm)] for s in steps[1:]]
        phases = {k: round(sum(q["phases_s"][k] for q in per_pass), 2) for k in per_pass[0]["phases_s"]}
        results[f"{fw} lmbda={lm}"] = {
            "framework": fw, "lmbda": lm, "passes": per_pass, "tokens_per_s": round(tokens / steady, 1),
            "median_step_s": round(statistics.median(dts), 3),
            "tokens_per_s_median": round(statistics.median(toks) / statistics.median(dts), 1),
            "seconds_steady": round(steady, 2), "phases_s": phases,
            "phase_share": {k: round(v / steady, 3) for k, v in phases.items()},
            "on_policy_fraction": per_pass[0]["on_policy_fraction"],
            "losses": runs[(fw, lm)][0][2]}

    print("eval ...", flush=True)
    ev = evaluate(teacher.model, {f"{n} #{r}": m for (n, r), m in students.items()}, eval_ex, batch_size=8,
                  pad_id=pad, vocab=vocab, chunk_size=1024)
    for name in results:  # mean over the passes (each pass its own samples), and every pass's value
        per = [ev[f"{name} #{r}"] for r in range(args.repeats)]
        for key, field in (("kl", "eval_kl"), ("ppl", "eval_ppl"), ("agreement", "eval_agreement")):
            results[name][field] = round(statistics.fmean(e[key] for e in per), 4)
            results[name][field + "_per_pass"] = [round(e[key], 4) for e in per]
    ev0 = evaluate(teacher.model, {"init": init}, eval_ex, batch_size=8, pad_id=pad, vocab=vocab)["init"]

    head = (f"{'row':<20} {'on-pol':>6} {'tokens/s':>9} {'x TRL':>6} {'s/step med':>10} {'x TRL med':>9} "
            f"{'gen %':>6} {'teach %':>7} {'s-fwd %':>7} {'rest %':>6} {'eval KL':>8}  per pass")
    lines = [head, "-" * len(head)]
    verdicts = {}
    for lm in lmbdas:
        d, t = results[f"distil lmbda={lm}"], results[f"trl lmbda={lm}"]
        d["x_trl"] = round(d["tokens_per_s"] / t["tokens_per_s"], 2)
        d["x_trl_median_step"] = round(t["median_step_s"] / d["median_step_s"], 2)
        t["x_trl"], t["x_trl_median_step"] = 1.0, 1.0
        g = results.get(f"trl-gen lmbda={lm}")
        if g is not None:
            g["x_trl"] = round(g["tokens_per_s"] / t["tokens_per_s"], 2)
            g["x_trl_median_step"] = round(t["median_step_s"] / g["median_step_s"], 2)
        for name in [f"{fw} lmbda={lm}" for fw in fws]:
            r = results[name]
            sh = r["phase_share"]
            lines.append(f"{name:<20} {r['on_policy_fraction']:>6.2f} {r['tokens_per_s']:>9.1f} {r['x_trl']:>6.2f} "
                         f"{r['median_step_s']:>10.2f} {r['x_trl_median_step']:>9.2f} "
                         f"{100 * sh['generate']:>6.1f} {100 * sh['teacher_forward']:>7.1f} "
                         f"{100 * sh['student_forward']:>7.1f} {100 * sh['loss_backward_optimizer_rest']:>6.1f} "
                         f"{r['eval_kl']:>8.4f}  {' '.join(f'{x:.2f}' for x in r['eval_kl_per_pass'])}")
        gap = d["eval_kl"] - t["eval_kl"]
        spread = max(max(x["eval_kl_per_pass"]) - min(x["eval_kl_per_pass"]) for x in (d, t))
        verdicts[str(lm)] = {"speed_x_trl": d["x_trl"], "speed_met": d["x_trl"] >= 1.5,
                             "eval_kl_gap": round(gap, 4), "eval_kl_gap_pct": round(100 * gap / t["eval_kl"], 2),
                             "kl_met": gap <= 0, "eval_kl_spread": round(spread, 4),
                             "gap_within_spread": abs(gap) <= spread}
        verdicts[str(lm)]["met"] = verdicts[str(lm)]["speed_met"] and verdicts[str(lm)]["kl_met"]
    lines.append(f"(initial student: eval KL {ev0['kl']:.4f}; tokens = trained target tokens: the generated "
                 f"completion tokens on on-policy steps, the dataset's response tokens otherwise; step 1 excluded)")
    table = "\n".join(lines)
    print(table)
    for lm, v in verdicts.items():
        print(f"lmbda={lm}: target (distil >= 1.5x TRL tokens/s at equal or better eval KL): "
              f"{'met' if v['met'] else 'MISSED'} -- speed {v['speed_x_trl']:.2f}x "
              f"({'met' if v['speed_met'] else 'missed'}), eval KL gap {v['eval_kl_gap']:+.4f} "
              f"({v['eval_kl_gap_pct']:+.2f}%: {'met' if v['kl_met'] else 'missed'}; the passes' own spread "
              f"{v['eval_kl_spread']:.4f}: the gap is {'within' if v['gap_within_spread'] else 'beyond'} it)")

    out = {"benchmark": "onpolicy_vs_trl", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "load_avg_before_eval": os.getloadavg(), "torch": torch.__version__,
           "transformers": transformers.__version__, "trl": trl.__version__, "teacher": TEACHER,
           "student_layers": LAYERS, "steps": args.steps, "batch_size": args.batch_size,
           "grad_accum": args.grad_accum, "max_new_tokens": args.max_new_tokens, "lmbdas": lmbdas, "beta": 0.5,
           "sample_temperature": 1.0, "onpolicy_seed": seeds, "pass_draws": draws_mode, "threads": args.threads,
           "repeats": args.repeats, "eos": eos,
           "prompts": len(train_ex), "eval_examples": len(eval_ex), "initial_eval_kl": round(ev0["kl"], 4),
           "rows": results, "verdicts": verdicts, "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
