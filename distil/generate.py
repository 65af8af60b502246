"""Generation backends (the implementation lives in the `distil.generation` package).

`hf`: transformers, batched with the KV cache; `llamacpp`: a GGUF file on the CPU through
llama-cpp-python (an optional extra: `pip install distil[llamacpp]`), the same engine Ollama uses.
`llamacpp_chat` is the export stage's one-shot answer to `export.prompt`.
"""

from __future__ import annotations

from pathlib import Path

from distil.generation import GenerationResult, GenParams, LlamaCppModel, generate, read_prompts, sample_seed
from distil.generation.llamacpp import available as llamacpp_available

__all__ = ["GenParams", "GenerationResult", "LlamaCppModel", "generate", "read_prompts", "sample_seed",
           "llamacpp_available", "llamacpp_chat"]


def llamacpp_chat(gguf: str | Path, prompt: str, max_tokens: int = 32, n_ctx: int = 512) -> str:
    """Greedy answer of the GGUF model to one user message, with the chat template stored in the file."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False, seed=0)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                     temperature=0.0)
    return out["choices"][0]["message"]["content"] or ""
