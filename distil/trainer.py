"""THE training loop. Every method feeds it batches and a loss function; none has its own loop.

Built on `accelerate`, so `accelerate launch` (DDP on CPU with gloo, or GPUs) runs it unchanged.
AdamW; linear warmup then cosine decay; gradient accumulation; clipping; fp32 on CPU, bf16 on GPUs
that have it; a progress bar with loss and tokens/s; one `metrics.jsonl` line per step; atomic
checkpoints (temp dir, then rename) keeping the last K; `resume` continues exactly where a run
stopped (same data order, optimizer state and RNG, hence the same per-step losses).

Loss scaling: each micro-batch's loss is its sum over target tokens divided by the number of
target tokens in the *global* batch (all micro-batches, all processes). Summing gradients over
micro-batches then gives the gradient of the global per-token mean, whatever the accumulation or
process count. DDP averages gradients over processes, so the loss is multiplied by the world size
to turn that average back into the sum.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distil.checkpoint import (CKPT_PREFIX, STATE_FILE, list_checkpoints, load_checkpoint,  # noqa: F401
                               resolve_resume, save_checkpoint, truncate_metrics)
from distil.data import collate, micro_batch


class TrainingDiverged(Exception):
    """The loss became NaN or inf; the last good checkpoint is kept."""

    exit_code = 1


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    last_loss: float
    checkpoint: str | None


def lr_at(step: int, spec: Any) -> float:
    """Linear warmup to spec.lr over warmup_steps, then cosine decay to lr * min_lr_ratio."""
    if spec.warmup_steps and step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.lr * spec.min_lr_ratio
    return floor + (spec.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_accelerator(precision: str = "auto") -> Any:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "auto":
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


# ----------------------------------------------------------------------------------------------


def train(model: Any, loss_fn: Callable, examples: list[dict], spec: Any, *, run_dir: str | Path, seed: int,
          pad_id: int, resume: str | None = None, accelerator: Any = None, tag: str = "train") -> TrainResult:
    """Train `model` in place with `loss_fn(model, batch, num_items) -> LossOutput`.

    Writes `run_dir/metrics.jsonl` and `run_dir/checkpoints/`. Returns when `spec.steps` optimizer
    steps are done. Raises TrainingDiverged on a non-finite loss (nothing is saved for that step).
    """
    run_dir = Path(run_dir)
    acc = accelerator or make_accelerator(spec.precision)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(seed)
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                            foreach=False)
    start, tokens_seen, last_ckpt = 0, 0, None
    if resume:
        path = resolve_resume(resume, ckpt_root)
        state = load_checkpoint(path, model, opt)
        start, tokens_seen, last_ckpt = state["step"], state.get("tokens", 0), str(path)
        if acc.is_main_process:
            truncate_metrics(metrics_path, start)
    elif acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    model, opt = acc.prepare(model, opt)
    world, rank = acc.num_processes, acc.process_index

    from tqdm.auto import tqdm

    bar = tqdm(total=spec.steps, initial=start, disable=not (spec.progress and acc.is_main_process),
               desc=tag, dynamic_ncols=True, leave=False)
    t0, last_loss, tokens_window, window_t = time.perf_counter(), float("nan"), 0, time.perf_counter()
    for step in range(start, spec.steps):
        lr = lr_at(step, spec)
        for group in opt.param_groups:
            group["lr"] = lr
        batches = [collate(micro_batch(examples, step * spec.grad_accum + m, spec.batch_size, seed, rank, world),
                           pad_id) for m in range(spec.grad_accum)]
        batches = [{k: v.to(acc.device) for k, v in b.items()} for b in batches]
        # Target tokens of the global batch: labels shifted by one, -100 excluded.
        local = torch.tensor(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)), device=acc.device)
        num_items = float(acc.reduce(local, reduction="sum")) if world > 1 else float(local)
        step_loss = torch.zeros((), device=acc.device)
        step_kd = torch.zeros((), device=acc.device)
        step_ce = torch.zeros((), device=acc.device)
        for m, batch in enumerate(batches):
            sync = contextlib.nullcontext() if m == len(batches) - 1 else acc.no_sync(model)
            with sync, acc.autocast():
                out = loss_fn(model, batch, num_items)
                acc.backward(out.loss * world)
            step_loss += out.loss.detach().float()
            step_kd += out.kd.detach().float()
            step_ce += out.ce.detach().float()
        if world > 1:
            step_loss, step_kd, step_ce = (acc.reduce(x, reduction="sum") for x in (step_loss, step_kd, step_ce))
        loss_value = float(step_loss)
        if not math.isfinite(loss_value):
            bar.close()
            where = f"; last good checkpoint: {last_ckpt} (resume with --resume)" if last_ckpt else \
                "; no checkpoint was written yet (set train.save_every)"
            raise TrainingDiverged(f"training diverged at step {step + 1}: loss is {loss_value}{where}; "
                                   f"try a lower train.lr or train.max_grad_norm")
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), spec.max_grad_norm)) if spec.max_grad_norm \
            else None  # clipping off: no norm computed (and NaN is not valid JSON in metrics.jsonl)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last_loss = loss_value
        tokens_seen += int(num_items)
        tokens_window += int(num_items)
        done = step + 1
        now = time.perf_counter()
        tps = tokens_window / max(now - window_t, 1e-9)
        if acc.is_main_process and (done % spec.log_every == 0 or done == spec.steps):
            row = {"step": done, "loss": loss_value, "kd": float(step_kd), "ce": float(step_ce), "lr": lr,
                   "grad_norm": grad_norm, "tokens": tokens_seen, "tokens_per_s": round(tps, 1),
                   "elapsed_s": round(now - t0, 3)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            tokens_window, window_t = 0, now
        bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if (spec.save_every and done % spec.save_every == 0) or done == spec.steps:
            acc.wait_for_everyone()
            if acc.is_main_process:
                last_ckpt = str(save_checkpoint(ckpt_root, done, acc.unwrap_model(model), opt,
                                                {"tokens": tokens_seen, "seed": seed}, spec.keep_last))
    bar.close()
    acc.wait_for_everyone()
    return TrainResult(steps=spec.steps, tokens=tokens_seen, seconds=time.perf_counter() - t0, last_loss=last_loss,
                       checkpoint=last_ckpt)
