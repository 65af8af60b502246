"""The JSONL output of a generation run, resumable after kill -9.

`OUT.jsonl` holds one JSON line per sample; `OUT.jsonl.meta.json` (written atomically before the
first sample) holds the run's identity: model, weights fingerprint, backend, sampling parameters and
a hash of the prompts as token ids (so a different tokenizer or chat template is a different run).

Samples are appended and flushed (and fsynced) batch by batch. On restart the complete lines are
kept, a half-written last line (the only damage a kill can do to an append-only file) is cut off,
and only the missing (prompt index, sample index) pairs are generated. When the samples were
appended out of order (some were missing from the middle), the file is rewritten in canonical order
at the end (temp file, fsync, rename), so a resumed run's file equals an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from distil.atomic import write_atomic
from distil.errors import DistilError

FORMAT = 1


def meta_path(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")


def _first_difference(made: dict, want: dict, prefix: str = "") -> str | None:
    for key in sorted(set(made) | set(want)):
        a, b = made.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = _first_difference(a, b, f"{prefix}{key}.")
            if inner:
                return inner
        elif a != b:
            return f"{prefix}{key}: the file has {a!r}, this run {b!r}"
    return None


class SampleStore:
    """Records by (prompt index, sample index), backed by the JSONL file (or memory when path is None)."""

    def __init__(self, path: str | Path | None, identity: dict, n_prompts: int, n: int, overwrite: bool = False,
                 remedy: str = "use another --out, or --overwrite to start again"):
        self.path = Path(path) if path is not None else None
        self.remedy = remedy  # what the user can do about a file made by another run (CLI flags, or recipe keys)
        self.identity = {"format": FORMAT, **identity}
        self.n_prompts, self.n = n_prompts, n
        self.records: dict[tuple[int, int], dict] = {}
        self.order: list[tuple[int, int]] = []  # as found in / appended to the file
        self.kept = 0
        self._file = None
        if self.path is not None:
            self._open(overwrite)

    # -- opening ---------------------------------------------------------------------------------

    def _open(self, overwrite: bool) -> None:
        path, meta = self.path, meta_path(self.path)
        if path.is_dir():
            raise DistilError(f"{path}: expected a .jsonl output file path, found a directory")
        if not path.parent.is_dir():
            raise DistilError(f"{path}: output directory {path.parent} does not exist")
        has_samples = path.is_file() and path.stat().st_size > 0
        if overwrite or not has_samples:
            if overwrite and path.exists():
                path.unlink()
            write_atomic(meta, (json.dumps(self.identity, indent=1, sort_keys=True) + "\n").encode())
            self._file = path.open("ab")
            return
        if not meta.is_file():
            raise DistilError(f"{path}: exists without {meta.name}, so it was not written by distil generate "
                              f"(or its identity was lost); refusing to append to it: {self.remedy}")
        try:
            made = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DistilError(f"{meta}: expected a JSON object, found unreadable content ({exc})") from None
        diff = _first_difference(made if isinstance(made, dict) else {}, self.identity)
        if diff:
            raise DistilError(f"{path}: made by a different generation run ({diff}); {self.remedy}")
        self._load_existing()
        self._file = path.open("ab")

    def _load_existing(self) -> None:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # a line cut short by a kill: drop it, its sample is generated again
            with self.path.open("r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for number, line in enumerate(data[:end].splitlines(), start=1):
            if not line.strip():
                continue
            key = self._check_line(line, number)
            self.records[key] = json.loads(line)
            self.order.append(key)
        self.kept = len(self.records)

    def _check_line(self, line: bytes, number: int) -> tuple[int, int]:
        where = f"{self.path}:{number}"
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise DistilError(f"{where}: expected a JSON sample record, found {line[:60]!r}; the file was edited "
                              f"or damaged: repair it or use --overwrite") from None
        p, s = (rec.get("prompt_index"), rec.get("sample_index")) if isinstance(rec, dict) else (None, None)
        if not (isinstance(p, int) and isinstance(s, int) and 0 <= p < self.n_prompts and 0 <= s < self.n):
            raise DistilError(f"{where}: expected prompt_index in [0, {self.n_prompts}) and sample_index in "
                              f"[0, {self.n}), found {p!r}, {s!r}")
        if (p, s) in self.records:
            raise DistilError(f"{where}: duplicate sample (prompt {p}, sample {s}); repair the file or use --overwrite")
        return p, s

    # -- writing ---------------------------------------------------------------------------------

    def missing(self) -> list[tuple[int, int]]:
        return [(p, s) for p in range(self.n_prompts) for s in range(self.n) if (p, s) not in self.records]

    def add(self, records: list[dict]) -> None:
        """Append a batch: every line written, then one flush + fsync (a kill loses at most this batch)."""
        for rec in records:
            key = (rec["prompt_index"], rec["sample_index"])
            self.records[key] = rec
            self.order.append(key)
        if self._file is not None:
            self._file.write(b"".join(_line(r) for r in records))
            self._file.flush()
            os.fsync(self._file.fileno())

    def finish(self) -> list[dict]:
        """Close the file (in canonical order) and return every record, prompt-major."""
        canonical = sorted(self.records)
        if self._file is not None:
            self._file.close()
            self._file = None
            if self.order != canonical:
                write_atomic(self.path, b"".join(_line(self.records[k]) for k in canonical))
        return [self.records[k] for k in canonical]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _line(record: dict) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
