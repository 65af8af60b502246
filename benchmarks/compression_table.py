"""The compression table (issue 11) on the embedded SmolLM2-135M-Instruct: every compression before and after
distillation, side by side, with what ships (a Q4_K_M GGUF: its size and llama.cpp's tokens/s).

    nice -n 10 .venv/bin/python benchmarks/compression_table.py            # every row (~25 min on 2 busy cores)
    .venv/bin/python benchmarks/compression_table.py --steps 40            # a longer recovery budget

One process (the teacher and the data loaded once: the machine is shared), results printed and stored in
benchmarks/results/compression_table.json with, for every trained row, the `distil run` command that trains it the
same way:
  - trained rows: pruned students recovered by distillation from the teacher (the row's recipe: its loss, lr and
    batch), QAT against the full-precision model; `--steps` optimizer steps of 4 x 64 tokens (63 targets each) of
    `builtin:pydoc`, the same for every trained row. Calibration (pruning scores, Wanda): the first 32 training
    examples (2,048 tokens). Each trained structured row and the dense model are exported to Q4_K_M.
  - every row is evaluated on the same held-out split (`--eval-size` examples of 64 tokens): held-out perplexity,
    KL(teacher || row) per token and top-1 agreement with the teacher (fp32 teacher); GGUF rows are scored from
    llama.cpp's own logits (llama-cpp-python, `logits_all`), so "Q4_K_M" is what llama.cpp runs.
Columns "GGUF MB" and "tok/s": the row's Q4_K_M file (sparsity and torch int4 make no GGUF smaller or faster, so
those rows have none) and llama.cpp's generation speed on it: tokens/s of the decode after the prompt, one thread,
greedy, `--gen-tokens` tokens (end of turn ignored), the best of two tries, measured alternately with the dense
model's Q4_K_M ("x dense": the ratio of the two; the machine is shared and absolute speeds move several-fold with
its load).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "What is a Python list?"
# trained rows: name -> (recipe, its overrides, what `distil run` would write): the same budget for every one
RUNS = {
    "depth20_bi": ("recipes/prune_depth.yaml", ["prune.depth=20"]),
    "depth20_uniform": ("recipes/prune_depth.yaml", ["prune.depth=20", "prune.depth_score=uniform"]),
    "depth15_bi": ("recipes/prune_depth.yaml", ["prune.depth=15"]),
    "depth15_uniform": ("recipes/prune_depth.yaml", ["prune.depth=15", "prune.depth_score=uniform"]),
    # the pipeline recipe (MLP 50% -> KD -> Q4_K_M) on the table's text data (the recipe itself trains on chat data)
    "mlp50": ("recipes/prune_distill_q4.yaml", ["data.source=builtin:pydoc", "data.seq_len=64"]),
    "hidden378": ("recipes/prune_width.yaml", ["prune.mlp=0.0", "prune.heads=0", "prune.hidden=0.3333333",
                                               "prune.multiple_of=1"]),
    "qat_int4": ("recipes/qat.yaml", ["qat.grid=int4"]),
    "qat_q4k": ("recipes/qat.yaml", ["qat.grid=q4_k"]),
}


def run_command(row: str, steps: int, eval_size: int) -> str:
    """The `distil run` command that trains this row the same way (the benchmark trains in one process, so the
    teacher and the data are loaded once on this busy machine)."""
    recipe, overrides = RUNS[row]
    return " ".join(["distil", "run", recipe, *overrides, f"train.steps={steps}", f"data.eval_size={eval_size}",
                     "export.enabled=true", "export.quant=Q4_K_M", f"name={row}"])


class GGUFLogits:
    """A GGUF in llama.cpp, called like a transformers model for `evaluate`: logits of every position of every
    (right-padded) row, from llama.cpp itself."""

    training = False

    def __init__(self, path: Path, threads: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                                   n_threads=threads, n_threads_batch=threads, seed=0)

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids, attention_mask, **_):
        import numpy as np
        import torch

        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            n = int(mask.sum())
            self.llm.reset()
            self.llm.eval([int(t) for t in ids[:n]])
            row = torch.zeros(ids.shape[0], self.llm.n_vocab())
            row[:n] = torch.from_numpy(np.array(self.llm.scores[:n], dtype=np.float32))
            rows.append(row)
        return SimpleNamespace(logits=torch.stack(rows))

    def close(self):
        self.llm.close()


class CachedTeacher:
    """The teacher's logits of every eval batch, computed once and handed back by batch content (every row is
    scored against the same teacher forward: on this machine a forward of the teacher costs as much as a row's)."""

    training = False

    def __init__(self, teacher, examples: list[dict], batch_size: int, pad_id: int):
        import torch

        from distil.data import collate

        self.logits = {}
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = collate(examples[i:i + batch_size], pad_id)
                key = batch["input_ids"].numpy().tobytes()
                self.logits[key] = teacher(input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"]).logits

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def __call__(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=self.logits[input_ids.cpu().numpy().tobytes()])


def decode_speed(gguf: Path, tokens: int) -> float | None:
    """llama.cpp's generation speed on the GGUF (distil.generate.llamacpp_decode_speed): `tokens` greedy tokens after
    PROMPT, end of turn ignored, one thread."""
    from distil.generate import llamacpp_decode_speed

    return llamacpp_decode_speed(gguf, PROMPT, tokens, n_ctx=256, n_threads=1)


def speed(gguf: Path, reference: Path, tokens: int, tries: int = 2) -> tuple[float | None, float | None]:
    """(tokens/s of `gguf`, tokens/s of `reference`), measured alternately and the best of `tries` each: the load of
    a shared machine moves absolute speeds several-fold within minutes, the ratio much less."""
    best = [None, None]
    for _ in range(tries):
        for i, path in enumerate((gguf, reference)):
            tps = decode_speed(path, tokens)
            if tps is not None and (best[i] is None or tps > best[i]):
                best[i] = tps
    return best[0], best[1]


def build_table(out: Path, steps: int, eval_size: int, gen_tokens: int, threads: int, rows: list[str],
                skip_untrained: bool = False) -> dict:
    import shutil

    import torch
    from distil import data as data_mod
    from distil.compress import prune as P
    from distil.compress import qat as Q
    from distil.compress.calibration import calibration_batches
    from distil.compress.quantize import QuantConfig, quantize_
    from distil.compress.sparsity import Masks, compute_masks, sparsity_report
    from distil.eval.metrics import evaluate
    from distil.export import export_gguf
    from distil.generate import teacher_gguf
    from distil.methods.contract import Trainable
    from distil.methods.offline import build_offline
    from distil.models import Loaded, count_params, load_student, load_teacher, save_student
    from distil.recipe import load_recipe
    from distil.trainer import train

    torch.set_num_threads(threads)
    base = [f"data.eval_size={eval_size}", f"train.threads={threads}", f"train.steps={steps}",
            "train.progress=false"]
    recipe = load_recipe(ROOT / "recipes" / "prune_depth.yaml", base)
    teacher = load_teacher(recipe)
    tok = teacher.tokenizer
    dense = load_student(recipe, teacher).model.eval()  # a copy of the teacher, embeddings frozen (the recipes')
    train_ex, eval_ex = data_mod.load_examples(recipe.data, tok, recipe.seed)
    pad = data_mod.pad_id(tok)
    calib = calibration_batches(train_ex, 32, 8, pad, "calibration")
    cached = CachedTeacher(teacher.model, eval_ex, 8, pad)
    table: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    dense_q4 = out / "dense" / "dense-Q4_K_M.gguf"  # written below, before any row with a GGUF is scored

    def score(name: str, model, params: int | None, gguf: Path | None = None, note: str = "") -> None:
        t0 = time.time()
        r = evaluate(cached, {name: model}, eval_ex, batch_size=8, pad_id=pad, vocab=len(tok))[name]
        row = {"params": params, "ppl": r["ppl"], "kl": r["kl"], "top1": r["agreement"], "eval_tokens": r["tokens"]}
        if gguf is not None and gguf.is_file():
            row["gguf"] = gguf.name
            row["gguf_mb"] = gguf.stat().st_size / 1e6
            row["tokens_per_s"], row["dense_tokens_per_s"] = speed(gguf, dense_q4, gen_tokens)
            if row["tokens_per_s"] and row["dense_tokens_per_s"]:
                row["speed_vs_dense"] = row["tokens_per_s"] / row["dense_tokens_per_s"]
        if note:
            row["note"] = note
        table[name] = row
        print(f"{name:<52} ppl {row['ppl']:>10.2f}  KL {row['kl']:.4f}  top-1 {row['top1']:.3f}"
              + (f"  {row['gguf_mb']:.1f} MB {row['tokens_per_s'] or 0:.1f} tok/s "
                 f"(dense Q4_K_M beside it {row['dense_tokens_per_s'] or 0:.1f})" if "gguf_mb" in row else "")
              + f"  ({time.time() - t0:.0f} s)", flush=True)

    def spec(**kw):
        return SimpleNamespace(**{**dict(depth=0, depth_score="block_influence", mlp=0.0, hidden=0.0, heads=0,
                                         kv_heads=0, multiple_of=1), **kw})

    def ship(row: str, model) -> Path:
        """Save the row's model and export it to Q4_K_M, as `distil run ... export.quant=Q4_K_M` does."""
        d = out / row / "student"
        save_student(Loaded(model, tok, row, None), d)
        return Path(export_gguf(d, out / row / f"{row}-Q4_K_M.gguf", "Q4_K_M", modelfile=False, name=row).path)

    def recover(row: str, model, prepare=None):
        """`steps` steps of the row's recipe (its distill loss, lr, batch) against the teacher, in place."""
        r = load_recipe(ROOT / RUNS[row][0], RUNS[row][1] + base)
        run_dir = out / row
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        if prepare is not None:
            prepare(model, r)
        loss_fn = build_offline(teacher.model, r.distill, len(tok), echo=lambda *_: None)
        t0 = time.time()
        train(Trainable(model), loss_fn, train_ex, r.train, run_dir=run_dir, seed=r.seed, pad_id=pad, tag=row)
        seconds[row] = round(time.time() - t0, 1)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # weights + AdamW moments: 1.6 GB a row
        print(f"trained {row}: {steps} steps in {seconds[row]:.0f} s", flush=True)
        return model.eval()

    # the dense model, and what plain Q4_K_M makes of it (llama.cpp's logits)
    out.mkdir(parents=True, exist_ok=True)
    if ship("dense", dense) != dense_q4:
        raise RuntimeError(f"the dense export is not at {dense_q4}")
    score("dense (the teacher, fp32)", dense, count_params(dense), dense_q4)

    # structured pruning: no training, then + KD (the same pruned model, recovered)
    for row, kw, label in (("depth20_bi", dict(depth=20), "depth 20/30, Block Influence"),
                           ("depth20_uniform", dict(depth=20, depth_score="uniform"), "depth 20/30, uniform"),
                           ("depth15_bi", dict(depth=15), "depth 15/30, Block Influence"),
                           ("depth15_uniform", dict(depth=15, depth_score="uniform"), "depth 15/30, uniform"),
                           ("mlp50", dict(mlp=0.5, multiple_of=256), "MLP width 50% (1536 -> 768)"),
                           ("hidden378", dict(hidden=0.3333333), "hidden channels 576 -> 378 (42 x 9 heads)")):
        if skip_untrained and row not in rows:
            continue
        pruned, _ = P.prune(dense, spec(**kw), calib)
        pruned.eval()
        score(f"{label}, no training", pruned, count_params(pruned))
        if row in rows:
            recovered = recover(row, pruned)
            score(f"{label}, + KD", recovered, count_params(recovered), ship(row, recovered))
        del pruned
        gc.collect()

    # unstructured, no retraining
    unstructured = (("50% magnitude", "magnitude", "unstructured"), ("50% Wanda", "wanda", "unstructured"),
                    ("2:4 Wanda", "wanda", "2:4"), ("2:4 magnitude", "magnitude", "2:4"))
    for label, how, pattern in () if skip_untrained else unstructured:
        m = copy.deepcopy(dense)
        Masks(m, compute_masks(m, SimpleNamespace(score=how, pattern=pattern, sparsity=0.5), calib)).apply()
        score(f"{label}, no training", m, count_params(m),
              note=f"sparsity of the decoder linear maps {100 * sparsity_report(m)['all']:.1f}%")
        del m
        gc.collect()

    # int4: PTQ vs QAT with distillation at the same budget
    if not skip_untrained:
        m = copy.deepcopy(dense)
        backend = quantize_(m, QuantConfig(bits=4, group_size=32, backend="auto"))
        score("int4 g32 PTQ (torch)", m, count_params(m), note=f"backend {backend}")
        del m
    if "qat_int4" in rows:
        m = recover("qat_int4", copy.deepcopy(dense), prepare=lambda model, r: Q.prepare(model, r.qat))
        score("int4 g32 QAT + KD (torch)", Q.convert(m), count_params(m))
        del m
    # Q4_K_M: plain vs QAT on its grid, both as llama.cpp runs the GGUF
    ggufs = [("Q4_K_M plain (llama.cpp)", dense_q4)]
    if "qat_q4k" in rows:
        m = recover("qat_q4k", copy.deepcopy(dense), prepare=lambda model, r: Q.prepare(model, r.qat))
        ggufs.append(("QAT on the Q4_K_M grid + KD, Q4_K_M (llama.cpp)", ship("qat_q4k", Q.convert(m))))
        del m
    if (out / "mlp50" / "mlp50-Q4_K_M.gguf").is_file():
        ggufs.append(("final: MLP 50% + KD, Q4_K_M (llama.cpp)", out / "mlp50" / "mlp50-Q4_K_M.gguf"))
    shipped = teacher_gguf("embedded:smollm2-135m-instruct")
    if shipped is not None:
        ggufs.append((f"the embedded teacher as shipped ({shipped.name}, llama.cpp)", shipped))
    for label, path in ggufs:
        model = GGUFLogits(path, threads)
        try:
            score(label, model, None, path)
        finally:
            model.close()
    return {"rows": table, "eval_tokens": next(iter(table.values()))["eval_tokens"], "calibration_tokens": 32 * 64,
            "train_seconds": seconds}


def show(rows: dict) -> str:
    lines = [f"{'row':<62}{'params':>8}{'GGUF MB':>9}{'tok/s':>7}{'x dense':>8}{'ppl':>10}{'KL':>8}{'top-1':>7}"]
    for name, r in rows.items():
        p = f"{r['params'] / 1e6:.1f}M" if r.get("params") else "-"
        mb = f"{r['gguf_mb']:.1f}" if r.get("gguf_mb") else "-"
        tps = f"{r['tokens_per_s']:.1f}" if r.get("tokens_per_s") else "-"
        ratio = f"{r['speed_vs_dense']:.2f}" if r.get("speed_vs_dense") else "-"
        lines.append(f"{name:<62}{p:>8}{mb:>9}{tps:>7}{ratio:>8}{r['ppl']:>10.2f}{r['kl']:>8.4f}{r['top1']:>7.3f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/compression_table", help="where the trained rows and GGUFs go")
    ap.add_argument("--steps", type=int, default=8, help="recovery / QAT steps of every trained row")
    ap.add_argument("--eval-size", type=int, default=16, help="held-out examples (64 tokens each)")
    ap.add_argument("--gen-tokens", type=int, default=48, help="tokens generated for the tokens/s column")
    ap.add_argument("--rows", nargs="*", default=list(RUNS), help="trained rows (the others are skipped)")
    ap.add_argument("--skip-untrained", action="store_true",
                    help="only the trained rows given in --rows and the GGUF rows (finishing an interrupted table)")
    ap.add_argument("--threads", type=int, default=1, help="torch and llama.cpp threads (1: the cores are shared)")
    args = ap.parse_args()
    started = time.time()
    result = build_table((ROOT / args.out).resolve(), args.steps, args.eval_size, args.gen_tokens, args.threads,
                         args.rows, args.skip_untrained)
    print(show(result["rows"]))
    record = {"benchmark": "compression_table", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
              "teacher": "embedded:smollm2-135m-instruct", "command": " ".join(["python", *sys.argv]),
              "budget": {"recovery_steps": args.steps, "batch": "4 x 64 tokens", "target_tokens_per_step": 4 * 63,
                         "eval_examples": args.eval_size, "gen_tokens": args.gen_tokens, "threads": args.threads},
              "run_commands": {row: run_command(row, args.steps, args.eval_size) for row in args.rows},
              "wall_s": round(time.time() - started, 1), **result}
    target = ROOT / "benchmarks" / "results" / "compression_table.json"
    target.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {target} ({record['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
