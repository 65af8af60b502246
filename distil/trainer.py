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
import datetime as dt
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distil.checkpoint import (CKPT_PREFIX, STATE_FILE, list_checkpoints,  # noqa: F401
                               load_checkpoint, resolve_resume, retire_newer, save_checkpoint, truncate_metrics)
from distil.data import collate as lm_collate, micro_batch
from distil.errors import DistilError, crash_point
from distil.methods.contract import count_targets
from distil.rng import gather_rng


def check_tensorboard(where: str = "train.report_to") -> None:
    """train.report_to: tensorboard needs the `tensorboard` package (torch.utils.tensorboard writes through it)."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise DistilError(f"{where}: train.report_to: 'tensorboard' needs the tensorboard package, found it not "
                          f"installed; pip install 'distil[tensorboard]' (or pip install tensorboard), or set "
                          f"train.report_to: none") from None


def tensorboard_writer(spec: Any, run_dir: Path, start: int) -> Any:
    """A SummaryWriter into run_dir/tensorboard/ when spec.report_to is 'tensorboard', else None. A resumed run
    purges the events after its checkpoint's step (as metrics.jsonl is truncated there)."""
    if getattr(spec, "report_to", "none") != "tensorboard":
        return None
    check_tensorboard()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start or None)


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
    model: Any = None  # the trained module, unwrapped (no DDP, no autocast wrapper)


def _clip(acc: Any, prepared: Any, opt: Any, max_norm: float) -> float:
    """Clip the gradients to norm max_norm and return their norm before clipping. One parameter group: over every
    parameter at once. Several (parts of a Trainable that are models of their own, e.g. an online teacher): each
    group to max_norm on its own, so one part's large gradients do not shrink another's step; the norm returned is
    still the norm of all gradients together, sqrt(sum_g |grad_g|^2)."""
    if len(opt.param_groups) == 1:
        return float(acc.clip_grad_norm_(prepared.parameters(), max_norm))
    norms = [float(acc.clip_grad_norm_(g["params"], max_norm)) for g in opt.param_groups]
    return math.sqrt(sum(n * n for n in norms))


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
    from accelerate.utils import InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    if precision == "auto":
        mixed = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    # Rank 0 alone evaluates and exports at the end while the others have left; between steps the ranks meet at
    # barriers, so the process-group timeout only has to cover a checkpoint write or a cache shard.
    return Accelerator(cpu=not cuda, mixed_precision=mixed,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=dt.timedelta(hours=2))])


# ----------------------------------------------------------------------------------------------


def _reduce_sum(acc: Any, values: dict[str, torch.Tensor], world: int) -> dict[str, float]:
    """Sum named scalars over processes (one collective for all of them; every rank has the same names)."""
    names = sorted(values)
    if world > 1 and names:
        stacked = acc.reduce(torch.stack([values[n] for n in names]), reduction="sum")
        return {n: float(v) for n, v in zip(names, stacked)}
    return {n: float(values[n]) for n in names}


def _grads_finite(params: list[torch.Tensor]) -> bool:
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def train(model: Any, loss_fn: Callable, examples: list[dict], spec: Any, *, run_dir: str | Path, seed: int,
          pad_id: int, resume: str | None = None, accelerator: Any = None, tag: str = "train",
          count: Callable[[dict], int] = count_targets,
          before_step: Callable[[Any, list[dict], int], list[dict]] | None = None,
          after_step: Callable[[Any, int], None] | None = None,
          collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None) -> TrainResult:
    """Train `model` (a methods.contract.Trainable, or any module) in place with
    `loss_fn(model, batch, num_items) -> LossOutput`.

    `examples` is anything with len() and [i] (a list, a map-style torch Dataset); each micro-batch is the list of
    its examples in the data order (`data.micro_batch`) turned into a dict of tensors by `collate(items)`: by
    default the language-model collate (`data.collate(items, pad_id)`: right-padded input_ids, labels,
    attention_mask); the Python API (distil/api.py) passes one that stacks (x, y) pairs or dicts of tensors.

    Per step: the micro-batches of the data order, `before_step(model, batches, step)` (may replace them, e.g.
    with the student's own samples), `num_items` = sum of `count(batch)` over the global batch, the loss and
    backward per micro-batch, the finite checks, the optimizer step, then `after_step(model, step)`.
    Writes `run_dir/metrics.jsonl` (one line per logged step: loss, every named metric, lr, grad_norm, tokens)
    and `run_dir/checkpoints/`. Returns when `spec.steps` optimizer steps are done. Raises TrainingDiverged on a
    non-finite loss or gradient (nothing is saved for that step).
    """
    run_dir = Path(run_dir)
    make_batch = collate if collate is not None else (lambda items: lm_collate(items, pad_id))
    acc = accelerator or make_accelerator(spec.precision)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(seed + acc.process_index)  # one dropout stream per process (rank 0: the seed itself)
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"

    model.train()
    # One parameter group, or, when a Trainable names parts in lr_scale, one per named part (its own lr and clip)
    # plus one for the rest.
    groups = model.param_groups() if hasattr(model, "param_groups") else \
        [{"params": [p for p in model.parameters() if p.requires_grad]}]
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=spec.lr, betas=tuple(spec.betas), weight_decay=spec.weight_decay,
                            foreach=False)
    start, tokens_seen, last_ckpt = 0, 0, None
    if resume:
        path = resolve_resume(resume, ckpt_root)
        state = load_checkpoint(path, model, opt, rank=acc.process_index)  # weights, moments, this rank's RNG
        start, tokens_seen, last_ckpt = state["step"], state.get("tokens", 0), str(path)
        acc.wait_for_everyone()
        if acc.is_main_process:
            # resuming from an older checkpoint: the newer ones are moved to checkpoints/superseded/ (kept, never
            # listed), so that `--resume` and keep_last see this run's own history only
            retire_newer(ckpt_root, start)
            truncate_metrics(metrics_path, start)
    elif acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("")
    prepared, opt = acc.prepare(model, opt)
    world, rank = acc.num_processes, acc.process_index
    writer = tensorboard_writer(spec, run_dir, start) if acc.is_main_process else None

    from tqdm.auto import tqdm

    bar = tqdm(total=spec.steps, initial=start, disable=not (spec.progress and acc.is_main_process),
               desc=tag, dynamic_ncols=True, leave=False)

    def diverged(step: int, what: str) -> TrainingDiverged:
        bar.close()
        where = f"; last good checkpoint: {last_ckpt} (resume with --resume)" if last_ckpt else \
            "; no checkpoint was written yet (set train.save_every)"
        return TrainingDiverged(f"training diverged at step {step + 1}: {what}{where}; "
                                f"try a lower train.lr or train.max_grad_norm")

    t0, last_loss, tokens_window, window_t = time.perf_counter(), float("nan"), 0, time.perf_counter()
    for step in range(start, spec.steps):
        lr = lr_at(step, spec)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        batches = [make_batch(micro_batch(examples, step * spec.grad_accum + m, spec.batch_size, seed, rank, world))
                   for m in range(spec.grad_accum)]
        batches = [{k: v.to(acc.device) for k, v in b.items()} for b in batches]
        if before_step is not None:
            batches = before_step(prepared, batches, step)
        # Target items of the global batch (tokens: labels shifted by one, -100 excluded), after before_step.
        local = torch.tensor(float(sum(count(b) for b in batches)), device=acc.device)
        num_items = float(acc.reduce(local, reduction="sum")) if world > 1 else float(local)
        step_loss = torch.zeros((), device=acc.device)
        step_metrics: dict[str, torch.Tensor] = {}
        for m, batch in enumerate(batches):
            sync = contextlib.nullcontext() if m == len(batches) - 1 else acc.no_sync(prepared)
            with sync, acc.autocast():
                out = loss_fn(prepared, batch, num_items)
                acc.backward(out.loss * world)
            step_loss += out.loss.detach().float()
            for name, value in out.metrics.items():
                value = value.detach().float().to(acc.device)
                step_metrics[name] = step_metrics[name] + value if name in step_metrics else value
        totals = _reduce_sum(acc, {"loss": step_loss, **step_metrics}, world)
        loss_value = totals.pop("loss")
        if not math.isfinite(loss_value):
            raise diverged(step, f"loss is {loss_value}")
        grad_norm = _clip(acc, prepared, opt, spec.max_grad_norm) if spec.max_grad_norm \
            else None  # clipping off: not logged (and NaN is not valid JSON in metrics.jsonl)
        # A finite loss can still have non-finite gradients (bf16 overflow in backward): never step on them, so
        # that no checkpoint written after this point can hold poisoned weights.
        if not (math.isfinite(grad_norm) if grad_norm is not None else _grads_finite(params)):
            raise diverged(step, f"the loss is finite ({loss_value:.4g}) but the gradients are not")
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after_step is not None:
            after_step(prepared, step)
        last_loss = loss_value
        tokens_seen += int(num_items)
        tokens_window += int(num_items)
        done = step + 1
        now = time.perf_counter()
        tps = tokens_window / max(now - window_t, 1e-9)
        if acc.is_main_process and (done % spec.log_every == 0 or done == spec.steps):
            row = {"step": done, "loss": loss_value, **totals, "lr": lr, "grad_norm": grad_norm,
                   "tokens": tokens_seen, "tokens_per_s": round(tps, 1), "elapsed_s": round(now - t0, 3)}
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if writer is not None:  # the same row as TensorBoard scalars, tagged <phase>/<metric>
                for name, value in row.items():
                    if name != "step" and value is not None:
                        writer.add_scalar(f"{tag}/{name}", value, done)
            tokens_window, window_t = 0, now
        bar.set_postfix(loss=f"{loss_value:.4f}", **{k: f"{v:.4f}" for k, v in totals.items()}, tok_s=f"{tps:.0f}")
        bar.update(1)
        crash_point(f"train:step-{done}")  # kill -9 tests: after the step and its metrics line, before saving
        if (spec.save_every and done % spec.save_every == 0) or done == spec.steps:
            acc.wait_for_everyone()
            rng = gather_rng(acc)  # collective: every process's RNG states, saved per rank
            if acc.is_main_process:
                last_ckpt = str(save_checkpoint(ckpt_root, done, acc.unwrap_model(prepared), opt,
                                                {"tokens": tokens_seen, "seed": seed}, spec.keep_last,
                                                rng_states=rng))
                crash_point(f"train:saved-{done}")
    bar.close()
    if writer is not None:
        writer.close()
    acc.wait_for_everyone()
    # The trained module itself, without DDP and without accelerate's autocast wrapper on its forward: evaluation
    # rows must all run at one precision (a wrapped student would run under bf16 autocast, its `before` copy not).
    trained = acc.unwrap_model(prepared, keep_fp32_wrapper=False)
    return TrainResult(steps=spec.steps, tokens=tokens_seen, seconds=time.perf_counter() - t0, last_loss=last_loss,
                       checkpoint=last_ckpt, model=trained)
