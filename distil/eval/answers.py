"""What every row of an evaluation writes: its answers to held-out prompts, and its generation metrics on a
verifiable task. The token-level table (distil/eval/metrics.py) says how close a student is to its teacher on
given text; this says what the student does when it has to write the text itself.

- `eval.answers: K`: the teacher and every student row answer the first K held-out prompts (greedy,
  `eval.max_new_tokens`), rendered exactly as training rendered them (the prompt part of the held-out examples:
  chat template, BOS). Printed side by side and saved in eval.json / report.md: "before and after" in words.
- `eval.task: NAME` (distil/eval/tasks.py): every row answers the task's first `eval.task_size` eval questions,
  greedy (accuracy = pass@1 of the greedy answer) and, with `eval.samples: n > 1`, n samples per question at
  `eval.temperature` (the unbiased pass@k curve of Chen et al. 2021 for k = 1..n, distinct-1/2, self-BLEU within
  a question, mean length, the fraction cut at max tokens), all from `distil.eval.generation.generation_metrics`.
  Mode / diversity collapse: a student whose sampled distinct-2 is below `eval.diversity_warn` x the teacher's
  gets a warning line (a mode-seeking objective can raise pass@1 and lower pass@n). Questions
  are rendered by `distil/data.py` the way the task's training records are (same chat/BOS conventions).
"""

from __future__ import annotations

from typing import Any

import torch

from distil.data import IGNORE, build_examples
from distil.errors import DistilError


def prompt_part(example: dict, bos: int | None = None) -> list[int]:
    """The prompt of a supervised example: its masked tokens before the first target; [] when it has none (text
    records: every token is a target, or only a BOS precedes the first one)."""
    labels, ids = example["labels"], example["input_ids"]
    first = next((t for t, v in enumerate(labels) if v != IGNORE), None)
    if not first:  # no target at all (None), or text whose first token is already a target (0)
        return []
    prefix = list(ids[:first])
    return prefix if any(t != bos for t in prefix) else []


def held_out_prompts(examples: list[dict], tok: Any, k: int) -> list[tuple[str, list[int]]]:
    """(question text, prompt ids) of the first k held-out examples that have a prompt."""
    out = []
    for ex in examples:
        ids = prompt_part(ex, tok.bos_token_id)
        if ids:
            out.append((ex.get("question") or tok.decode(ids, skip_special_tokens=True).strip(), ids))
        if len(out) == k:
            break
    return out


def _generate(model: Any, tok: Any, prompts: list[list[int]], params: Any, batch_size: int) -> list[dict]:
    from distil.generate import generate

    was_training = model.training
    try:
        return generate(model, tok, prompts, params, batch_size=batch_size, model_name="eval").records
    finally:
        model.train(was_training)


def _split(row: Any, tok: Any) -> tuple[Any, Any]:
    """A row is a model (it shares the student's tokenizer) or (model, its own tokenizer): a teacher across
    tokenizers, asked the question text through its own chat template."""
    return row if isinstance(row, tuple) else (row, tok)


def answers(rows: dict[str, Any], tok: Any, prompts: list[tuple[str, list[int]]], *, max_new_tokens: int,
            batch_size: int) -> dict[str, Any]:
    """{"questions": [...], "answers": {row: [greedy answer per question]}}."""
    from distil.generation.params import GenParams

    params = GenParams(max_new_tokens=max_new_tokens)
    ids = [p for _, p in prompts]
    out: dict[str, list[str]] = {}
    for name, row in rows.items():
        model, own = _split(row, tok)
        asked = ids if own is tok else [q for q, _ in prompts]  # its own tokenizer: the question text
        out[name] = [r["completion"].strip() for r in _generate(model, own, asked, params, batch_size)]
    return {"questions": [q for q, _ in prompts], "prompt_ids": ids, "answers": out}


def task_prompts(task: Any, size: int, tok: Any, recipe: Any) -> tuple[list[list[int]], list[Any]]:
    """The task's first `size` eval questions as prompt ids (rendered like the task's training records) and
    their gold answers."""
    _, held = task.split(0, size)
    records = [{"prompt": e.prompt, "response": e.response()} for e in held]
    examples = build_examples(records, tok, recipe.data.seq_len, False, recipe.data.chat_template, f"task {task.name}")
    if len(examples) != len(held):
        raise DistilError(f"eval.task: {task.name}: some questions do not fit data.seq_len={recipe.data.seq_len}")
    return [prompt_part(e, tok.bos_token_id) or e["input_ids"][:1] for e in examples], [e.answer for e in held]


def task_metrics(rows: dict[str, Any], tok: Any, recipe: Any) -> dict[str, dict]:
    """{row: generation metrics on the task}: greedy accuracy, and the sampled metrics when eval.samples > 1."""
    from distil.eval.generation import generation_metrics
    from distil.eval.tasks import TASKS
    from distil.generation.params import GenParams

    spec = recipe.eval
    task = TASKS[spec.task]
    out = {}
    for name, row in rows.items():
        model, own = _split(row, tok)
        prompts, golds = task_prompts(task, spec.task_size, own, recipe)
        greedy = _generate(model, own, prompts, GenParams(max_new_tokens=spec.max_new_tokens), spec.batch_size)
        m = {"accuracy": generation_metrics(greedy, task, golds)["accuracy"]}
        if spec.samples > 1:
            sampled = _generate(model, own, prompts, GenParams(max_new_tokens=spec.max_new_tokens,
                                                               temperature=spec.temperature, n=spec.samples,
                                                               seed=recipe.seed), spec.batch_size)
            # the whole pass@k curve, k = 1..n: a mode-seeking student can raise pass@1 and lower pass@n
            s = generation_metrics(sampled, task, golds, ks=range(1, spec.samples + 1), distinct=(1, 2))
            m.update({k: v for k, v in s.items() if k not in ("n_prompts", "n_samples", "accuracy")})
        else:
            s = generation_metrics(greedy, distinct=(1, 2))
            m.update({k: s[k] for k in ("distinct-1", "distinct-2", "mean_length", "truncated")})
        out[name] = m
    return out


def generation_eval(recipe: Any, rows: dict[str, Any], tok: Any, held_out: list[dict]) -> dict[str, Any]:
    """What eval.answers and eval.task ask for, for every row (teacher first when there is one)."""
    spec = recipe.eval
    out: dict[str, Any] = {}
    with torch.no_grad():
        if spec.answers:
            prompts = held_out_prompts(held_out, tok, spec.answers)
            if not prompts:
                raise DistilError(f"eval.answers: the held-out examples of {recipe.data.source} have no prompts "
                                  f"(text records); expected prompt/response or messages records")
            out.update(answers(rows, tok, prompts, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size))
        if spec.task:
            out["task"] = {"name": spec.task, "size": spec.task_size, "samples": spec.samples,
                           "rows": task_metrics(rows, tok, recipe), "diversity_warn": spec.diversity_warn}
            out["task"]["warnings"] = diversity_warnings(out["task"])
    return out


def pass_curve(metrics: dict, n: int) -> list[float]:
    """[pass@1, ..., pass@n] of one row (the keys generation_metrics wrote; [] for a greedy-only row)."""
    return [metrics[f"pass@{k}"] for k in range(1, n + 1)] if all(f"pass@{k}" in metrics
                                                                   for k in range(1, n + 1)) else []


def diversity_warnings(task: dict[str, Any]) -> list[str]:
    """Mode / diversity collapse: one line per student row whose sampled distinct-2 is below `diversity_warn`
    times the teacher's (eval.samples > 1 only: a greedy answer has no diversity to lose; no teacher row, or
    diversity_warn 0: none)."""
    rows, frac, n = task.get("rows") or {}, task.get("diversity_warn") or 0.0, task.get("samples", 1)
    teacher = rows.get("teacher")
    if n < 2 or not frac or not teacher or "distinct-2" not in teacher:
        return []
    out = []
    for name, m in rows.items():
        if name == "teacher" or "distinct-2" not in m or m["distinct-2"] >= frac * teacher["distinct-2"]:
            continue
        nan = float("nan")
        out.append(f"warning: {name}: distinct-2 {m['distinct-2']:.3f} is below {frac:g} x the teacher's "
                   f"{teacher['distinct-2']:.3f} (mode/diversity collapse: its samples repeat each other); "
                   f"pass@1 {m.get('pass@1', nan):.3f} vs the teacher's {teacher.get('pass@1', nan):.3f}, "
                   f"pass@{n} {m.get(f'pass@{n}', nan):.3f} vs {teacher.get(f'pass@{n}', nan):.3f}")
    return out


def format_answers(report: dict[str, Any], width: int = 100) -> str:
    """Each question, then every row's answer to it (one line each, cut at `width` characters)."""
    if not report.get("questions"):
        return ""
    lines = []
    for i, q in enumerate(report["questions"]):
        lines.append(f"> {q}")
        for name, texts in report["answers"].items():
            text = " ".join(texts[i].split()) or "(nothing)"
            lines.append(f"  {name:<22} {text[:width] + ('...' if len(text) > width else '')}")
    return "\n".join(lines)


def format_task(report: dict[str, Any]) -> str:
    """The task table: one row per model, accuracy first, then the sampled metrics."""
    if not report.get("task"):
        return ""
    rows = report["task"]["rows"]
    keys = [k for k in ("accuracy", "pass@1", f"pass@{report['task']['samples']}", "distinct-2", "self_bleu_per_prompt",
                        "mean_length", "truncated") if any(k in m for m in rows.values())]
    keys = list(dict.fromkeys(keys))
    head = f"task {report['task']['name']} ({report['task']['size']} eval questions)"
    lines = [f"{head:<30}" + "".join(f"{k:>13}" for k in keys)]
    for name, m in rows.items():
        lines.append(f"{name:<30}" + "".join(f"{m[k]:>13.3f}" if k in m else f"{'':>13}" for k in keys))
    n = report["task"]["samples"]
    curves = {name: pass_curve(m, n) for name, m in rows.items()}
    if n > 1 and any(curves.values()):  # the pass@k curve (unbiased, Chen et al.) and distinct-n beside it
        lines.append("")
        lines.append(f"{'pass@k, k = 1..' + str(n):<30}" + "".join(f"{k:>7}" for k in range(1, n + 1))
                     + f"{'distinct-1':>12}{'distinct-2':>12}")
        for name, curve in curves.items():
            if curve:
                m = rows[name]
                lines.append(f"{name:<30}" + "".join(f"{v:>7.3f}" for v in curve)
                             + "".join(f"{m[k]:>12.3f}" if k in m else f"{'':>12}"
                                       for k in ("distinct-1", "distinct-2")))
    lines.extend(diversity_warnings(report["task"]))
    return "\n".join(lines)
