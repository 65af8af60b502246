"""Checkpoints: safetensors + JSON only (no pickle), written to a temp dir and renamed.

A checkpoint directory `checkpoints/step-NNNNNN/` holds the trainable module's weights, the AdamW
moments, the RNG states and `trainer_state.json`, which is written last: a directory without it is
incomplete and never resumed from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from distil.errors import DistilError

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete



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


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so metrics.jsonl reads as one run."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    path.write_text("".join(ln + "\n" for ln in kept))
