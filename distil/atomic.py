"""Writing a file so that a kill -9 or a power loss at any moment leaves the old file or the whole new one.

temp file in the same directory -> write -> fsync -> rename over the final name -> fsync the directory (the
rename itself is durable). Every prepared artifact (cache manifests and shards, generated corpora), eval records
and reports go through `write_atomic`; checkpoints do the same per directory (distil/checkpoint.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from distil.errors import crash_point


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename in it becomes durable) or a file, by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str, point: str = "") -> None:
    """Replace `path` by `data` atomically and durably. `point` names the moments for the kill tests
    (`<point>:tmp` before the rename, `<point>:renamed` after it; see errors.crash_point)."""
    path = Path(path)
    tmp = path.parent / f".tmp-{path.name}"
    with tmp.open("wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    crash_point(f"{point}:tmp")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    crash_point(f"{point}:renamed")
