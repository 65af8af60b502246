"""The run report as a page: `report.html` beside `report.md`, one self-contained file a person opens offline.

Read from the run directory, never from memory, so any run directory (finished, stopped, evaluated again) can be
drawn: the training curves of every phase (metrics.jsonl: the loss and its named terms such as kd/ce, the
learning rate, the gradient norm), the eval table (eval.json), the answers, the task's pass@k curves and
distinct-n with the mode/diversity-collapse warnings, the dark-knowledge panels (dark_knowledge.json, written at
eval time: a few held-out positions with the teacher's and the student's top-k soft targets), and the export
(GGUF files and their sizes, the Modelfile).
Images are matplotlib PNGs embedded as base64 data URIs; no script, no stylesheet or font from anywhere else.
What is missing is said on the page instead of failing (a run without metrics.jsonl, without eval.json).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from distil.atomic import write_atomic

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
td:first-child,th:first-child{text-align:left}.missing{color:#a60}.warning{color:#b00;font-weight:bold}
img{max-width:100%}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap}
td.tok{text-align:left;font-family:monospace}code.ctx{background:#f6f6f6;white-space:pre-wrap}"""
CURVE_KEYS = ("tokens", "tokens_per_s", "elapsed_s", "lr", "grad_norm")  # not loss terms


def _e(x: Any) -> str:
    return html.escape(str(x))


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(the rows of a metrics.jsonl that parse as JSON objects with a step, how many lines did not)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=72)
    plt.close(fig)
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">'


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_section(run_dir: Path) -> str:
    """One figure per phase (the run's own metrics.jsonl, then every sub-directory's): loss terms, lr, grad norm."""
    found = [p for p in [run_dir / "metrics.jsonl", *sorted(run_dir.glob("*/metrics.jsonl"))] if p.is_file()]
    out = ["<h2>Training</h2>"]
    if not found:
        return out[0] + ('<p class="missing">No metrics.jsonl in this run directory: no training curves (the run '
                         'trained nothing, or its training did not start).</p>')
    plt = _plt()
    for path in found:
        rows, bad = read_metrics(path)
        name = path.parent.name if path.parent != run_dir else "main phase"
        out.append(f"<h3>{_e(name)} <small>({_e(path.relative_to(run_dir))}, {len(rows)} logged steps)</small></h3>")
        if bad:
            out.append(f'<p class="missing">{bad} line(s) of {_e(path.name)} are not metric rows and were skipped.</p>')
        if not rows:
            out.append('<p class="missing">No logged step yet.</p>')
            continue
        steps = [r["step"] for r in rows]
        terms = [k for k in rows[0] if k != "step" and k not in CURVE_KEYS
                 and all(isinstance(r.get(k), (int, float)) for r in rows)]
        panels = [("loss terms", terms), ("learning rate", ["lr"]), ("gradient norm (before clipping)", ["grad_norm"])]
        panels = [(t, [k for k in ks if any(isinstance(r.get(k), (int, float)) for r in rows)]) for t, ks in panels]
        panels = [(t, ks) for t, ks in panels if ks]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
        for ax, (title, keys) in zip(axes[0], panels):
            for k in keys:
                pts = [(s, r[k]) for s, r in zip(steps, rows) if isinstance(r.get(k), (int, float))]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 50 else None, label=k)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            if len(keys) > 1 or title == "loss terms":
                ax.legend(fontsize=7)
        fig.tight_layout()
        out.append(_png(fig))
        last = rows[-1]
        out.append("<p>last step " + _e(last["step"]) + ": " + ", ".join(
            f"{_e(k)} {v:.4g}" for k, v in last.items() if k != "step" and isinstance(v, (int, float))) + "</p>")
    return "\n".join(out)


def _table(head: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else _e(v)  # noqa: E731
    return ("<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows) + "</table>")


def eval_section(record: dict | None) -> str:
    out = ["<h2>Evaluation</h2>"]
    if record is None:
        return out[0] + '<p class="missing">No eval.json in this run directory (eval.enabled was off, or the run ' \
                        'stopped before its evaluation): no eval table.</p>'
    results, params = record.get("results") or {}, record.get("params") or {}
    keys = list(dict.fromkeys(k for m in results.values() if isinstance(m, dict) for k in m))
    out.append(f"<p>{_e(record.get('date', ''))}</p>")
    mparams = {n: f"{p / 1e6:.1f}M" if isinstance(p, (int, float)) else "" for n, p in params.items()}
    out.append(_table(["row", "params", *keys], [[n, mparams.get(n, ""), *(m.get(k, "") for k in keys)]
                                                for n, m in results.items() if isinstance(m, dict)]))
    gen = record.get("generation") or {}
    if gen.get("questions"):
        out.append("<h3>Answers to held-out prompts</h3>")
        for i, q in enumerate(gen["questions"]):
            out.append(f"<p><b>{_e(q)}</b></p>")
            out.append(_table(["row", "answer"], [[n, (texts[i] if i < len(texts) else "")]
                                                  for n, texts in (gen.get("answers") or {}).items()]))
    if isinstance(gen.get("task"), dict):
        out.append(task_section(gen["task"]))
    return "\n".join(out)


def task_section(task: dict) -> str:
    """The task table; with samples the pass@k curves (k = 1..n) and distinct-1/2 per row, and the warnings."""
    from distil.eval.answers import diversity_warnings, pass_curve

    rows, n = task.get("rows") or {}, int(task.get("samples") or 1)
    out = [f"<h3>Task {_e(task.get('name'))} ({_e(task.get('size'))} eval questions, {n} sample(s) each)</h3>"]
    keys = [k for k in ("accuracy", "pass@1", f"pass@{n}", "distinct-1", "distinct-2", "self_bleu_per_prompt",
                        "mean_length", "truncated") if any(k in m for m in rows.values())]
    keys = list(dict.fromkeys(keys))
    out.append(_table(["row", *keys], [[name, *(m.get(k, "") for k in keys)] for name, m in rows.items()]))
    curves = {name: pass_curve(m, n) for name, m in rows.items()}
    if n > 1 and any(curves.values()):
        plt = _plt()
        fig, (a, b) = plt.subplots(1, 2, figsize=(9.5, 3.2))
        for name, curve in curves.items():
            if curve:
                a.plot(range(1, n + 1), curve, marker=".", label=name)
        a.set_xlabel("k", fontsize=8)
        a.set_title("pass@k (unbiased, Chen et al. 2021)", fontsize=9)
        a.set_ylim(0, 1)
        a.legend(fontsize=7)
        names = [nm for nm in rows if "distinct-2" in rows[nm]]
        for j, key in enumerate(("distinct-1", "distinct-2")):
            b.bar([i + 0.4 * j for i in range(len(names))], [rows[nm].get(key, 0) for nm in names], 0.4, label=key)
        b.set_xticks([i + 0.2 for i in range(len(names))])
        b.set_xticklabels(names, rotation=20, fontsize=7)
        b.set_title("diversity of the samples", fontsize=9)
        b.legend(fontsize=7)
        fig.tight_layout()
        out.append(_png(fig))
    out.extend(f'<p class="warning">{_e(w)}</p>' for w in diversity_warnings(task))
    return "\n".join(out)


def _tok(s: Any) -> str:
    """A token as the page shows it: repr (whitespace and newlines visible), at most 24 characters."""
    text = repr(s) if isinstance(s, str) else "(end)"
    return text if len(text) <= 24 else text[:23] + "…"


def _dk_missing(recipe: dict) -> str:
    """One line saying why a run directory has no dark_knowledge.json."""
    ev = recipe.get("eval") or {}
    if not recipe:
        why = "no readable recipe.yaml either"
    elif ev.get("enabled") is False:
        why = "eval.enabled was off; the panels are computed at eval time"
    elif ev.get("dark_knowledge") == 0:
        why = "eval.dark_knowledge: 0 switched them off"
    elif not (recipe.get("teacher") or {}).get("source"):
        why = "the run has no teacher"
    else:
        why = ("the teacher and the student do not share a vocabulary, the run stopped before its evaluation, or "
               "it was made before the panels existed; <code>distil eval RUN_DIR</code> writes them")
    return f'<p class="missing">No dark_knowledge.json in this run directory: no dark-knowledge panels ({why}).</p>'


def dark_knowledge_section(run_dir: Path, recipe: dict) -> str:
    """dark_knowledge.json (distil/eval/inspect.py: write_dark_knowledge) as one table per held-out position
    (context -> next token; per model and temperature the entropy, the mass outside the top-1 and the top-k soft
    targets; KL(teacher || student)) and one figure: per position, the teacher's and the student's probability
    of each of the teacher's top-k tokens at T = 1."""
    head = "<h2 id=\"dark-knowledge\">Dark knowledge</h2>"
    path = run_dir / "dark_knowledge.json"
    if not path.is_file():
        return head + _dk_missing(recipe)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        positions = record["positions"]
        temps = [float(t) for t in record["temperatures"]]
        for p in positions:  # the shapes the panels index (a check, not an assert: it must hold under python -O)
            shaped = all(len(p[name]) == len(temps) and all(len(st["tokens"]) == len(st["probs"]) for st in p[name])
                         for name in ("teacher", "student"))
            if not (shaped and len(p["kl"]) == len(temps) and len(p["student_on_teacher_top"]) == len(temps)):
                raise ValueError("dark_knowledge.json: a position's lists do not match its temperatures")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        return head + _DK_UNREADABLE
    try:  # a record of the right shape with a wrong value inside (a string for a number ...): the same line
        return head + _dk_panels(record, positions, temps)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        _plt().close("all")
        return head + _DK_UNREADABLE


_DK_UNREADABLE = '<p class="missing">dark_knowledge.json is not a readable dark-knowledge record: no panels.</p>'


def _dk_panels(record: dict, positions: list[dict], temps: list[float]) -> str:
    student = record.get("student", "student")
    out = [f"<p>Teacher <code>{_e(record.get('teacher', '?'))}</code> vs {_e(student)} on "
           f"{len(positions)} position(s) of held-out example {_e(record.get('example', '?'))} "
           f"({_e(record.get('example_tokens', '?'))} tokens, {_e(record.get('target_positions', '?'))} target "
           f"positions; over those, mean KL(teacher&#8214;student) at T=1 "
           f"{float(record.get('mean_kl', float('nan'))):.4f} nats, a different argmax at "
           f"{_e(record.get('argmax_differs', '?'))}). Position i is after reading token i: its soft targets "
           f"predict token i + 1. The teacher's probability outside its top-1 (1-top1) is the dark knowledge "
           f"a student learns from soft targets.</p>"]
    if positions:
        out.append(_dk_figure(positions, temps))
    for p in positions:
        nxt = _tok(p.get("next"))
        context = str(p.get("context", "")).replace("\n", "\u23ce")  # a newline shown as one, in the heading
        out.append(f"<h3>position {_e(p['position'])}: <code class=\"ctx\">{_e(context)}</code> "
                   f"&rarr; <code>{_e(nxt)}</code> <small>({_e('; '.join(p.get('why') or []))})</small></h3>")
        rows = []
        for name in ("teacher", "student"):
            for st in p[name]:
                targets = "&nbsp; ".join(f"{_e(_tok(t))}&nbsp;{pr:.3f}" for t, pr in zip(st["tokens"], st["probs"]))
                rows.append(f"<tr><td>{_e(name)}</td><td>{st['T']:g}</td><td>{st['entropy']:.4f}</td>"
                            f"<td>{st['outside_top1']:.4f}</td><td class=\"tok\">{targets}</td></tr>")
        out.append("<table><tr><th>model</th><th>T</th><th>entropy (nats)</th><th>1-top1</th>"
                   f"<th>top-{len(p['teacher'][0]['ids'])} soft targets</th></tr>" + "".join(rows) + "</table>")
        kls = ", ".join(f"T={t:g}: {x:.4f}" for t, x in zip(temps, p["kl"]))
        pn = "" if p.get("teacher_p_next") is None else \
            (f"; p({_e(nxt)}): teacher {p['teacher_p_next']:.3f}, student {p.get('student_p_next', float('nan')):.3f}")
        out.append(f"<p>KL(teacher&#8214;student) {kls}"
                   + ("; <b>argmax differs</b>" if p.get("argmax_differs") else "; same argmax") + pn + "</p>")
    return "\n".join(out)


def _mpl_text(s: str) -> str:
    return s.replace("$", r"\$")  # a literal dollar, not matplotlib's mathtext


def _dk_figure(positions: list[dict], temps: list[float], cols: int = 4) -> str:
    """Per position, bars of the teacher's and the student's probability of the teacher's top-k tokens at T = 1
    (the first temperature)."""
    plt = _plt()
    rows = (len(positions) + cols - 1) // cols
    ncols = min(cols, len(positions))
    fig, axes = plt.subplots(rows, ncols, figsize=(3.4 * ncols, 3.1 * rows), squeeze=False)
    for ax in axes.flat[len(positions):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, positions):
        teacher = p["teacher"][0]
        xs = range(len(teacher["ids"]))
        ax.bar([x - 0.2 for x in xs], teacher["probs"], 0.4, label="teacher")
        ax.bar([x + 0.2 for x in xs], p["student_on_teacher_top"][0], 0.4, label="student", hatch="//")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_mpl_text(_tok(t)[:12]) for t in teacher["tokens"]], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, min(1.0, 1.15 * max([*teacher["probs"], *p["student_on_teacher_top"][0], 1e-6])))
        ax.set_title(_mpl_text(f"pos {p['position']} -> {_tok(p.get('next'))[:14]}  KL {p['kl'][0]:.3g}"),
                     fontsize=8)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"teacher's top-{len(positions[0]['teacher'][0]['ids'])} tokens at T={temps[0]:g}: "
                 f"teacher vs student probability", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def export_section(run_dir: Path, recipe: dict) -> str:
    spec = recipe.get("export") or {}
    if not spec.get("enabled"):
        return ""
    out = ["<h2>Export</h2>"]
    ggufs = [Path(spec["path"])] if spec.get("path") else sorted((run_dir / "export").glob("*.gguf"))
    ggufs = [p for p in ggufs if p.is_file()]
    if not ggufs:
        return out[0] + '<p class="missing">export.enabled, but no GGUF file was found (the run stopped before ' \
                        'its export?).</p>'
    out.append(_table(["file", "quant", "size (MB)"], [[p.name, spec.get("quant", ""), p.stat().st_size / 1e6]
                                                       for p in ggufs]))
    modelfile = ggufs[0].with_suffix(".Modelfile")  # export_gguf writes <name>-<quant>.Modelfile beside the GGUF
    if modelfile.is_file():
        out.append(f"<p>Ollama: <code>ollama create {_e(recipe.get('name', 'NAME'))} -f {_e(modelfile)}</code></p>"
                   f"<pre>{_e(modelfile.read_text(encoding='utf-8', errors='replace')[:2000])}</pre>")
    if spec.get("prompt"):
        out.append(answer_section(run_dir, spec["prompt"]))
    return "\n".join(out)


def answer_section(run_dir: Path, prompt: str) -> str:
    """llama.cpp's answers to export.prompt (export/answer.json, written by the export stage): each row's text,
    generation speed and file size."""
    path = run_dir / "export" / "answer.json"
    head = f"<p>llama.cpp&gt; <code>{_e(prompt)}</code></p>"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        answers = record["answers"]
        rows = [[label, a.get("text", "").strip() or "(empty: the model ended its turn at once)",
                 a.get("tokens_per_s") or "", a.get("bytes", 0) / 1e6] for label, a in answers.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return head + '<p class="missing">No readable export/answer.json: llama.cpp\'s answer was printed by ' \
                      '<code>distil run</code> only (llama-cpp-python missing, or a run made before it was ' \
                      'recorded).</p>'
    return head + _table(["model", "answer", "tokens/s", "file (MB)"], rows)


def _loss_name(recipe: dict) -> str:
    """The objective as the run header names it (Method.loss_name) from recipe.yaml: `onpolicy.loss=jsd` for a
    method whose own section holds it, distill.loss otherwise."""
    from distil.methods import METHODS

    method = METHODS.get(str((recipe.get("distill") or {}).get("method")), METHODS["offline"])
    section, field = method.loss_key.split(".")
    part = recipe.get(section)
    return method.format_loss(part.get(field, "?") if isinstance(part, dict) else "?")


def write_page(run_dir: str | Path) -> Path:
    """Write run_dir/report.html from what the run directory holds; returns its path."""
    import yaml

    run_dir = Path(run_dir)
    recipe: dict = {}
    try:
        loaded = yaml.safe_load((run_dir / "recipe.yaml").read_text(encoding="utf-8"))
        recipe = loaded if isinstance(loaded, dict) else {}
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        pass
    record = None
    try:
        loaded = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
        record = loaded if isinstance(loaded, dict) else None
    except (OSError, ValueError, UnicodeDecodeError):
        pass
    name = recipe.get("name") or run_dir.name
    distill, train = recipe.get("distill") or {}, recipe.get("train") or {}
    loss = _loss_name(recipe)
    summary = (f"<p>Teacher <code>{_e((recipe.get('teacher') or {}).get('source', '?'))}</code>, student "
               f"<code>{_e((recipe.get('student') or {}).get('source', '?'))}</code>; method "
               f"<code>{_e(distill.get('method', '?'))}</code>, loss <code>{_e(loss)}</code>, "
               f"{_e(train.get('steps', '?'))} steps.</p>") if recipe else \
        '<p class="missing">No readable recipe.yaml in this run directory.</p>'
    body = [f"<h1>{_e(name)}</h1>", summary, training_section(run_dir), eval_section(record),
            dark_knowledge_section(run_dir, recipe), export_section(run_dir, recipe)]
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: distil run report'
            f"</title><style>{STYLE}</style></head><body>\n" + "\n".join(b for b in body if b) + "\n</body></html>\n")
    write_atomic(run_dir / "report.html", page)
    return run_dir / "report.html"
