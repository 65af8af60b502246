"""Teacher-logit cache: bytes per token on disk vs k, and the student's KL to the teacher after the same training
from each cache vs from the live teacher (the full distribution).

    .venv/bin/python benchmarks/cache_size_quality.py             # ~8 min on 2 busy cores (1 thread)
    .venv/bin/python benchmarks/cache_size_quality.py --steps 4   # a quick look

Setup (identical for every row):
  teacher  embedded:smollm2-135m-instruct (SmolLM2-135M-Instruct, V = 49,152), fp32
  student  `student_from_teacher(teacher, [0, 15, 29])` (38.9M params), the same initial weights for every row
  data     builtin:pydoc in 128-token blocks; the first steps x batch training blocks (one epoch), same order
  train    distil.trainer.train, forward KL at T = 1, AdamW 5e-4, warmup 2 + cosine, batch 4, fp32, 1 thread
Rows:
  k = 8, 32, 64, 256   method `cache` (tail_term) from a cache built with distil.methods.cache.build at that k
  k = 64 renorm        the k = 64 cache with the top-k renormalised instead of the tail term
  full distribution    method `offline` with `distill.fused: false` (the same loss values as the fused default,
                       from the memoised logits): the teacher's full distribution, i.e. the live teacher. Its
                       size is what storing it would take: V x 4 bytes (fp32) per token; V x 2 in fp16.
The teacher runs once per training example: a memo wrapper keeps its logits, so every cache and the live row see
the very same teacher outputs (and the benchmark fits in its time budget); the caches are written by the real
code path. Bytes/token = all files of the cache directory (shards with headers and offsets + manifest) / target
tokens. KL = mean KL(p_T || p_S) per token over the full vocabulary on 16 held-out blocks (distil.eval.metrics).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TEACHER = "embedded:smollm2-135m-instruct"
LAYERS = [0, 15, 29]


class MemoTeacher(torch.nn.Module):
    """The teacher, run once per distinct example: later calls with the same ids return the stored logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.memo: dict[bytes, torch.Tensor] = {}
        self.forwards = 0

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    @torch.no_grad()
    def forward(self, input_ids, attention_mask):
        keys = [ids[m.bool()].numpy().tobytes() for ids, m in zip(input_ids, attention_mask)]
        todo = [i for i, k in enumerate(keys) if k not in self.memo]
        if todo:
            out = self.model(input_ids=input_ids[todo], attention_mask=attention_mask[todo]).logits
            self.forwards += len(todo)
            for j, i in enumerate(todo):
                self.memo[keys[i]] = out[j, : int(attention_mask[i].sum())].clone()
        logits = torch.zeros(*input_ids.shape, self.memo[keys[0]].shape[-1])
        for i, k in enumerate(keys):
            logits[i, : self.memo[k].shape[0]] = self.memo[k]
        return type("Out", (), {"logits": logits})()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--ks", default="8,32,64,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/cache_size_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from distil.data import load_examples, pad_id
    from distil.eval.metrics import evaluate
    from distil.methods import build_cache, build_offline
    from distil.methods.cache import ensure_cache, info, with_index
    from distil.models import Loaded, count_params, freeze, load_model, student_from_teacher
    from distil.recipe import recipe_from_dict
    from distil.trainer import train

    ks = [int(k) for k in args.ks.split(",")]
    work = Path(tempfile.mkdtemp(prefix="distil-bench-cache-"))
    base = {"name": "bench", "seed": 0, "teacher": {"source": TEACHER},
            "student": {"source": "teacher", "layers": LAYERS},
            "data": {"source": "builtin:pydoc", "seq_len": args.seq_len, "eval_size": 16},
            "distill": {"method": "cache", "loss": "forward_kl", "fused": False},  # the memo hands out logits
            "train": {"steps": args.steps, "batch_size": args.batch_size, "lr": 5e-4, "warmup_steps": 2,
                      "progress": False},
            "output": {"dir": str(work)}}
    recipe = recipe_from_dict(base, "benchmark")
    teacher = load_model(TEACHER)
    freeze(teacher.model)
    tok, vocab = teacher.tokenizer, len(teacher.tokenizer)
    memo = MemoTeacher(teacher.model).eval()
    memo_loaded = Loaded(memo, tok, TEACHER, teacher.path)
    init = student_from_teacher(teacher, LAYERS).model
    train_all, eval_ex = load_examples(recipe.data, tok, recipe.seed)
    train_ex = train_all[: args.steps * args.batch_size]
    pad = pad_id(tok)
    print(f"teacher {count_params(teacher.model) / 1e6:.1f}M, student {count_params(init) / 1e6:.1f}M params; "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens; k in {ks}", flush=True)

    def fresh():
        s = copy.deepcopy(init)
        s.train()
        for q in s.parameters():
            q.requires_grad_(True)
        return s

    rows, students = {}, {}
    for k in ks:
        r = recipe_from_dict({**base, "name": f"k{k}", "cache": {"k": k, "batch_size": args.batch_size}}, "benchmark")
        t0 = time.perf_counter()
        cache = ensure_cache(r, train_ex, tok, teacher=memo_loaded, echo=lambda *a: None)
        build_s = time.perf_counter() - t0
        ci = info(cache)
        modes = ["tail_term", "renorm"] if k == 64 else ["tail_term"]
        for mode in modes:
            name = f"k={k}" + (" renorm" if mode == "renorm" else "")
            print(f"{name}: {ci.bytes_per_token:.1f} bytes/token; training ...", flush=True)
            cache.tail_mode = mode
            students[name] = fresh()
            t0 = time.perf_counter()
            res = train(students[name], build_cache(cache, r.distill, vocab), with_index(train_ex), r.train,
                        run_dir=work / name.replace(" ", "_").replace("=", ""), seed=r.seed, pad_id=pad)
            rows[name] = {"k": k, "tail": mode, "bytes_per_token": round(ci.bytes_per_token, 1),
                          "bytes": ci.bytes, "tokens": ci.rows, "shards": ci.shards, "build_s": round(build_s, 1),
                          "train_s": round(time.perf_counter() - t0, 1), "final_loss": round(res.last_loss, 4)}

    print("full distribution (live teacher) ...", flush=True)
    students["full distribution"] = fresh()
    t0 = time.perf_counter()
    res = train(students["full distribution"], build_offline(memo, recipe.distill, vocab), train_ex,
                recipe.train, run_dir=work / "live", seed=recipe.seed, pad_id=pad)
    rows["full distribution"] = {"k": vocab, "tail": "-", "bytes_per_token": vocab * 4.0,
                                 "bytes_per_token_fp16": vocab * 2.0, "train_s": round(time.perf_counter() - t0, 1),
                                 "final_loss": round(res.last_loss, 4)}

    print("eval ...", flush=True)
    ev = evaluate(teacher.model, {"init": init, **students}, eval_ex, batch_size=8, pad_id=pad, vocab=vocab)
    live_kl = ev["full distribution"]["kl"]
    for name in students:
        rows[name]["eval_kl"] = round(ev[name]["kl"], 4)
        rows[name]["kl_vs_live"] = round(ev[name]["kl"] / live_kl, 4)
        rows[name]["eval_agreement"] = round(ev[name]["agreement"], 4)

    head = (f"{'source of targets':<20} {'bytes/token':>12} {'x full fp32':>11} {'eval KL':>8} {'KL / live':>9} "
            f"{'top-1':>6}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        lines.append(f"{name:<20} {r['bytes_per_token']:>12,.1f} {r['bytes_per_token'] / (vocab * 4):>11.5f} "
                     f"{r['eval_kl']:>8.4f} {r['kl_vs_live']:>9.4f} {100 * r['eval_agreement']:>5.1f}%")
    lines.append(f"(initial student: eval KL {ev['init']['kl']:.4f}; full distribution in fp16 would be "
                 f"{vocab * 2:,} bytes/token; teacher forwards: {memo.forwards} examples, once each)")
    table = "\n".join(lines)
    print(table)
    k64 = rows.get("k=64")
    ok = bool(k64) and k64["bytes_per_token"] <= 600 and k64["kl_vs_live"] <= 1.02
    print(f"target (k=64 <= 600 bytes/token and eval KL within 2% of the live teacher's): "
          f"{'met' if ok else 'MISSED'}")
    out = {"benchmark": "cache_size_quality", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
           "command": "python " + " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "teacher": TEACHER, "student_layers": LAYERS,
           "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len, "threads": args.threads,
           "vocab": vocab, "initial_eval_kl": round(ev["init"]["kl"], 4), "rows": rows, "target_met": ok,
           "table": table}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)  # students' checkpoints and the caches: ~0.5 GB per training row
    return 0


if __name__ == "__main__":
    sys.exit(main())
