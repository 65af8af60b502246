"""`distil generate MODEL_OR_RECIPE --prompts FILE --out FILE.jsonl`: resolve the model for a backend, read
the prompts, generate. A recipe means its teacher (the model whose outputs become training data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.generation import llamacpp
from distil.generation.core import GenerationResult, generate
from distil.generation.params import GenParams
from distil.generation.prompts import read_prompts


def _model_spec(target: str, overrides: list[str]) -> dict:
    """{source, tokenizer, dtype, trust_remote_code} of a model source, or of a recipe's teacher."""
    from distil.cli import bundled_recipes, find_recipe

    is_recipe = target.endswith((".yaml", ".yml")) or (not Path(target).exists() and target in bundled_recipes())
    if not is_recipe:
        if overrides:
            raise DistilError(f"generate: key=value overrides ({overrides[0]}) need a recipe, found model {target!r}")
        return {"source": target, "tokenizer": None, "dtype": "auto", "trust_remote_code": False}
    from distil.recipe import load_recipe

    spec = load_recipe(find_recipe(target), overrides).teacher
    if not spec.source:
        raise DistilError(f"{target}: teacher.source: expected the model to generate with, found nothing")
    return {"source": spec.source, "tokenizer": spec.tokenizer, "dtype": spec.dtype,
            "trust_remote_code": spec.trust_remote_code}


def _embedded_gguf(name: str) -> Path:
    """The GGUF file of an embedded model: the package's own file, or the verified assembly of a split one
    (distil/embedded.py: one line naming the package to (re)install when something is missing)."""
    from distil.embedded import gguf_path

    return gguf_path(name)


def load_for_backend(spec: dict, backend: str, gguf_quant: str = "F16", threads: int | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) for `generate`."""
    from distil.models import check_model_dir, load_model, load_tokenizer

    source, tok_dir = spec["source"], spec["tokenizer"]
    if backend == "hf":
        loaded = load_model(source, dtype=spec["dtype"], tokenizer=tok_dir,
                            trust_remote_code=spec["trust_remote_code"], role="teacher")
        return loaded.model, loaded.tokenizer
    llamacpp.require()  # one line telling how to install it, before any export or load
    tokenizer = load_tokenizer(tok_dir) if tok_dir else None
    if source.endswith(".gguf"):
        path = Path(source)
    elif source.startswith("embedded:"):
        path = _embedded_gguf(source.split(":", 1)[1])
    elif source.startswith("config:"):
        raise DistilError(f"{source}: the llamacpp backend needs trained weights (a GGUF or an HF directory), "
                          f"found a random init from a config")
    else:
        model_dir = Path(source)
        check_model_dir(model_dir)
        path = llamacpp.gguf_for_dir(model_dir, gguf_quant)
        tokenizer = tokenizer or load_tokenizer(model_dir)  # the hf backend's prompt ids, exactly
    return llamacpp.LlamaCppModel(path, n_threads=threads), tokenizer


def generate_file(target: str, prompts_path: str | Path, out: str | Path, params: GenParams, *,
                  backend: str = "hf", overrides: list[str] | None = None, batch_size: int = 8,
                  gguf_quant: str = "F16", threads: int | None = None, overwrite: bool = False,
                  progress: bool = True) -> tuple[GenerationResult, str]:
    """Everything `distil generate` does; returns the result and the prompts file's skip report ('' if none).
    Cheap checks (parameters, prompts, output path) come before the model is loaded."""
    if backend not in ("hf", "llamacpp"):
        raise DistilError(f"generate: backend: expected hf or llamacpp, found {backend!r}")
    params.check()
    prompts = read_prompts(prompts_path)
    out = Path(out)
    if out.suffix != ".jsonl":
        raise DistilError(f"{out}: --out: expected a .jsonl file path, found suffix {out.suffix or 'none'!r}")
    if not out.parent.is_dir():
        raise DistilError(f"{out}: output directory {out.parent} does not exist")
    spec = _model_spec(str(target), list(overrides or []))
    if threads:
        import torch

        torch.set_num_threads(threads)
    model, tokenizer = load_for_backend(spec, backend, gguf_quant, threads)
    try:
        result = generate(model, tokenizer, prompts.prompts, params, out, batch_size=batch_size,
                          model_name=spec["source"], progress=progress, overwrite=overwrite)
    finally:
        if isinstance(model, llamacpp.LlamaCppModel):
            model.close()
    return result, prompts.report()
