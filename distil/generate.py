"""Generation backends (the implementation lives in the `distil.generation` package).

`hf`: transformers, batched with the KV cache; `llamacpp`: a GGUF file on the CPU through
llama-cpp-python (an optional extra: `pip install distil[llamacpp]`), the same engine Ollama uses.
`llamacpp_answer` is the export stage's one-shot answer to `export.prompt`, with llama.cpp's own timings (tokens/s of
the prompt and of the generation); `export_prompt_block` prints it for the exported student and, when the teacher is
itself a GGUF (`embedded:` or a .gguf file), for the teacher beside it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from distil.generation import GenerationResult, GenParams, LlamaCppModel, generate, read_prompts, sample_seed
from distil.generation.llamacpp import available as llamacpp_available

__all__ = ["GenParams", "GenerationResult", "LlamaCppModel", "generate", "read_prompts", "sample_seed",
           "llamacpp_available", "llamacpp_chat", "llamacpp_answer", "llamacpp_decode_speed", "LlamaCppAnswer",
           "export_prompt_block", "teacher_gguf"]


@dataclass
class LlamaCppAnswer:
    """One greedy chat answer and llama.cpp's timings of it (its own perf counters of the fresh context)."""

    text: str
    prompt_tokens: int
    tokens: int  # generated
    prompt_ms: float  # prompt processing
    decode_ms: float  # generation after the prompt (n_eval tokens)
    decoded: int  # tokens llama.cpp timed in decode_ms
    wall_s: float  # the whole call, load excluded
    threads: int

    @property
    def tokens_per_s(self) -> float | None:
        """Generation speed: tokens decoded per second of decoding (the prompt excluded)."""
        return 1000.0 * self.decoded / self.decode_ms if self.decode_ms > 0 and self.decoded else None

    @property
    def prompt_tokens_per_s(self) -> float | None:
        return 1000.0 * self.prompt_tokens / self.prompt_ms if self.prompt_ms > 0 and self.prompt_tokens else None

    def speed(self) -> str:
        tps, pps = self.tokens_per_s, self.prompt_tokens_per_s
        return (f"{self.tokens} tokens, {tps:.1f} tokens/s generating" if tps else f"{self.tokens} tokens") + \
            (f", {pps:.0f} tokens/s on the {self.prompt_tokens}-token prompt" if pps else "") + \
            f"; {self.threads} thread{'s' if self.threads != 1 else ''}"


def llamacpp_answer(gguf: str | Path, prompt: str, max_tokens: int = 32, n_ctx: int = 512,
                    n_threads: int | None = None) -> LlamaCppAnswer:
    """Greedy answer of the GGUF model to one user message, with the chat template stored in the file, timed by
    llama.cpp (a fresh context, so its counters hold this call only)."""
    import llama_cpp
    import torch

    threads = n_threads or torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False, seed=0, n_threads=threads,
                          n_threads_batch=threads)
    try:
        t0 = time.perf_counter()
        out = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                         temperature=0.0)
        wall = time.perf_counter() - t0
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        usage = out.get("usage") or {}
        return LlamaCppAnswer(text=out["choices"][0]["message"]["content"] or "",
                              prompt_tokens=int(usage.get("prompt_tokens", perf.n_p_eval)),
                              tokens=int(usage.get("completion_tokens", perf.n_eval)),
                              prompt_ms=float(perf.t_p_eval_ms), decode_ms=float(perf.t_eval_ms),
                              decoded=int(perf.n_eval), wall_s=wall, threads=threads)
    finally:
        llm.close()


def llamacpp_decode_speed(gguf: str | Path, prompt: str, tokens: int, n_ctx: int = 512,
                          n_threads: int | None = None) -> float | None:
    """llama.cpp's generation speed on the GGUF: `tokens` greedy tokens after `prompt` (as plain text), the end of
    turn ignored (a model that answers in one token would time nothing), in tokens per second of llama.cpp's own
    decode counter (prompt processing excluded). The same number of tokens for every model compared."""
    import llama_cpp
    import torch

    threads = n_threads or torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, verbose=False, seed=0, n_threads=threads,
                          n_threads_batch=threads)
    try:
        ids = llm.tokenize(prompt.encode("utf-8"))
        llama_cpp.llama_perf_context_reset(llm._ctx.ctx)
        for n, _ in enumerate(llm.generate(ids, temp=0.0), start=1):
            if n >= tokens:
                break
        perf = llama_cpp.llama_perf_context(llm._ctx.ctx)
        return 1000.0 * perf.n_eval / perf.t_eval_ms if perf.t_eval_ms > 0 and perf.n_eval else None
    finally:
        llm.close()


def llamacpp_chat(gguf: str | Path, prompt: str, max_tokens: int = 32, n_ctx: int = 512) -> str:
    """Greedy answer of the GGUF model to one user message (`llamacpp_answer` without the timings)."""
    return llamacpp_answer(gguf, prompt, max_tokens, n_ctx).text


def teacher_gguf(source: str | None) -> Path | None:
    """The GGUF file a teacher source is (an `embedded:` model or a .gguf path), else None."""
    if not source:
        return None
    if source.startswith("embedded:"):
        from distil.embedded import gguf_path

        return gguf_path(source.split(":", 1)[1])
    return Path(source) if source.endswith(".gguf") and Path(source).is_file() else None


def export_prompt_block(student_gguf: str | Path, quant: str, prompt: str, max_tokens: int,
                        teacher_source: str | None = None, n_threads: int | None = None) -> tuple[str, dict]:
    """The export stage's answer to `export.prompt`: the exported student's in llama.cpp, with its tokens/s and
    file size, and the teacher's beside it when the teacher is itself a GGUF (same prompt, tokens, threads).
    Returns (the text printed, the numbers as a dict for export.json)."""
    rows: list[tuple[str, Path, LlamaCppAnswer]] = [
        (f"{quant} student", Path(student_gguf), llamacpp_answer(student_gguf, prompt, max_tokens,
                                                                 n_threads=n_threads))]
    teacher = teacher_gguf(teacher_source)
    if teacher is not None:
        rows.append((f"teacher ({teacher.name})", teacher, llamacpp_answer(teacher, prompt, max_tokens,
                                                                          n_threads=n_threads)))
    lines, record = [f"llama.cpp> {prompt}"], {"prompt": prompt, "answers": {}}
    speeds = []
    for label, path, a in rows:
        size = path.stat().st_size
        # generation speed over max_tokens tokens for every row, whatever length its answer had
        tps = llamacpp_decode_speed(path, prompt, max_tokens, n_threads=n_threads)
        speeds.append(tps)
        text = a.text.strip() or "(an empty answer: the model ended its turn at once)"
        lines.append(f"[{label}, {size / 1e6:.1f} MB] {text}\n  ("
                     + (f"{tps:.1f} tokens/s generating {max_tokens} tokens; " if tps else "")
                     + f"answer: {a.speed()})")
        record["answers"][label] = {"file": str(path), "bytes": size, "text": a.text, "tokens": a.tokens,
                                    "tokens_per_s": tps, "answer_tokens_per_s": a.tokens_per_s,
                                    "prompt_tokens": a.prompt_tokens, "prompt_tokens_per_s": a.prompt_tokens_per_s,
                                    "threads": a.threads}
    if teacher is not None and speeds[0] and speeds[1]:
        ratio = speeds[0] / speeds[1]
        lines.append(f"  student / teacher generation speed: {ratio:.2f}x, file size "
                     f"{rows[0][1].stat().st_size / rows[1][1].stat().st_size:.2f}x (one run each on a shared "
                     f"machine)")
        record["speedup"] = ratio
    return "\n".join(lines), record
