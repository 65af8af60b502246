"""Generation backends. `llamacpp`: run a GGUF file on the CPU through llama-cpp-python (an
optional extra: `pip install distil[llamacpp]`), the same engine Ollama uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def llamacpp_chat(gguf: str | Path, prompt: str, max_tokens: int = 32, n_ctx: int = 512) -> str:
    """Greedy answer of the GGUF model to one user message, with the chat template stored in the file."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False, seed=0)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                     temperature=0.0)
    return out["choices"][0]["message"]["content"] or ""
