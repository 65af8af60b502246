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
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distil.data import collate, micro_batch
from distil.errors import DistilError

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete


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
# Checkpoints: safetensors + JSON only (no pickle), written to a temp dir and renamed.


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def save_checkpoint(ckpt_root: Path, step: int, model: Any, opt: torch.optim.Optimizer, state: dict,
                    keep_last: int) -> Path:
    from safetensors.torch import save_file, save_model

    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{CKPT_PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    tensors, groups = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "optimizer_groups.json").write_text(json.dumps(groups))
    (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.iterdir() if p.name.startswith(CKPT_PREFIX) and (p / STATE_FILE).is_file())


def resolve_resume(resume: str, ckpt_root: Path) -> Path:
    """`resume` is 'latest' (the newest complete checkpoint of this run) or a checkpoint path."""
    if resume == "latest":
        found = list_checkpoints(ckpt_root)
        if not found:
            raise DistilError(f"{ckpt_root}: --resume: no complete checkpoint to resume from")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise DistilError(f"{path}: --resume: checkpoint directory not found")
    needed = ["model.safetensors", "optimizer.safetensors", "optimizer_groups.json", "rng.safetensors", STATE_FILE]
    missing = [n for n in needed if not (path / n).is_file()]
    if missing:
        raise DistilError(f"{path}: --resume: incomplete (half-written) checkpoint, missing {', '.join(missing)}")
    return path


def load_checkpoint(path: Path, model: Any, opt: torch.optim.Optimizer) -> dict:
    from safetensors.torch import load_file, load_model

    try:
        state = json.loads((path / STATE_FILE).read_text())
        load_model(model, str(path / "model.safetensors"))
        tensors = load_file(str(path / "optimizer.safetensors"))
        groups = json.loads((path / "optimizer_groups.json").read_text())
        rng = load_file(str(path / "rng.safetensors"))["cpu"]
    except Exception as exc:
        raise DistilError(f"{path}: --resume: unreadable checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
    opt_state: dict = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        opt_state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": opt_state, "param_groups": groups["param_groups"]})
    torch.set_rng_state(rng)
    return state


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so metrics.jsonl reads as one run."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))


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
            _truncate_metrics(metrics_path, start)
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
