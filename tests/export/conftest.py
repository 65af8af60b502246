"""Fixtures for the exporter: tiny random llama / mistral / qwen2 models with real tokenizers.

Tokenizers are trained deterministically (single thread, fixed corpus: the stdlib's pydoc
topics) with the ``tokenizers`` / ``sentencepiece`` trainers, once per session. Model weights are
rounded to float16 so that an F16 export holds exactly the source values, which lets llama.cpp's
quantizer (fed the F16 file) and distil's (fed the source directory) see the same numbers.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_export import (SMOLLM2, build_model, make_bpe_tokenizer, make_gemma_tokenizer, make_spm_tokenizer,
                            require)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """kind -> a directory holding only tokenizer files (built once per session)."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            d = tmp_path_factory.mktemp(f"tok-{kind}")
            if kind in ("gpt2", "smollm", "qwen2"):
                make_bpe_tokenizer(kind, d)
            elif kind in ("spm", "spm-json"):
                make_spm_tokenizer(d, keep_model=kind == "spm")
            elif kind == "gemma":
                make_gemma_tokenizer(d)
            elif kind == "chars":
                from distil.testing import char_tokenizer

                char_tokenizer().save_pretrained(d)
            made[kind] = d
        return made[kind]

    return get


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer_dir):
    """Factory of cached tiny model directories: model_dir(arch=..., tied=..., tok=..., ...)."""
    made: dict[tuple, Path] = {}

    def get(arch: str = "llama", tied: bool = True, tok: str = "gpt2", **kw) -> Path:
        key = (arch, tied, tok, json.dumps(kw, sort_keys=True))  # values may be lists / dicts
        if key not in made:
            d = tmp_path_factory.mktemp(f"{arch}-{'tied' if tied else 'untied'}-{tok}")
            made[key] = build_model(d, tokenizer_dir(tok), arch, tied, **kw)
        return made[key]

    return get


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as a safetensors directory (cached by distil.models)."""
    require(*SMOLLM2)  # skips locally when missing; fails in CI (CI=true)
    from distil.models import embedded_path

    return embedded_path("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def pruned_smollm2(smollm2_dir, tmp_path_factory):
    """SmolLM2 with layers [0, 10, 20, 29] kept, weights in float16: the 'pruned student'."""
    from safetensors.numpy import save_file

    from distil.export.tensors import SafeTensors

    keep = [0, 10, 20, 29]
    out = tmp_path_factory.mktemp("smollm2-pruned")
    st, tensors = SafeTensors(smollm2_dir), {}
    for name in st.entries:
        parts = name.split(".")
        if name.startswith("model.layers."):
            if int(parts[2]) not in keep:
                continue
            parts[2] = str(keep.index(int(parts[2])))
        tensors[".".join(parts)] = st.read(name).astype(np.float16)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    cfg.update(num_hidden_layers=len(keep), dtype="float16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in smollm2_dir.iterdir():
        if f.is_file() and f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, out / f.name)
    return out
