"""The llama.cpp backend (llama-cpp-python, the `[llamacpp]` extra): GGUF models on the CPU, one sample
at a time (llama-cpp-python has no batched multi-sequence API), the same engine Ollama uses.

HF model directories are exported once to an F16 or Q8_0 GGUF in distil's cache (keyed by a digest of
the weights, so a retrained model is exported again); the embedded teacher runs its packaged GGUF.
Each sample starts from an empty KV cache: reusing the cached prompt of the previous sample would be
faster, but a resumed run (which skips samples) would then evaluate some prompts differently.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from distil.errors import DistilError
from distil.generation.params import GenParams
from distil.generation.prompts import Prompt, as_messages, is_ids

INSTALL = ("llama-cpp-python is not installed: pip install 'distil[llamacpp]' (or the prebuilt wheel: "
           "pip install --find-links ../shared/wheels llama-cpp-python==0.3.36)")


def available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def require() -> Any:
    if not available():
        raise DistilError(INSTALL)
    import llama_cpp

    return llama_cpp


def file_digest(path: Path) -> str:
    from distil.methods.cache_store import _file_digest  # whole file up to 2 GiB, sampled blocks above

    return _file_digest(Path(path))


def gguf_for_dir(model_dir: Path, quant: str = "F16") -> Path:
    """The cached GGUF export of an HF directory (made on first use, through distil's own exporter)."""
    from distil.export import export_gguf
    from distil.models import cache_dir

    if quant not in ("F16", "Q8_0"):
        raise DistilError(f"generate: --gguf-quant: expected F16 or Q8_0, found {quant!r}")
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]:
        if f.is_file():
            h.update(file_digest(f).encode())
    target = cache_dir() / "gguf" / f"{model_dir.name}-{h.hexdigest()[:16]}-{quant}.gguf"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        export_gguf(model_dir, target, quant, modelfile=False)  # atomic: never a partial file under this name
    return target


class LlamaCppModel:
    """A GGUF file in llama.cpp. The context is (re)made as large as the longest request needs."""

    def __init__(self, path: str | Path, n_threads: int | None = None, n_ctx: int = 512):
        self.path = Path(path)
        if not self.path.is_file():
            raise DistilError(f"{self.path}: GGUF file not found")
        from distil.models import check_gguf

        check_gguf(self.path)
        # llama-cpp-python's own default is half the CPUs (1 of 2 here: half the speed); torch's thread count is
        # what the run asked for (train.threads / --threads) or the machine's cores
        import torch

        self.n_threads = n_threads or torch.get_num_threads()
        self.llm = None
        self._load(n_ctx)

    def _load(self, n_ctx: int) -> None:
        llama_cpp = require()
        self.close()  # free the old context first
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=n_ctx, n_batch=min(n_ctx, 512),
                                       n_threads=self.n_threads, seed=0, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise DistilError(f"{self.path}: llama.cpp could not load this GGUF ({exc})") from None

    def ensure_context(self, tokens: int) -> None:
        train = self.llm._model.n_ctx_train()
        if tokens > train > 0:
            raise DistilError(f"{self.path}: a prompt + max_new_tokens needs {tokens} tokens, the model's "
                              f"context is {train}")
        if tokens > self.llm.n_ctx():
            self._load(min(train, -(-tokens // 256) * 256) if train > 0 else -(-tokens // 256) * 256)

    def close(self) -> None:
        """Free the model now: left to the garbage collector at interpreter exit, llama-cpp-python 0.3.36 prints
        a traceback (its free function is already gone)."""
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    def name(self) -> str:
        return str(self.path)

    def fingerprint(self) -> str:
        return file_digest(self.path)


def render(model: LlamaCppModel, tokenizer: Any, prompt: Prompt, chat: bool) -> list[int]:
    """Prompt ids. With an HF tokenizer (an exported HF directory), exactly the hf backend's ids; for a
    bare GGUF, the chat template stored in the file, rendered the way transformers renders it. Token ids (a
    pre-rendered prompt) are used as they are."""
    if is_ids(prompt):
        return list(prompt)
    if tokenizer is not None:
        from distil.generation.hf import render as hf_render

        return hf_render(tokenizer, prompt, chat)
    llm = model.llm
    if chat:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        def text(tok: int) -> str:
            return llm._model.token_get_text(tok) if tok >= 0 else ""

        formatter = Jinja2ChatFormatter(chat_template(model), eos_token=text(llm.token_eos()),
                                        bos_token=text(llm.token_bos()), add_generation_prompt=True)
        rendered = formatter(messages=as_messages(prompt)).prompt
        return llm.tokenize(rendered.encode("utf-8"), add_bos=False, special=True)
    if not isinstance(prompt, str):
        raise DistilError("generate: a messages prompt needs a chat template (chat is off, or the GGUF has none)")
    return llm.tokenize(prompt.encode("utf-8"), add_bos=llm._model.add_bos_token(), special=True)


def chat_template(model: LlamaCppModel) -> str | None:
    return model.llm.metadata.get("tokenizer.chat_template")


def generate_one(model: LlamaCppModel, ids: list[int], params: GenParams, seed: int) -> tuple[str, str, int]:
    """(completion, finish reason, completion tokens) of one sample."""
    model.ensure_context(len(ids) + params.max_new_tokens)
    llm = model.llm
    llm.reset()  # no KV-cache reuse across samples (see the module docstring)
    # every llama.cpp default that would change the distribution is set to "off" explicitly
    out = llm.create_completion(prompt=list(ids), max_tokens=params.max_new_tokens, temperature=params.temperature,
                                top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, typical_p=1.0,
                                repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0,
                                stop=list(params.stop), seed=seed)
    choice = out["choices"][0]
    return choice["text"], choice["finish_reason"] or "length", int(out["usage"]["completion_tokens"])
