"""Checkpoints: safetensors + JSON only (no pickle), written to a temp dir, fsynced and renamed.

Layout of `checkpoints/` (one run):

    step-000004/            a complete checkpoint (listed, resumable)
        model.safetensors       trainable module's weights (tied weights stored once)
        optimizer.safetensors   optimizer state tensors, keyed "<param index>.<name>"
        optimizer_groups.json   the optimizer's param_groups (hyper-parameters, param indices)
        rng.safetensors         every process's RNG states, keyed "rank<r>.<generator>"
        trainer_state.json      {"step": N, ...}; written last: without it a directory is incomplete
    .tmp-step-000006/       a save in progress (never listed; removed by the next save)
    .del-step-000002/       a checkpoint being deleted (never listed; removed by the next save)
    superseded/step-000008.1  a checkpoint from an abandoned timeline (see `retire_newer`)

What the training loop calls:

    on resume, every rank:     path = resolve_resume(resume, ckpt_root)
                               state = load_checkpoint(path, model, opt, rank=rank)
    then on the main rank:     retire_newer(ckpt_root, state["step"]); truncate_metrics(metrics, state["step"])
    on each save, every rank:  rng = gather_rng(accelerator)          (a collective: all ranks call it)
    then on the main rank:     save_checkpoint(ckpt_root, step, model, opt, state, keep_last, rng_states=rng)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from distil.atomic import fsync_dir
from distil.errors import DistilError
from distil.rng import (_apply_seed, _rng_setters, _select_rank,  # noqa: F401
                        capture_rng, gather_rng)

CKPT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"  # written last: a checkpoint without it is incomplete
SUPERSEDED = "superseded"
FILES = ("model.safetensors", "optimizer.safetensors", "optimizer_groups.json", "rng.safetensors", STATE_FILE)
_STEP_DIR = re.compile(r"step-(\d+)")
# safetensors itself refuses headers above 100 MB; anything larger is corruption, not a big model.
_MAX_HEADER = 100_000_000


def _fail(where: Path, what: str) -> DistilError:
    return DistilError(f"{where}: --resume: {what}")


# --- durability ---------------------------------------------------------------------------------

_fsync = fsync_dir  # flushes a file's or a directory's contents (for a directory: its entries) to the disk


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint so that a kill midway never leaves a half-deleted one under its real name:
    the rename is atomic and hides it (leading dot), only then do the files go."""
    hidden = path.parent / f".del-{path.name}"
    if hidden.exists():
        shutil.rmtree(hidden)
    os.replace(path, hidden)
    _fsync(path.parent)
    shutil.rmtree(hidden)


def clean_leftovers(ckpt_root: Path) -> list[str]:
    """Remove `.tmp-*` (interrupted saves) and `.del-*` (interrupted deletions); returns their names.
    Called by `save_checkpoint`; safe whenever no other process is saving into `ckpt_root`."""
    gone = []
    for p in sorted(Path(ckpt_root).iterdir()) if Path(ckpt_root).is_dir() else []:
        if p.name.startswith((".tmp-", ".del-")):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p.name)
    return gone


# --- writing ------------------------------------------------------------------------------------

def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def _rng_tensors(rng_states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    if not isinstance(rng_states, list) or not rng_states or not all(
            isinstance(s, dict) and torch.is_tensor(s.get("cpu")) for s in rng_states):
        raise TypeError("rng_states: expected a non-empty list (one per rank) of capture_rng() dicts")
    return {f"rank{r}.{k}": t.detach().cpu().contiguous() for r, s in enumerate(rng_states) for k, t in s.items()}


def save_checkpoint(ckpt_root: Path, step: int, model: Any, opt: torch.optim.Optimizer, state: dict,
                    keep_last: int, *, rng_states: list[dict[str, torch.Tensor]] | None = None) -> Path:
    """Write `ckpt_root/step-NNNNNN` atomically and durably; keep the newest `keep_last` (<= 0: all).

    Call on the main rank only. `model` is the unwrapped module; `state` is JSON-serialisable
    (`"step"` is set here). `rng_states`: one `capture_rng()` dict per rank, in rank order (see
    `gather_rng`); None saves this process's states as rank 0's (single-process runs).

    Order: leftovers of killed saves/deletions are removed; every file is written into
    `.tmp-step-N` and fsynced, then that directory; it is renamed to `step-N` and `checkpoints/` is
    fsynced, so after a power loss `step-N` is either absent or complete. Then older checkpoints
    beyond `keep_last` are renamed to `.del-step-M` before being deleted. An existing `step-N` (the
    same step saved again after a resume without `retire_newer`) is moved to `superseded/`, never
    deleted. Returns the new path."""
    from safetensors.torch import save_file, save_model

    ckpt_root = Path(ckpt_root)
    per_rank = rng_states if rng_states is not None else [capture_rng()]
    rng = _rng_tensors(per_rank)
    state_text = json.dumps({**state, "step": step})  # fail on a non-JSON state before writing anything
    ckpt_root.mkdir(parents=True, exist_ok=True)
    clean_leftovers(ckpt_root)
    final = ckpt_root / f"{CKPT_PREFIX}{step:06d}"
    tmp = ckpt_root / f".tmp-{final.name}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied (shared) weights
    tensors, groups = _optimizer_tensors(opt)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng, str(tmp / "rng.safetensors"), metadata={"world_size": str(len(per_rank))})
    (tmp / "optimizer_groups.json").write_text(json.dumps(groups))
    (tmp / STATE_FILE).write_text(state_text)
    for name in FILES:
        _fsync(tmp / name)
    _fsync(tmp)
    if final.exists():
        # The same step saved again: the old one belongs to an abandoned continuation (a resume that
        # did not call `retire_newer`). Keep it, as `retire_newer` would; deleting it first would
        # leave a half-deleted step-N under its name if killed midway.
        _supersede(final)
    os.replace(tmp, final)
    _fsync(ckpt_root)
    if keep_last and keep_last > 0:
        for old in list_checkpoints(ckpt_root)[:-keep_last]:
            if old != final:  # an out-of-order save never prunes itself
                _remove_dir(old)
    return final


def retire_newer(ckpt_root: Path, step: int) -> list[Path]:
    """Move every `step-M` with M > `step` into `ckpt_root/superseded/step-M.<k>` (k = 1, 2, ...: the
    first free number), one atomic rename per directory; returns the new paths.

    Call on the main rank right after resuming from `step`: those checkpoints belong to the abandoned
    continuation, and left in place `--resume latest` and `keep_last` would take them as the newest.
    They are kept (resumable by explicit path) and never listed or pruned; delete them by hand."""
    ckpt_root = Path(ckpt_root)
    newer = [(n, p) for n, p in _step_dirs(ckpt_root) if n > step]
    return [_supersede(p) for _, p in newer]


def _supersede(path: Path) -> Path:
    """Rename a checkpoint directory to `superseded/<name>.<k>` (atomic; k = first free number)."""
    dest = path.parent / SUPERSEDED
    dest.mkdir(exist_ok=True)
    k = 1
    while (dest / f"{path.name}.{k}").exists():
        k += 1
    os.rename(path, dest / f"{path.name}.{k}")
    _fsync(dest)
    _fsync(path.parent)
    return dest / f"{path.name}.{k}"


# --- reading ------------------------------------------------------------------------------------

def _step_dirs(ckpt_root: Path) -> list[tuple[int, Path]]:
    if not ckpt_root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return sorted(found)  # by step number: "step-1000000" is newer than "step-999999"


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints (`step-N` with its trainer_state.json), oldest first."""
    return [p for _, p in _step_dirs(Path(ckpt_root)) if (p / STATE_FILE).is_file()]


def _check_safetensors(file: Path) -> dict:
    """The header of a safetensors file, after checking that it is whole: the 8-byte header length,
    the JSON header, and the data region ending exactly at the end of the file."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _fail(file, f"not a safetensors file: {size} bytes, expected an 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER:
            raise _fail(file, f"corrupt safetensors file: header length {n} bytes, expected at most {_MAX_HEADER}")
        if n > size - 8:
            raise _fail(file, f"truncated safetensors file: header length {n} bytes, file has {size} bytes")
        try:
            header = json.loads(f.read(n))
            entries = [v for k, v in header.items() if k != "__metadata__"]
            if not all(isinstance(v["dtype"], str) and all(type(d) is int for d in v["shape"]) for v in entries):
                raise ValueError("tensor entry without a dtype name and integer shape")
            end = max([int(v["data_offsets"][1]) for v in entries], default=0)
        except Exception as exc:
            raise _fail(file, f"corrupt safetensors header ({type(exc).__name__})") from None
    if 8 + n + end != size:
        raise _fail(file, f"truncated or padded safetensors file: header says {8 + n + end} bytes, found {size}")
    return header


def _check_dir(path: Path) -> dict:
    """Validate a checkpoint directory's files (not yet against a model); returns trainer_state."""
    if path.is_file():
        raise _fail(path, "expected a checkpoint directory (checkpoints/step-N), found a file")
    if not path.is_dir():
        raise DistilError(f"{path}: --resume: checkpoint directory not found")
    missing = [n for n in FILES if not (path / n).is_file()]
    if missing:
        raise _fail(path, f"incomplete (half-written) checkpoint, missing {', '.join(missing)}")
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(path / STATE_FILE, f"expected a JSON object, found unparseable text ({exc.__class__.__name__})") \
            from None
    step = state.get("step") if isinstance(state, dict) else None
    if type(step) is not int or step < 0:
        found = json.dumps(state)[:60] if not isinstance(state, dict) else \
            f'"step": {json.dumps(step)[:40]}' if "step" in state else 'no "step" key'
        raise _fail(path / STATE_FILE, f'expected an object with an integer "step" >= 0, found {found}')
    try:
        groups = json.loads((path / "optimizer_groups.json").read_text())
        ok = isinstance(groups["param_groups"], list) and all(
            isinstance(g, dict) and all(type(i) is int for i in g["params"]) for g in groups["param_groups"])
    except Exception:
        ok = False
    if not ok:
        raise _fail(path / "optimizer_groups.json", 'expected {"param_groups": [{"params": [int, ...], ...}]}')
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        _check_safetensors(path / name)
    return state


def resolve_resume(resume: str, ckpt_root: Path) -> Path:
    """`resume` is 'latest' (the newest complete checkpoint of this run) or a checkpoint path.
    The directory's files are checked (present, parseable, not truncated); raises DistilError."""
    if resume == "latest":
        found = list_checkpoints(Path(ckpt_root))
        if not found:
            raise DistilError(f"{ckpt_root}: --resume: no complete checkpoint to resume from")
        path = found[-1]
    else:
        path = Path(resume)
    _check_dir(path)
    return path


def _shared_names(sd: dict[str, torch.Tensor]) -> dict[str, set[str]]:
    """name -> the names sharing its storage (tied weights; safetensors stores one of them)."""
    by_storage: dict[int, set[str]] = {}
    for name, t in sd.items():
        ptr = t.untyped_storage().data_ptr()
        if ptr:
            by_storage.setdefault(ptr, set()).add(name)
    return {n: group for group in by_storage.values() for n in group}


def _first(items: list[str]) -> str:
    return items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")


def _check_model(file: Path, header: dict, model: Any) -> None:
    sd = model.state_dict()
    found = {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    shared = _shared_names(sd)
    unexpected = sorted(k for k in found if k not in sd)
    missing = sorted(k for k in sd if k not in found and not (shared.get(k, set()) & found.keys()))
    shapes = [f"{k} is {found[k]} in the file, {list(sd[k].shape)} in the model" for k in sorted(found)
              if k in sd and found[k] != list(sd[k].shape)]
    if shapes:
        raise _fail(file, f"checkpoint does not match the model: {_first(shapes)}")
    if missing or unexpected:
        what = [f"missing {_first(missing)}"] if missing else []
        what += [f"unexpected {_first(unexpected)}"] if unexpected else []
        raise _fail(file, f"checkpoint does not match the model: {'; '.join(what)}")


def _optimizer_state(path: Path, tensors: dict, groups: list, opt: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by param index, after checking it fits `opt`'s param groups."""
    where = path / "optimizer_groups.json"
    if len(groups) != len(opt.param_groups):
        raise _fail(where, f"expected {len(opt.param_groups)} parameter group(s) (the optimizer's), "
                           f"found {len(groups)}")
    params: dict[int, torch.Tensor] = {}
    for i, (saved, cur) in enumerate(zip(groups, opt.param_groups)):
        if len(saved["params"]) != len(cur["params"]):
            raise _fail(where, f"parameter group {i}: expected {len(cur['params'])} parameters (the optimizer's), "
                               f"found {len(saved['params'])}")
        params.update(zip(saved["params"], cur["params"]))
    where = path / "optimizer.safetensors"
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        idx, _, key = name.partition(".")
        if not idx.isdigit() or not key or int(idx) not in params:
            raise _fail(where, f'expected tensors named "<param index>.<state>" for listed parameters, found "{name}"')
        p = params[int(idx)]
        if t.dim() > 0 and t.shape != p.shape:  # per-element moments must be shaped like their parameter
            raise _fail(where, f"{name} is {list(t.shape)}, its parameter is {list(p.shape)}: "
                               "checkpoint does not match the model")
        state.setdefault(int(idx), {})[key] = t
    return state


def load_checkpoint(path: Path, model: Any, opt: torch.optim.Optimizer, *, rank: int = 0) -> dict:
    """Restore `model` (unwrapped), `opt` and this process's RNGs from `path`; returns trainer_state.

    Call on every rank, before wrapping model/opt (accelerate's prepare). Everything is checked
    first (files, tensor names and shapes against the model, optimizer groups and state shapes,
    RNG states); on any mismatch a one-line DistilError is raised and nothing has been changed.
    RNG: rank `rank` restores its own saved states. A checkpoint from before per-rank states has
    only "cpu", which every rank restores. A rank the checkpoint has no state for (more processes
    than when saved) is seeded from rank 0's state and its rank number, with a warning."""
    from safetensors.torch import load_file, load_model

    path = Path(path)
    state = _check_dir(path)
    _check_model(path / "model.safetensors", _check_safetensors(path / "model.safetensors"), model)
    try:
        tensors = load_file(str(path / "optimizer.safetensors"))
        rng_saved = load_file(str(path / "rng.safetensors"))
    except Exception as exc:
        raise _fail(path, f"unreadable checkpoint ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    groups = json.loads((path / "optimizer_groups.json").read_text())["param_groups"]
    opt_state = _optimizer_state(path, tensors, groups, opt)
    chosen = _select_rank(rng_saved, rank, path / "rng.safetensors")
    setters = _rng_setters(chosen, path / "rng.safetensors") if isinstance(chosen, dict) else \
        [lambda: _apply_seed(chosen)]
    try:
        load_model(model, str(path / "model.safetensors"))
        opt.load_state_dict({"state": opt_state, "param_groups": groups})
    except Exception as exc:  # checked above; this is the net for what the checks cannot foresee (dtypes)
        raise _fail(path, f"unreadable checkpoint ({type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    for apply in setters:
        apply()
    return state


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint so metrics.jsonl reads as one run.

    A torn last line (the process was killed while appending it) is dropped: it was written after
    the last checkpoint. The file is replaced atomically, so a kill here loses nothing."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for i, ln in enumerate(lines):
        try:
            row = json.loads(ln)
        except ValueError:
            if i == len(lines) - 1:
                break
            raise DistilError(f"{path}: line {i + 1}: expected a JSON object, found {ln[:60]!r}") from None
        if not isinstance(row, dict):
            raise DistilError(f"{path}: line {i + 1}: expected a JSON object, found {ln[:60]!r}")
        if row.get("step", 0) <= step:
            kept.append(ln)
    tmp = path.with_name(f".tmp-{path.name}")
    with tmp.open("w") as f:
        f.write("".join(ln + "\n" for ln in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
