"""Generation: the teacher writes the text that SeqKD, synthetic-data, CoT and on-policy methods train on.

    from distil.generation import GenParams, generate
    result = generate(model, tokenizer, ["What is a list?"], GenParams(temperature=0.7, n=4), out="a.jsonl")

Backends: `hf` (transformers `model.generate`, batched, KV cache, left padding) and `llamacpp`
(`LlamaCppModel`: a GGUF in llama-cpp-python). Files: params.py (sampling parameters, per-sample
seeds), prompts.py (prompt files), store.py (resumable JSONL output), hf.py, llamacpp.py, core.py
(`generate`), sources.py (`distil generate`: model sources and recipes).
"""

from distil.generation.core import GenerationResult, generate
from distil.generation.llamacpp import LlamaCppModel
from distil.generation.params import GenParams, sample_seed
from distil.generation.prompts import PromptFile, read_prompts

__all__ = ["GenParams", "GenerationResult", "LlamaCppModel", "PromptFile", "generate", "read_prompts", "sample_seed"]
