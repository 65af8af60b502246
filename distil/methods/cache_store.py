"""Teacher-logit cache, the storage: the teacher's top-k per target token in safetensors shards + a manifest.
(methods/cache.py is the method that builds it for a recipe and trains from it.)

What is stored. The rows are the training loss's target positions, exactly: for training example e (the list
`load_examples` returns, in order) and position t = 0 .. len(e) - 2, the teacher's logits at t predict token t + 1,
and the row exists iff labels[t + 1] != -100 (the causal shift; prompt and padding tokens are not stored). Rows are
in example order, then position order. Per row, with p_T = softmax(z_T / cache.temperature) over the tokenizer's
vocabulary (logits sliced to len(tokenizer)):
    ids       [rows, k]  the k most likely token ids, most likely first (uint16 when V <= 65536, else int32)
    logprobs  [rows, k]  log p_T at those ids (float16)
    tail      [rows]     log(1 - P_T), P_T = the top-k mass, computed as a logsumexp of the other logits (float32;
                         -inf when k = V)
    offsets   [n_ex + 1] int64, per shard: rows offsets[j]:offsets[j+1] of the shard belong to its j-th example.
At k = 64 and V = 49,152 that is 64 * (2 + 2) + 4 = 260 bytes per token, vs 196,608 for fp32 full logits.

Layout of the cache directory (`cache.dir`, default `<output.dir>/<name>-cache`, a sibling of the run directory so
that `distil run --overwrite` keeps it):
    manifest.json              identity + the list of complete shards (rewritten atomically after each shard)
    shard-00000.safetensors    whole examples, about `cache.shard_tokens` rows each
The identity is the teacher (source + a fingerprint of its weight files, or of its config and seed for `config:`
teachers), the tokenizer (hash of its vocabulary), the data (hash of the tokenized training examples: input ids
and labels, hence also seq_len and masking), k, the temperature and the format version. A cache whose identity
differs from the recipe's is refused with a message naming what differs; it is never silently reused or deleted.

Crash safety. A shard is written to `.tmp-shard-NNNNN.safetensors`, fsynced and renamed; then the manifest (also
temp + fsync + rename) lists it. Only shards the manifest lists are ever read, and their size and (on `distil
cache`) their sha256 are checked against it, so a half-written shard is never read. A rerun (`distil cache` or
`distil run` with method `cache`) continues after the last complete shard; examples are grouped into shards and
teacher batches the same way every time, so a resumed cache is byte for byte the cache an uninterrupted run makes.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distil.atomic import write_atomic
from distil.errors import DistilError

FORMAT, VERSION = "distil-teacher-cache", 1
MANIFEST = "manifest.json"
SAMPLED_ABOVE = 2 << 30  # files larger than 2 GiB are fingerprinted from their header + 64 sampled MiB-blocks


# ----------------------------------------------------------------------------------------------
# Fingerprints: what makes a cache valid for a recipe


def _file_digest(path: Path) -> str:
    h, size = hashlib.sha256(), path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        if size <= SAMPLED_ABOVE:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        else:  # every byte of the first 64 MiB (safetensors/GGUF headers), then evenly spaced 1 MiB blocks
            h.update(f.read(64 << 20))
            for i in range(64):
                f.seek((size - (1 << 20)) * i // 63)
                h.update(f.read(1 << 20))
    return h.hexdigest()


def teacher_fingerprint(spec: Any, seed: int) -> dict:
    """{'source', 'sha256'} of a recipe's teacher, from its files (the model is not loaded)."""
    from distil.models import _apply_config_overrides, _config_from, embedded_path

    source = spec.source
    h = hashlib.sha256()
    if source.startswith("config:"):  # a random init: the config and the seed determine the weights
        cfg, _ = _config_from(source.split(":", 1)[1], None)
        _apply_config_overrides(cfg, spec.config or {}, "teacher")
        h.update(cfg.to_json_string(use_diff=False).encode())
        h.update(f"seed={seed}".encode())
        return {"source": source, "sha256": h.hexdigest()}
    path = embedded_path(source.split(":", 1)[1]) if source.startswith("embedded:") else Path(source)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.safetensors")) + [p for p in (path / "config.json",) if p.is_file()]
    else:
        raise DistilError(f"{path}: teacher.source: model not found")
    if not files:
        raise DistilError(f"{path}: teacher.source: expected *.safetensors weights, found none")
    for f in files:
        h.update(_file_digest(f).encode())
    return {"source": source, "sha256": h.hexdigest()}


def tokenizer_fingerprint(tok: Any) -> dict:
    from distil.models import tokenizer_name

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    sha = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()
    return {"name": str(tokenizer_name(tok)), "vocab_size": len(tok), "sha256": sha}


def rows_per_example(examples: list[dict]) -> list[int]:
    """Target rows of each example: positions t with labels[t + 1] != -100."""
    return [sum(1 for y in e["labels"][1:] if y != -100) for e in examples]


def data_fingerprint(examples: list[dict], source: str, seq_len: int) -> dict:
    h = hashlib.sha256()
    for e in examples:
        ids, labels = np.asarray(e["input_ids"], dtype=np.int64), np.asarray(e["labels"], dtype=np.int64)
        h.update(np.int64(len(ids)).tobytes() + ids.tobytes() + labels.tobytes())
    return {"source": source, "seq_len": seq_len, "examples": len(examples),
            "rows": sum(rows_per_example(examples)), "sha256": h.hexdigest()}


def cache_identity(recipe: Any, examples: list[dict], tok: Any) -> dict:
    return {"format": FORMAT, "version": VERSION,
            "teacher": teacher_fingerprint(recipe.teacher, recipe.seed),
            "tokenizer": tokenizer_fingerprint(tok),
            "data": data_fingerprint(examples, recipe.data.source, recipe.data.seq_len),
            "k": recipe.cache.k, "temperature": float(recipe.cache.temperature)}


def _mismatch(cdir: Path, made: dict, want: dict) -> str | None:
    """The first identity field that differs, as one line for the user; None when the cache fits."""
    fix = "delete it or set cache.dir"
    if (made.get("format"), made.get("version")) != (FORMAT, VERSION):
        return (f"cache {cdir}: format {made.get('format')!r} version {made.get('version')!r}, this distil reads "
                f"{FORMAT!r} version {VERSION}; {fix}")
    mt, wt = made["teacher"], want["teacher"]
    if mt["sha256"] != wt["sha256"]:
        return (f"cache {cdir}: made for teacher {mt['source']} (weights {mt['sha256'][:12]}), this recipe's teacher "
                f"is {wt['source']} (weights {wt['sha256'][:12]}); {fix}")
    mk, wk = made["tokenizer"], want["tokenizer"]
    if mk["sha256"] != wk["sha256"]:
        return (f"cache {cdir}: made with tokenizer {mk['name']} ({mk['vocab_size']} tokens, vocab "
                f"{mk['sha256'][:12]}), this recipe's tokenizer is {wk['name']} ({wk['vocab_size']} tokens, vocab "
                f"{wk['sha256'][:12]}); {fix}")
    md, wd = made["data"], want["data"]
    if md["sha256"] != wd["sha256"]:
        return (f"cache {cdir}: made for data {md['source']} ({md['examples']} examples, seq_len {md['seq_len']}, "
                f"{md['rows']} target tokens), this recipe's data is {wd['source']} ({wd['examples']} examples, "
                f"seq_len {wd['seq_len']}, {wd['rows']} target tokens); {fix}")
    if made["k"] != want["k"]:
        return f"cache {cdir}: made with k={made['k']}, this recipe asks cache.k={want['k']}; {fix}"
    if made["temperature"] != want["temperature"]:
        return (f"cache {cdir}: made at temperature {made['temperature']:g}, this recipe's cache.temperature is "
                f"{want['temperature']:g}; {fix}")
    return None


# ----------------------------------------------------------------------------------------------
# Writing


_write_atomic = write_atomic  # (distil/atomic.py)


def _write_manifest(cdir: Path, manifest: dict, point: str = "") -> None:
    _write_atomic(cdir / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode(), point)


def read_manifest(cdir: Path) -> dict | None:
    path = cdir / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not all(key in manifest for key in ("shards", "teacher", "data", "k")):
        raise DistilError(f"{path}: not a readable teacher-cache manifest; delete the cache directory")
    problem = _manifest_problem(manifest)
    if problem:
        raise DistilError(f"{path}: {problem}; delete the cache directory to rebuild it")
    return manifest


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


def _manifest_problem(m: dict) -> str | None:
    """What is wrong with the structure of a manifest that parsed as JSON (None: nothing). Shard file names are
    plain names inside the cache directory: a manifest cannot make distil read or overwrite files elsewhere."""
    for key, strings, counts in (("teacher", ("source", "sha256"), ()),
                                 ("tokenizer", ("name", "sha256"), ("vocab_size",)),
                                 ("data", ("source", "sha256"), ("examples", "rows"))):
        sec = m.get(key)
        if not isinstance(sec, dict):
            return f"{key}: expected an object, found {str(sec)[:40]}"
        for name in strings:
            if not isinstance(sec.get(name), str):
                return f"{key}.{name}: expected a string, found {str(sec.get(name))[:40]}"
        for name in counts:
            if not _is_int(sec.get(name)):
                return f"{key}.{name}: expected a non-negative integer, found {str(sec.get(name))[:40]}"
    if not _is_int(m.get("k")) or not m["k"]:
        return f"k: expected a positive integer, found {str(m.get('k'))[:40]}"
    if isinstance(m.get("temperature"), bool) or not isinstance(m.get("temperature"), (int, float)):
        return f"temperature: expected a number, found {str(m.get('temperature'))[:40]}"
    if m.get("ids_dtype") not in ("uint16", "int32"):
        return f"ids_dtype: expected 'uint16' or 'int32', found {str(m.get('ids_dtype'))[:40]}"
    if not _is_int(m.get("shard_tokens")) or not m["shard_tokens"]:
        return f"shard_tokens: expected a positive integer, found {str(m.get('shard_tokens'))[:40]}"
    if not isinstance(m["shards"], list):
        return f"shards: expected a list, found {str(m['shards'])[:40]}"
    for i, s in enumerate(m["shards"]):
        if not isinstance(s, dict) or not isinstance(s.get("file"), str) or not _SHARD_NAME.fullmatch(s["file"]) \
                or not all(_is_int(s.get(f)) for f in ("first_example", "n_examples", "rows", "bytes")) \
                or not isinstance(s.get("sha256"), str):
            return (f"shards[{i}]: expected {{file: shard-NNNNN.safetensors, first_example, n_examples, rows, bytes, "
                    f"sha256}}, found {str(s)[:60]}")
    return None


def plan_shards(rows: list[int], shard_tokens: int) -> list[tuple[int, int, int]]:
    """(first example, number of examples, rows) per shard: whole examples, about shard_tokens rows each."""
    plan, first, acc = [], 0, 0
    for i, r in enumerate(rows):
        acc += r
        if acc >= shard_tokens:
            plan.append((first, i + 1 - first, acc))
            first, acc = i + 1, 0
    if first < len(rows):
        plan.append((first, len(rows) - first, acc))
    return plan


@torch.no_grad()
def _teacher_topk(model: Any, examples: list[dict], vocab: int, k: int, temperature: float, batch_size: int,
                  pad_id: int, device: Any, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids, log-probs and tail log-mass of the teacher at every target row of `examples`, in order."""
    from distil.data import collate

    ids_out, lp_out, tail_out = [], [], []
    for b in range(0, len(examples), batch_size):
        batch = {k_: v.to(device) for k_, v in collate(examples[b: b + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        valid = batch["labels"][:, 1:] != -100
        rows = logits[:, :-1, :vocab][valid]  # [n, V], row-major: example, then position
        del logits
        for c in range(0, rows.shape[0], chunk):
            z = rows[c: c + chunk].float()
            z = z / temperature if temperature != 1 else z  # rows is a copy: scattering into it is harmless
            lse = torch.logsumexp(z, dim=-1, keepdim=True)
            top, idx = torch.topk(z, k, dim=-1, sorted=True)
            z.scatter_(1, idx, float("-inf"))
            tail = torch.logsumexp(z, dim=-1) - lse.squeeze(1)
            ids_out.append(idx.cpu())
            lp_out.append((top - lse).cpu())
            tail_out.append(tail.cpu())
    if not ids_out:
        return torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k), torch.zeros(0)
    return torch.cat(ids_out), torch.cat(lp_out), torch.cat(tail_out)


def build(cdir: Path, examples: list[dict], teacher_model: Any, *, identity: dict, shard_tokens: int,
          batch_size: int, pad_id: int, device: Any = "cpu", echo: Callable = print,
          on_shard: Callable[[int], None] | None = None) -> dict:
    """Write (or continue) the cache in `cdir`; returns the complete manifest. `on_shard(i)` runs after shard i."""
    from safetensors.numpy import save

    cdir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cdir)
    vocab, k, temperature = identity["tokenizer"]["vocab_size"], identity["k"], identity["temperature"]
    if manifest is None:
        manifest = {**identity, "ids_dtype": "uint16" if vocab <= 65536 else "int32", "logprobs_dtype": "float16",
                    "shard_tokens": shard_tokens, "complete": False, "shards": []}
        _write_manifest(cdir, manifest, "cache:manifest-new")
    plan = plan_shards(rows_per_example(examples), manifest["shard_tokens"])
    done = manifest["shards"]
    for i, s in enumerate(done):
        if i >= len(plan) or (s["first_example"], s["n_examples"], s["rows"]) != plan[i]:
            raise DistilError(f"cache {cdir}: shard {s['file']} does not match this data's shard plan; "
                              f"delete the cache")
        _check_shard(cdir, s)
    for stale in cdir.glob(".tmp-*"):
        stale.unlink()  # a shard or manifest half-written by an interrupted run
    if len(done) < len(plan):
        echo(f"cache {cdir}: {'continuing after shard ' + str(len(done)) if done else 'writing'} "
             f"{len(plan) - len(done)} of {len(plan)} shards ({identity['data']['rows']} target tokens, k={k})")
    np_ids = np.uint16 if manifest["ids_dtype"] == "uint16" else np.int32
    was_training = teacher_model.training if teacher_model is not None else False
    if teacher_model is not None:
        teacher_model.eval()
    for i in range(len(done), len(plan)):
        first, n_ex, n_rows = plan[i]
        t0 = time.perf_counter()
        exs = examples[first: first + n_ex]
        ids, lp, tail = _teacher_topk(teacher_model, exs, vocab, k, temperature, batch_size, pad_id, device)
        offsets = np.concatenate([[0], np.cumsum(rows_per_example(exs))]).astype(np.int64)
        if ids.shape[0] != n_rows or offsets[-1] != n_rows:
            raise RuntimeError(f"cache shard {i}: {ids.shape[0]} rows computed, {n_rows} planned")  # a bug
        data = save({"ids": ids.numpy().astype(np_ids), "logprobs": lp.numpy().astype(np.float16),
                     "tail": tail.numpy().astype(np.float32), "offsets": offsets},
                    # one metadata key: safetensors does not keep the order of several (bytes must be reproducible)
                    metadata={"distil": json.dumps({"format": FORMAT, "version": VERSION, "first_example": first,
                                                    "n_examples": n_ex})})
        name = f"shard-{i:05d}.safetensors"
        _write_atomic(cdir / name, data, f"cache:shard-{i}")
        done.append({"file": name, "first_example": first, "n_examples": n_ex, "rows": n_rows, "bytes": len(data),
                     "sha256": hashlib.sha256(data).hexdigest()})
        manifest["complete"] = len(done) == len(plan)
        _write_manifest(cdir, manifest, f"cache:manifest-{i}")
        echo(f"cache: shard {i + 1}/{len(plan)}: {n_rows} tokens in {time.perf_counter() - t0:.1f}s")
        if on_shard is not None:
            on_shard(i)
    if not manifest["complete"]:  # e.g. no rows at all: nothing to write, but the cache is complete
        manifest["complete"] = True
        _write_manifest(cdir, manifest)
    if teacher_model is not None:
        teacher_model.train(was_training)
    return manifest


def _check_shard(cdir: Path, s: dict, full: bool = False) -> None:
    path = cdir / s["file"]
    if not path.is_file() or path.stat().st_size != s["bytes"]:
        found = f"{path.stat().st_size} bytes" if path.is_file() else "no file"
        raise DistilError(f"cache {cdir}: shard {s['file']} is missing or truncated (manifest: {s['bytes']} bytes, "
                          f"found {found}); delete the cache directory to rebuild it")
    if full and hashlib.sha256(path.read_bytes()).hexdigest() != s["sha256"]:
        raise DistilError(f"cache {cdir}: shard {s['file']} does not match its sha256 in the manifest (corrupted); "
                          f"delete the cache directory to rebuild it")


# ----------------------------------------------------------------------------------------------
# Reading


def _open_shard(cdir: Path, s: dict, manifest: dict) -> tuple[Any, np.ndarray]:
    """Open a listed shard for reading, after checking its header against the manifest (the size is checked by
    `_check_shard`, the sha256 only by `distil cache`: a header damaged in place must still be refused with one
    line, not crash safetensors or feed wrong rows). Returns the open file and its example offsets."""
    from safetensors import safe_open

    from distil.export.tensors import check_safetensors

    path = cdir / s["file"]
    fix = "delete the cache directory to rebuild it"
    try:
        header, _ = check_safetensors(path)
    except DistilError as exc:
        raise DistilError(f"{exc}; {fix}") from None
    rows, k, n_ex = s["rows"], manifest["k"], s["n_examples"]
    want = {"ids": ("U16" if manifest["ids_dtype"] == "uint16" else "I32", [rows, k]),
            "logprobs": ("F16", [rows, k]), "tail": ("F32", [rows]), "offsets": ("I64", [n_ex + 1])}
    found = {name: (e["dtype"], e["shape"]) for name, e in header.items() if name != "__metadata__"}
    for name, (dtype, shape) in want.items():
        if found.get(name) != (dtype, shape):
            got = "no such tensor" if name not in found else f"{found[name][0]} {found[name][1]}"
            raise DistilError(f"{path}: {name}: expected {dtype} {shape} (manifest), found {got}; {fix}")
    if set(found) != set(want):
        raise DistilError(f"{path}: expected the tensors {sorted(want)}, found {sorted(found)}; {fix}")
    meta = header.get("__metadata__")
    try:
        info = json.loads(meta["distil"]) if isinstance(meta, dict) and isinstance(meta.get("distil"), str) else None
    except ValueError:
        info = None
    if not isinstance(info, dict) or (info.get("first_example"), info.get("n_examples")) != \
            (s["first_example"], n_ex):
        raise DistilError(f"{path}: __metadata__.distil: expected first_example={s['first_example']}, "
                          f"n_examples={n_ex} (manifest), found {str(meta)[:80]}; {fix}")
    if s["first_example"] + n_ex > manifest["data"]["examples"]:
        raise DistilError(f"{cdir / MANIFEST}: {s['file']}: examples {s['first_example']}..{s['first_example'] + n_ex}"
                          f" are past the {manifest['data']['examples']} cached examples; {fix}")
    try:
        f = safe_open(str(path), framework="numpy")
        offsets = f.get_tensor("offsets")
    except Exception as exc:  # safetensors' own checks (alignment, overlaps)
        raise DistilError(f"{path}: unreadable shard ({type(exc).__name__}: {str(exc)[:100]}); {fix}") from None
    if offsets[0] != 0 or offsets[-1] != rows or (np.diff(offsets) < 0).any():
        raise DistilError(f"{path}: offsets: expected 0 .. {rows} in increasing order, found "
                          f"{offsets[:3].tolist()} .. {int(offsets[-1])}; {fix}")
    return f, offsets


class TeacherCache:
    """A complete cache opened for training: `rows(example indices)` -> (ids, logprobs, tail) of those examples.

    `tail_mode` and `temperature` tell the sparse loss how to use the rows.
    """

    def __init__(self, cdir: str | Path, *, tail_mode: str = "tail_term", expect: dict | None = None,
                 verify: bool = False):
        self.dir = Path(cdir)
        manifest = read_manifest(self.dir)
        if manifest is None:
            raise DistilError(f"cache {self.dir}: no manifest.json; build it with `distil cache RECIPE`")
        if expect is not None:
            problem = _mismatch(self.dir, manifest, expect)
            if problem:
                raise DistilError(problem)
        if not manifest.get("complete"):
            raise DistilError(f"cache {self.dir}: incomplete ({len(manifest['shards'])} shards written); "
                              f"rerun `distil cache RECIPE` to finish it")
        self.manifest, self.tail_mode = manifest, tail_mode
        self.k, self.temperature = manifest["k"], float(manifest["temperature"])
        self.vocab_size = manifest["tokenizer"]["vocab_size"]
        n_ex = manifest["data"]["examples"]
        self._shard = np.full(n_ex, -1, dtype=np.int64)
        self._start = np.zeros(n_ex, dtype=np.int64)
        self._end = np.zeros(n_ex, dtype=np.int64)
        self._files = []
        for j, s in enumerate(manifest["shards"]):
            _check_shard(self.dir, s, full=verify)
            f, offsets = _open_shard(self.dir, s, manifest)
            sl = slice(s["first_example"], s["first_example"] + s["n_examples"])
            self._shard[sl], self._start[sl], self._end[sl] = j, offsets[:-1], offsets[1:]
            self._files.append(f)
        if (self._shard < 0).any():
            raise DistilError(f"cache {self.dir}: the manifest's shards do not cover all {n_ex} examples; "
                              f"delete the cache directory to rebuild it")

    @property
    def rows_total(self) -> int:
        return int(self.manifest["data"]["rows"])

    def bytes_on_disk(self) -> int:
        return sum(s["bytes"] for s in self.manifest["shards"]) + (self.dir / MANIFEST).stat().st_size

    def rows(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Cache rows of these training examples, concatenated in order: ids int64 [n, k], logprobs fp16 [n, k],
        tail fp32 [n]."""
        ids, lp, tail = [], [], []
        for i in indices:
            if not 0 <= i < len(self._shard):
                raise DistilError(f"cache {self.dir}: example index {i} is outside the cached data "
                                  f"({len(self._shard)} examples)")
            f, a, b = self._files[self._shard[i]], int(self._start[i]), int(self._end[i])
            ids.append(f.get_slice("ids")[a:b])
            lp.append(f.get_slice("logprobs")[a:b])
            tail.append(f.get_slice("tail")[a:b])
        return (torch.from_numpy(np.concatenate(ids).astype(np.int64)), torch.from_numpy(np.concatenate(lp)),
                torch.from_numpy(np.concatenate(tail)))


@dataclass
class CacheInfo:
    dir: Path
    rows: int
    shards: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.rows, 1)


def info(cache: TeacherCache) -> CacheInfo:
    return CacheInfo(cache.dir, cache.rows_total, len(cache.manifest["shards"]), cache.bytes_on_disk())
