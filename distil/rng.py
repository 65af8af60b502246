"""Random number generator states as plain tensors: what a checkpoint needs to resume dropout exactly.

Every process's states (torch CPU, each CUDA device, Python's `random`, numpy's global legacy generator) are
captured as tensors (no pickle), gathered to rank 0 through one collective, stored in a checkpoint's
`rng.safetensors` keyed "rank<r>.<generator>", and restored per rank (distil/checkpoint.py).
"""

from __future__ import annotations

import hashlib
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from distil.errors import DistilError

_RNG_KEY = re.compile(r"rank(\d+)\.(\w+)")


def _fail(where: Path, what: str) -> DistilError:
    return DistilError(f"{where}: --resume: {what}")



def capture_rng() -> dict[str, torch.Tensor]:
    """This process's RNG states as CPU tensors: "cpu" (torch), "cuda<i>" for every visible CUDA
    device, "python"/"python_gauss" (`random`) and "numpy"/"numpy_gauss" (numpy's global legacy
    state). Every value is a plain tensor, so the states go through safetensors and collectives."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s.cpu()
    version, internal, gauss = random.getstate()
    states["python"] = torch.tensor([version, *internal], dtype=torch.int64)
    states["python_gauss"] = torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64)
    try:
        import numpy as np
    except ImportError:  # numpy is optional for this module; nothing to save without it
        return states
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind == "MT19937":  # the legacy global generator always is; anything else is left alone
        states["numpy"] = torch.cat([torch.tensor([pos, has_gauss], dtype=torch.int64),
                                     torch.from_numpy(keys.astype(np.int64))])
        states["numpy_gauss"] = torch.tensor([cached], dtype=torch.float64)
    return states


def _pack_rng(states: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in states.values()])


def _unpack_rng(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    states, at = {}, 0
    for name, t in like.items():
        n = t.numel() * t.element_size()
        states[name] = flat[at:at + n].clone().view(t.dtype).view(t.shape)
        at += n
    return states


def gather_rng(accelerator: Any) -> list[dict[str, torch.Tensor]]:
    """Every rank's `capture_rng()`, in rank order, for `save_checkpoint(rng_states=...)`.

    A collective: every rank must call it (before the main-rank-only save). It packs the states into
    one uint8 tensor and uses `accelerator.gather`, so no object pickling is involved; ranks must
    have the same generators (same libraries, same number of visible CUDA devices)."""
    local = capture_rng()
    world = int(getattr(accelerator, "num_processes", 1))
    if world == 1:
        return [local]
    every = accelerator.gather(_pack_rng(local).to(accelerator.device)).cpu()
    return [_unpack_rng(chunk, local) for chunk in every.view(world, -1)]


def _rng_setters(states: dict[str, torch.Tensor], where: Path) -> list[Callable[[], None]]:
    """Validate one rank's states on scratch generators, return closures that apply them. Nothing
    global changes until they are called, so a bad file leaves the process as it was."""
    setters: list[Callable[[], None]] = []
    try:
        cpu = states["cpu"].to(torch.uint8)
        torch.Generator().set_state(cpu)
        setters.append(lambda: torch.set_rng_state(cpu))
        if "python" in states:
            v = states["python"].tolist()
            g = states["python_gauss"].tolist() if "python_gauss" in states else [0.0, 0.0]
            py_state = (int(v[0]), tuple(int(x) for x in v[1:]), g[1] if g[0] else None)
            random.Random().setstate(py_state)
            setters.append(lambda: random.setstate(py_state))
        if "numpy" in states:
            import numpy as np

            v = states["numpy"].tolist()
            cached = float(states["numpy_gauss"][0]) if "numpy_gauss" in states else 0.0
            np_state = ("MT19937", np.array(v[2:], dtype=np.uint32), int(v[0]), int(v[1]), cached)
            np.random.RandomState().set_state(np_state)
            setters.append(lambda: np.random.set_state(np_state))
    except Exception as exc:  # a generator refused the state: wrong size, dtype or version
        raise _fail(where, f"unusable RNG state ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:160]})") from None
    cuda = sorted((int(k[4:]), t) for k, t in states.items() if re.fullmatch(r"cuda\d+", k))
    if cuda:
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if len(cuda) > have:  # resuming a GPU run elsewhere: exactness is gone anyway, so say so
            warnings.warn(f"{where}: {len(cuda)} CUDA RNG states saved, {have} CUDA devices here: "
                          f"restoring the first {min(have, len(cuda))}", stacklevel=3)
        for i, t in cuda:
            if i < have:
                setters.append(lambda i=i, t=t: torch.cuda.set_rng_state(t.to(torch.uint8), i))
    return setters


def _select_rank(saved: dict[str, torch.Tensor], rank: int, where: Path) -> dict[str, torch.Tensor] | int:
    """The states `rank` restores, or a derived seed when the checkpoint has none for it."""
    if "cpu" in saved and not any(_RNG_KEY.fullmatch(k) for k in saved):
        # Format of checkpoints written before per-rank states: rank 0's torch CPU state, which every
        # rank restored (and which every rank had, since all seeded alike then).
        return {"cpu": saved["cpu"]}
    ranks: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in saved.items():
        m = _RNG_KEY.fullmatch(key)
        if m:
            ranks.setdefault(int(m.group(1)), {})[m.group(2)] = t
    if 0 not in ranks or "cpu" not in ranks[0]:
        raise _fail(where, f"rng.safetensors has no rank0.cpu (nor legacy cpu) state; found {sorted(saved)[:6]}")
    if rank in ranks:
        return ranks[rank]
    # Written with fewer processes. Exactness is impossible at another world size (dropout masks are
    # drawn per process), so rather than refuse a legitimate scale-out resume, give the new rank a
    # seed that is reproducible (same checkpoint + rank -> same seed) and differs from every other
    # rank's (copying rank 0's state would repeat its dropout masks).
    digest = hashlib.sha256(ranks[0]["cpu"].numpy().tobytes() + f"rank{rank}".encode()).digest()
    seed = int.from_bytes(digest[:8], "little") >> 1
    warnings.warn(f"{where}: written with {len(ranks)} process(es), no RNG state for rank {rank}: "
                  f"seeding it from rank 0's state and its rank (seed {seed})", stacklevel=3)
    return seed


def _apply_seed(seed: int) -> None:
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass
