"""The capacity gap (Mirzadeh et al. 2020; Cho & Hariharan 2019), measured: `distil advise RECIPE`.

A stronger teacher does not always give a better student: past some gap, the student cannot follow the teacher's
distribution and learns less from it than from a weaker one; an assistant of intermediate size (TAKD,
distil/methods/takd.py) can bridge the gap. `sweep` distils the recipe's student from each of several teachers of
different strength (sizes, or checkpoints of different training lengths: `train_teachers` trains them once from a
teacher recipe and caches them under runs/), with the same recipe and budget, through `distil.pipeline.run`, and,
with an assistant, once more through the chain. Every row: the teacher's size and quality (perplexity on the held-out
gold text), the student's quality (perplexity on the same text; task accuracy with eval.task), and whether the chain
beat direct distillation (lower student perplexity, or higher accuracy when the recipe has eval.task).

All teachers must share one vocabulary with each other (checked before anything trains): a sweep across tokenizers
would compare students trained on different token streams.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from distil.errors import DistilError


def check_vocabularies(teachers: Sequence[tuple[str, Any]]) -> int:
    """`teachers`: (source, tokenizer) pairs. Refuses, naming both sources and sizes, the first teacher whose
    vocabulary differs from the first teacher's; returns the shared size."""
    if not teachers:
        raise DistilError("advise: --teachers: expected at least one teacher, found none")
    first_src, first_tok = teachers[0]
    ref = first_tok.get_vocab()
    for src, tok in teachers[1:]:
        if tok is not first_tok and tok.get_vocab() != ref:
            raise DistilError(f"advise: teachers {first_src!r} ({len(first_tok)} tokens) and {src!r} ({len(tok)} "
                              f"tokens) have different vocabularies; a capacity sweep compares teachers of one "
                              f"vocabulary")
    return len(first_tok)


def train_teachers(teacher_recipe: str | Path, steps: Sequence[int], out: str | Path,
                   echo: Callable[[str], None] = print) -> list[str]:
    """Teachers of different strength from one teacher recipe: `train.steps` = each of `steps`, trained once into
    <out>/capacity-teacher-<steps>/student and reused when that directory is there (its recipe.yaml says what made
    it). Returns their student directories, weakest (fewest steps) first."""
    from distil.pipeline import run
    from distil.recipe import load_recipe

    dirs = []
    for n in sorted(steps):
        name = f"capacity-teacher-{n}"
        student = Path(out) / name / "student"
        if not (student / "config.json").is_file():
            echo(f"advise: training teacher {name} ({n} steps of {teacher_recipe})")
            run(load_recipe(teacher_recipe, [f"train.steps={n}", f"name={name}", f"output.dir={out}",
                                             "train.progress=false", "eval.enabled=false"]),
                overwrite=True, echo=lambda s: None)
        dirs.append(str(student))
    return dirs


def _quality(run_dir: Path, row: str) -> dict:
    """ppl (and task accuracy when the run had eval.task) of one eval row, from the run's eval.json."""
    record = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    out = {"ppl": record["results"][row]["ppl"]}
    task = record.get("generation", {}).get("task")
    if task and row in task["rows"]:
        out["accuracy"] = task["rows"][row]["accuracy"]
    return out


def chain_wins(direct: dict, chain: dict) -> bool:
    """The chain beat direct distillation: higher task accuracy when both have one (ties: lower perplexity), else
    lower held-out perplexity."""
    if "accuracy" in direct and "accuracy" in chain and direct["accuracy"] != chain["accuracy"]:
        return chain["accuracy"] > direct["accuracy"]
    return chain["ppl"] < direct["ppl"]


def sweep(recipe_path: str | Path, teachers: Sequence[str], overrides: Sequence[str] = (),
          assistant: dict | None = None, out: str | Path = "runs", echo: Callable[[str], None] = print) -> list[dict]:
    """One row per teacher (in the given order): the recipe's student distilled directly (the recipe's method) and,
    with `assistant` (config overrides of the student's config), through the TAKD chain, same recipe and budget."""
    from distil.models import count_params, load_model
    from distil.pipeline import run
    from distil.recipe import load_recipe

    loaded = [(src, load_model(src, role="teacher")) for src in teachers]
    check_vocabularies([(src, m.tokenizer) for src, m in loaded])
    params = {src: count_params(m.model) for src, m in loaded}
    del loaded
    base = load_recipe(recipe_path, list(overrides))
    if not base.eval.enabled:
        raise DistilError(f"{recipe_path}: eval.enabled: advise compares the students' held-out quality: expected "
                          f"true, found false")
    direct_method = base.distill.method if base.distill.method != "takd" else "offline"
    rows = []
    for i, src in enumerate(teachers):
        row: dict[str, Any] = {"teacher": src, "teacher_params": params[src]}
        variants = [("direct", direct_method, [])]
        if assistant is not None:
            variants.append(("takd", "takd", [f"takd.assistant={json.dumps(assistant)}"]))
        for tag, method, extra in variants:
            name = f"{base.name}-advise-t{i}-{tag}"
            echo(f"advise: teacher {src}: {tag} ({method})")
            recipe = load_recipe(recipe_path, [*overrides, f"teacher.source={src}", f"distill.method={method}",
                                               f"name={name}", f"output.dir={out}", "eval.hard_label_baseline=false",
                                               "export.enabled=false", "train.progress=false", *extra])
            res = run(recipe, overwrite=True, echo=lambda s: None)
            student_row = f"student ({method})"
            row[tag] = _quality(res.run_dir, student_row)
            row["teacher_quality"] = _quality(res.run_dir, "teacher")
            row["student_params"] = count_params(load_model(str(res.run_dir / "student")).model)
            if tag == "takd":
                row["assistant"] = _quality(res.run_dir, "assistant (takd)")
        if assistant is not None:
            row["chain_beats_direct"] = chain_wins(row["direct"], row["takd"])
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    acc = any("accuracy" in r["direct"] for r in rows)
    chain = any("takd" in r for r in rows)
    head = f"{'teacher':<44} {'params':>8} {'teacher ppl':>11} {'student ppl':>11}"
    head += f" {'teacher acc':>11} {'student acc':>11}" if acc else ""
    head += f" {'assistant ppl':>13} {'TAKD ppl':>9}" + (f" {'TAKD acc':>9}" if acc else "") + " chain beats direct" \
        if chain else ""
    lines = [head, "-" * len(head)]
    for r in rows:
        t, d = r["teacher_quality"], r["direct"]
        line = f"{r['teacher'][-44:]:<44} {r['teacher_params'] / 1e6:>7.2f}M {t['ppl']:>11.3f} {d['ppl']:>11.3f}"
        if acc:
            line += f" {100 * t.get('accuracy', float('nan')):>10.1f}% {100 * d.get('accuracy', float('nan')):>10.1f}%"
        if "takd" in r:
            c = r["takd"]
            line += f" {r['assistant']['ppl']:>13.3f} {c['ppl']:>9.3f}"
            if acc:
                line += f" {100 * c.get('accuracy', float('nan')):>8.1f}%"
            line += f" {'yes' if r['chain_beats_direct'] else 'no'}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Student quality against teacher quality (held-out perplexity, lower = stronger), direct and through the
    assistant; a second panel with task accuracy when there is one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = all("accuracy" in r["direct"] for r in rows)
    fig, axes = plt.subplots(1, 2 if acc else 1, figsize=(11 if acc else 6, 4.2), squeeze=False)
    keys = [("ppl", "held-out perplexity (lower is better)")] + ([("accuracy", "task accuracy")] if acc else [])
    order = sorted(rows, key=lambda r: -r["teacher_quality"]["ppl"])  # weakest teacher first
    for ax, (key, label) in zip(axes[0], keys):
        x = [r["teacher_quality"]["ppl"] for r in order]
        ax.plot(x, [r["direct"][key] for r in order], marker="o", label="student, direct")
        if all("takd" in r for r in order):
            ax.plot(x, [r["takd"][key] for r in order], marker="s", label="student, via assistant (TAKD)")
        ax.plot(x, [r["teacher_quality"][key] for r in order], marker="^", ls=":", label="teacher")
        ax.set_xlabel("teacher perplexity on held-out text (right = stronger teacher)")
        ax.set_ylabel(label)
        ax.invert_xaxis()  # stronger teachers to the right
        ax.legend(fontsize=8)
    fig.suptitle(title or "capacity gap: student quality vs teacher strength", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
