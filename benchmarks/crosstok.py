"""Distillation across tokenizers: Gemma-3-270M (262k-token SentencePiece vocabulary, BOS) teaching a depth-pruned
SmolLM2 student (49k-token byte-level BPE, no BOS), four ways at the same budget.

    nice -n 10 python benchmarks/crosstok.py --steps 10 --records 40 --prompts 8 --new-tokens 24 --seqkd-backend hf
        # the README's table: 19 min on the shared 2-core machine at load 4-8 (the defaults below took longer)
    python benchmarks/crosstok.py --quick --teacher DIR --student DIR --layers 0,1   # a smoke run on tiny models

Every row trains the same initial student (recipes/crosstok_gemma_to_smollm.yaml: SmolLM2-135M-Instruct cut to 10
of its 30 layers) through distil's own pipeline, on the same training records (`builtin:python_qa` as plain text,
`data.chat_template: false`: Gemma-3-270M is a base model), with the same steps x batch x sequence length
(defaults: 20 steps x 2 sequences of <= 64 student tokens, 56 training records, 16 held-out records, teacher
answers and continuations of 32 tokens; sized to run in ~20 min on 2 busy CPU cores, so a short recovery run of a
student cut from 30 to 10 layers, not a converged one):

  hard labels    cross-entropy on the references (no teacher)
  SeqKD          the teacher's greedy answers to the training prompts replace the references (asked as text, with
                 Gemma's BOS, by llama.cpp on the embedded GGUF), re-tokenized by the student
  ULD            CE on the references + the Wasserstein distance between the sorted probability vectors at every
                 position aligned by characters (crosstok.loss: uld)
  GOLD-style     the same alignment; pieces that are one string in both vocabularies by KL, the rest by ULD
                 (crosstok.loss: gold)

Scores, on the recipe's held-out records (never trained on):
  ppl            the student's perplexity on the held-out references, in its own tokens (exp of the mean NLL of the
                 reference tokens; the prompt is context, not scored)
  agree          agreement with the teacher measured on text: the teacher (llama.cpp, greedy, its own BOS) continues
                 each held-out prompt for --new-tokens tokens; that continuation, decoded to text, is re-tokenized by
                 the student after the student's own rendering of the prompt, and `agree` is the fraction of those
                 student tokens that are the student's top-1 prediction given everything before them (teacher
                 forcing on the teacher's text). No distribution over the teacher's vocabulary is needed: it is
                 defined across tokenizers.
  teacher-text ppl  the student's perplexity on that same teacher text (exp of the mean NLL of its tokens): how
                 likely the student finds what the teacher writes (KL-free: lower = closer to the teacher's mode)
Writes benchmarks/results/crosstok.json (date, machine, command, load average, budgets, rows).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "crosstok_gemma_to_smollm.yaml"
ROWS = {
    "hard labels": ["distill.method=hard_labels"],
    "SeqKD": ["distill.method=seqkd", "seqkd.temperature=0"],
    "ULD": ["distill.method=crosstok", "crosstok.loss=uld"],
    "GOLD-style": ["distill.method=crosstok", "crosstok.loss=gold"],
}


def common_overrides(args: argparse.Namespace, out: str) -> list[str]:
    o = [f"output.dir={out}", f"train.steps={args.steps}", f"train.batch_size={args.batch}",
         f"data.seq_len={args.seq_len}", f"data.max_records={args.records}", f"data.eval_size={args.prompts}",
         "data.source=builtin:python_qa", "data.chat_template=false", "eval.enabled=false", "train.progress=false",
         "output.save_student=true", f"train.threads={args.threads}", f"seqkd.max_new_tokens={args.new_tokens}",
         f"seqkd.backend={args.seqkd_backend}", f"seqkd.dir={out}/seqkd-answers", "train.warmup_steps=2"]
    if args.teacher:
        o.append(f"teacher.source={args.teacher}")
    if args.student:
        o += [f"student.source={args.student}", f"student.layers=[{args.layers}]"]
    return o


def teacher_continuations(recipe, questions: list[str], new_tokens: int, backend: str) -> list[str]:
    """The teacher's greedy continuation of each held-out prompt, as text (asked as plain text: its own BOS)."""
    from distil.generation import GenParams, generate

    params = GenParams(max_new_tokens=new_tokens, temperature=0.0, chat=False)
    if backend == "llamacpp":
        from distil.generation.sources import load_for_backend

        model, tok = load_for_backend({"source": recipe.teacher.source, "tokenizer": recipe.teacher.tokenizer},
                                      "llamacpp")
    else:
        from distil.models import load_teacher

        t = load_teacher(recipe)
        model, tok = t.model, t.tokenizer
    try:
        records = generate(model, tok, questions, params).records
    finally:
        if hasattr(model, "close"):
            model.close()
    return [r["completion"] for r in sorted(records, key=lambda r: r["prompt_index"])]


def score(model, tok, held: list[dict], continuations: list[str]) -> dict:
    """ppl on the held-out references; agree and teacher-text ppl on the teacher's continuations (docstring)."""
    import torch

    from distil.data import IGNORE
    from distil.eval.answers import prompt_part

    model.eval()
    nll_ref = n_ref = nll_t = n_t = hits = 0.0
    with torch.no_grad():
        for ex, cont in zip(held, continuations):
            prompt = prompt_part(ex, tok.bos_token_id)
            cont_ids = list(tok(cont, add_special_tokens=False)["input_ids"])
            for ids, labels, is_teacher in ((ex["input_ids"], ex["labels"], False),
                                            (prompt + cont_ids, [IGNORE] * len(prompt) + cont_ids, True)):
                if not any(y != IGNORE for y in labels[1:]):
                    continue
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1, :len(tok)].double()
                y = torch.tensor(labels[1:])
                valid = y != IGNORE
                lp = logits.log_softmax(-1)[valid].gather(-1, y[valid][:, None])[:, 0]
                if is_teacher:
                    nll_t -= float(lp.sum())
                    n_t += int(valid.sum())
                    hits += int((logits[valid].argmax(-1) == y[valid]).sum())
                else:
                    nll_ref -= float(lp.sum())
                    n_ref += int(valid.sum())
    return {"ppl": math.exp(nll_ref / max(n_ref, 1)), "agree": hits / max(n_t, 1),
            "teacher_text_ppl": math.exp(nll_t / max(n_t, 1)), "reference_tokens": int(n_ref),
            "teacher_text_tokens": int(n_t)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--records", type=int, default=72, help="records read (train + held out)")
    ap.add_argument("--prompts", type=int, default=16, help="held-out records (ppl, and the prompts of agree)")
    ap.add_argument("--new-tokens", type=int, default=32, help="teacher tokens per answer (SeqKD) / continuation")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--teacher", default="", help="another teacher (default: the recipe's)")
    ap.add_argument("--student", default="", help="another student source (with --layers)")
    ap.add_argument("--layers", default="0,1")
    ap.add_argument("--seqkd-backend", default="llamacpp", choices=["hf", "llamacpp"])
    ap.add_argument("--out", default="/tmp/distil-crosstok-bench")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "crosstok.json"))
    ap.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.records, args.prompts, args.new_tokens, args.seq_len = 2, 24, 4, 6, 160

    import torch

    torch.set_num_threads(args.threads)
    from distil.data import load_examples
    from distil.models import load_model, load_student
    from distil.pipeline import run
    from distil.recipe import load_recipe

    load_before = os.getloadavg()
    start = time.perf_counter()
    common = common_overrides(args, args.out)
    base = load_recipe(RECIPE, common + ["name=before"])
    initial = load_student(base, None)  # the initial depth-pruned student (its own source, not the teacher)
    _, held = load_examples(base.data, initial.tokenizer, base.seed)
    held = held[:args.prompts]
    questions = [ex["question"] for ex in held]
    t0 = time.perf_counter()
    continuations = teacher_continuations(base, questions, args.new_tokens, args.seqkd_backend)
    teacher_s = time.perf_counter() - t0
    print("teacher continuations:", [c[:40] for c in continuations[:4]], flush=True)
    results = {"student (before)": {**score(initial.model, initial.tokenizer, held, continuations), "train_s": 0.0}}
    print(f"student (before): {results['student (before)']}", flush=True)
    del initial
    for row, overrides in ROWS.items():
        recipe = load_recipe(RECIPE, common + overrides + [f"name={row.split()[0].lower().replace('-', '')}"])
        lines: list[str] = []
        t0 = time.perf_counter()
        result = run(recipe, overwrite=True, echo=lines.append)
        trained = time.perf_counter() - t0
        student = load_model(str(result.student_dir))
        results[row] = {**score(student.model, student.tokenizer, held, continuations), "train_s": round(trained, 1),
                        "log": [ln for ln in lines if ln.startswith(("seqkd:", "crosstok", "student:"))]}
        print(f"{row}: { {k: v for k, v in results[row].items() if k != 'log'} }", flush=True)
        del student

    header = f"{'row':<18}{'ppl (refs)':>12}{'agree':>9}{'teacher-text ppl':>18}{'train s':>9}"
    table = [header, "-" * len(header)]
    for row, r in results.items():
        table.append(f"{row:<18}{r['ppl']:>12.1f}{r['agree']:>9.3f}{r['teacher_text_ppl']:>18.1f}{r['train_s']:>9.0f}")
    print("\n".join(table))
    record = {
        "benchmark": "crosstok", "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
                   f"torch {torch.__version__}, {args.threads} torch threads",
        "command": "nice -n 10 python benchmarks/crosstok.py " + " ".join(sys.argv[1:]),
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "wall_s": round(time.perf_counter() - start, 1), "teacher_continuations_s": round(teacher_s, 1),
        "budget": {"steps": args.steps, "batch": args.batch, "seq_len": args.seq_len, "records": args.records,
                   "held_out": len(held), "new_tokens": args.new_tokens},
        "recipe": str(RECIPE.relative_to(ROOT)), "overrides": common, "rows": results, "table": table,
        "continuations": [{"prompt": q, "teacher": c} for q, c in zip(questions, continuations)][:4],
    }
    if not args.quick:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
