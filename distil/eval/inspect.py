"""`distil inspect MODEL_OR_RUN --text "..."`: the soft targets behind each next token, as a table and a PNG.

A run directory shows its teacher (recipe.yaml's teacher.source) and its trained student (student/) side by
side on the same tokens; any other target (a Hugging Face directory, a .gguf file, `embedded:NAME`) is shown
alone. The numbers come from distil/eval/diagnostics.py (float64): per position and temperature the top-k soft
targets, the entropy and the mass outside the top-1; with two models KL(teacher || student) per position and
the positions where they disagree most.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from distil.errors import DistilError
from distil.eval.diagnostics import PositionView, choose_panels, disagreement, entropy, inspect_positions, \
    most_disagreeing, tempered_softmax

DEFAULT_SHOWN = 32  # positions shown when --positions is not given (all of a short text)


@dataclass
class Inspection:
    text_ids: list[int]
    names: list[str]  # "teacher", "student", or the one model's source
    views: list[PositionView]
    logits: dict[str, torch.Tensor]  # name -> [N, V] float32 (the shared vocabulary)
    temperatures: list[float]
    worst: list[int]  # positions where teacher and student disagree most (two models only)
    note: str = ""


def parse_temperatures(text: str) -> list[float]:
    try:
        temps = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        temps = []
    if not temps or not all(t > 0 and t == t and t != float("inf") for t in temps):
        raise DistilError(f"--temperatures: expected comma-separated numbers > 0 (e.g. 1,2,4), found {text!r}")
    return temps


def parse_positions(text: str | None, n: int) -> list[int] | None:
    """'3,7,-1' -> [3, 7, n-1]; None -> None (the default choice). Out of range: one line."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            i = int(part)
        except ValueError:
            raise DistilError(f"--positions: expected comma-separated integers, found {part.strip()!r}") from None
        if not -n <= i < n:
            raise DistilError(f"--positions: position {i} is out of range: the text has {n} tokens (positions "
                              f"0..{n - 1}, or -{n}..-1 from the end)")
        out.append(i % n)
    return list(dict.fromkeys(out))


def load_target(target: str) -> tuple[dict[str, Any], Any]:
    """{name: model} in display order and the shared tokenizer."""
    from distil.models import check_same_vocab, load_model, load_teacher

    path = Path(target)
    if (path / "recipe.yaml").is_file():
        from distil.recipe import load_recipe

        recipe = load_recipe(path / "recipe.yaml")
        if not (path / "student" / "config.json").is_file():
            raise DistilError(f"{path}: a run directory without a saved student (student/config.json); inspect a "
                              f"model directory instead, or run with output.save_student: true")
        teacher = load_teacher(recipe)
        student = load_model(str(path / "student"), teacher=teacher, role="student")
        if teacher is None:
            return {"student": student.model}, student.tokenizer
        check_same_vocab(teacher, student)  # one line naming both tokenizers when they differ
        return {"teacher": teacher.model, "student": student.model}, student.tokenizer
    if not (target.startswith(("embedded:", "config:")) or path.exists()):
        raise DistilError(f"{target}: expected a run directory, a model directory, a .gguf file or embedded:NAME, "
                          f"found nothing")
    loaded = load_model(target)
    return {target: loaded.model}, loaded.tokenizer


def context_limit(models: dict[str, Any]) -> int | None:
    limits = [getattr(m.config, "max_position_embeddings", None) for m in models.values()]
    limits = [x for x in limits if x]
    return min(limits) if limits else None


@torch.no_grad()
def model_logits(model: Any, ids: list[int], vocab: int) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        out = model(input_ids=torch.tensor([ids], device=model.device)).logits[0, :, :vocab]
    finally:
        model.train(was)
    return out.float().cpu()


def inspect_text(models: dict[str, Any], tok: Any, text: str, *, positions: str | None = None,
                 temperatures: list[float] = (1.0, 2.0, 4.0), k: int = 5,
                 warn: Callable[[str], None] = print) -> Inspection:
    if k < 1:
        raise DistilError(f"--top-k: expected an integer >= 1, found {k}")
    ids = list(tok(text)["input_ids"])
    if not ids:
        raise DistilError("--text: expected some text, found none (no tokens)")
    limit = context_limit(models)
    if limit and len(ids) > limit:
        warn(f"warning: --text has {len(ids)} tokens, longer than the model's context of {limit} "
             f"(max_position_embeddings): truncated to the first {limit}")
        ids = ids[:limit]
    vocab = len(tok)
    logits = {name: model_logits(m, ids, vocab) for name, m in models.items()}
    names = list(logits)
    chosen = parse_positions(positions, len(ids))
    worst: list[int] = []
    if len(names) == 2:
        kl, differs = disagreement(logits[names[0]], logits[names[1]])
        worst = most_disagreeing(kl, differs, 5)
    note = ""
    if chosen is None:
        chosen = list(range(min(len(ids), DEFAULT_SHOWN)))
        if len(ids) > DEFAULT_SHOWN:
            note = f"showing positions 0..{DEFAULT_SHOWN - 1} of {len(ids)}; choose others with --positions"
    views = inspect_positions(ids, logits, chosen, list(temperatures), k)
    return Inspection(ids, names, views, logits, list(temperatures), worst, note)


def _tok(tok: Any, i: int | None, width: int = 12) -> str:
    if i is None:
        return "(end)"
    s = repr(tok.decode([i]))
    return s if len(s) <= width else s[:width - 1] + "…"


def format_inspection(ins: Inspection, tok: Any) -> str:
    """The table: per position and model, one line per temperature (entropy, mass outside the top-1, top-k)."""
    two = len(ins.names) == 2
    width = max(len(n) for n in ins.names)
    lines = [f"{'pos':>4}  {'token':<12} -> {'next':<12}  {'model':<{width}}  {'T':>4}  {'H nats':>7}  "
             f"{'1-top1':>6}  top-{len(ins.views[0].models[ins.names[0]][0].ids)} soft targets"]
    for v in ins.views:
        head = f"{v.position:>4}  {_tok(tok, v.token):<12} -> {_tok(tok, v.next_token):<12}"
        for name in ins.names:
            for st in v.models[name]:
                targets = "  ".join(f"{_tok(tok, i)} {p:.3f}" for i, p in zip(st.ids, st.probs))
                lines.append(f"{head}  {name:<{width}}  {st.temperature:>4g}  {st.entropy:>7.3f}  "
                             f"{st.outside_top1:>6.3f}  {targets}")
                head = " " * len(head)
        if two:
            kls = "  ".join(f"T={t:g}: {x:.4f}" for t, x in v.kl.items())
            lines.append(f"{head}  KL({ins.names[0]}||{ins.names[1]}) {kls}"
                         + ("  argmax differs" if v.argmax_differs else ""))
    if ins.note:
        lines.append(ins.note)
    if two:
        a, b = ins.names
        kl, differs = disagreement(ins.logits[a], ins.logits[b])
        lines.append(f"where {a} and {b} disagree most (KL({a}||{b}) at T=1, over all {len(ins.text_ids)} "
                     f"positions; mean {float(kl.mean()):.4f}, argmax differs at {int(differs.sum())}):")
        for i in ins.worst:
            nxt = ins.text_ids[i + 1] if i + 1 < len(ins.text_ids) else None
            pa, pb = tempered_softmax(ins.logits[a][i]), tempered_softmax(ins.logits[b][i])
            ta, tb = int(pa.argmax()), int(pb.argmax())
            lines.append(f"  pos {i:>3} {_tok(tok, ins.text_ids[i])} -> {_tok(tok, nxt)}: KL {float(kl[i]):.4f}; "
                         f"{a} {_tok(tok, ta)} {float(pa[ta]):.3f}, {b} {_tok(tok, tb)} {float(pb[tb]):.3f}"
                         + (" (argmax differs)" if bool(differs[i]) else ""))
    return "\n".join(lines)


def draw_inspection(ins: Inspection, tok: Any, path: str | Path, panels: int = 6) -> Path:
    """A PNG: entropy (and KL) per position over the whole text, then one bar panel per shown position (up to
    `panels`): the first model's top-k tokens at T=1, their probability under every model and temperature."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    views = ins.views[:panels]
    cols = min(3, len(views))
    rows = 1 + (len(views) + cols - 1) // cols
    fig = plt.figure(figsize=(4.2 * cols + 1, 2.8 * rows), dpi=90)
    ax = fig.add_subplot(rows, 1, 1)
    xs = range(len(ins.text_ids))
    for name in ins.names:
        ax.plot(xs, entropy(tempered_softmax(ins.logits[name])).numpy(), marker=".", label=f"H {name}")
    if len(ins.names) == 2:
        kl, _ = disagreement(ins.logits[ins.names[0]], ins.logits[ins.names[1]])
        ax.plot(xs, kl.numpy(), marker="x", label=f"KL({ins.names[0]}||{ins.names[1]})")
    ax.set_xlabel("position")
    ax.set_ylabel("nats (T=1)")
    ax.legend(fontsize=7)
    first = ins.names[0]
    series = [(n, t) for n in ins.names for t in ins.temperatures]
    width = 0.8 / len(series)
    for j, v in enumerate(views):
        pax = fig.add_subplot(rows, cols, cols + j + 1)
        ids = v.models[first][0].ids
        for s, (name, t) in enumerate(series):
            p = tempered_softmax(ins.logits[name][v.position], t)
            pax.bar([x + s * width for x in range(len(ids))], [float(p[i]) for i in ids], width,
                    label=f"{name} T={t:g}", hatch="//" if name != first else None)
        pax.set_xticks([x + 0.4 - width / 2 for x in range(len(ids))])
        pax.set_xticklabels([_tok(tok, i, 10) for i in ids], rotation=30, fontsize=7)
        pax.set_title(f"pos {v.position}: {_tok(tok, v.token)} -> {_tok(tok, v.next_token)}", fontsize=8)
        pax.set_ylim(0, 1)
        if j == 0:
            pax.legend(fontsize=6)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


def inspect_target(target: str, text: str, *, positions: str | None = None, temperatures: str = "1,2,4",
                   k: int = 5, png: str | None = None, warn: Callable[[str], None] = print) -> str:
    """`distil inspect`: load, compute, format (and draw). Returns the table."""
    temps = parse_temperatures(temperatures)
    if k < 1:
        raise DistilError(f"--top-k: expected an integer >= 1, found {k}")
    models, tok = load_target(target)
    ins = inspect_text(models, tok, text, positions=positions, temperatures=temps, k=k, warn=warn)
    table = format_inspection(ins, tok)
    if png:
        table += f"\nwrote {draw_inspection(ins, tok, png)}"
    return table


# ----------------------------------------------------------------------------------------------
# report.html's dark-knowledge panels: a few held-out positions of a finished run, computed at eval time

DK_FILE = "dark_knowledge.json"
DK_TEMPERATURES = (1.0, 2.0)
DK_TOP_K = 5
DK_CONTEXT = 16  # tokens of context shown up to each position (the heading of its table)
DK_WINDOW = 128  # target positions considered (the example's first ones): bounds the forward and the float64 work
DK_CHUNK = 16  # positions per float64 [positions x vocab] temporary (a 152k vocabulary: 19 MB each)


def target_positions(example: dict) -> list[int]:
    """Positions i whose next token i + 1 is a target (labels[i + 1] is not ignored): the positions the training
    loss and the eval metrics score (the response of a prompt/response record, every token of plain text)."""
    from distil.data import IGNORE

    labels = example.get("labels") or []
    return [i for i in range(len(labels) - 1) if labels[i + 1] != IGNORE]


def _soft(st: Any, tok: Any) -> dict:
    return {"T": st.temperature, "ids": st.ids, "tokens": [tok.decode([i]) for i in st.ids], "probs": st.probs,
            "entropy": st.entropy, "outside_top1": st.outside_top1}


def held_out_dark_knowledge(teacher: Any, student: Any, tok: Any, examples: list[dict], n: int, vocab: int, *,
                            k: int = DK_TOP_K, temperatures: tuple[float, ...] = DK_TEMPERATURES) -> dict | None:
    """The dark-knowledge record of report.html: on the first held-out example with target tokens, one forward of
    each model, then `n` of its (first DK_WINDOW) target positions (diagnostics.choose_panels: the n - 1 where teacher and student
    disagree most, plus the teacher's most uncertain one) with both models' top-k soft targets, entropy and mass
    outside the top-1 at every temperature, KL(teacher || student) and p(the actual next token). All numbers from
    diagnostics.py (float64, from the models' float32 logits); tokens decoded. None when there is nothing to show
    (n = 0, no held-out example with targets)."""
    found = next(((j, ex) for j, ex in enumerate(examples) if target_positions(ex)), None)
    if n < 1 or found is None:
        return None
    index, example = found
    candidates = target_positions(example)[:DK_WINDOW]
    # the models read up to the last candidate's next token: a causal model's logits at earlier positions do not
    # depend on what follows, so a long example costs no more than its first DK_WINDOW targets
    ids = list(example["input_ids"])[:candidates[-1] + 2]
    logits = {"teacher": model_logits(teacher, ids, vocab), "student": model_logits(student, ids, vocab)}
    kl = torch.zeros(len(ids), dtype=torch.float64)  # per position, filled at the candidates only, in chunks
    ent = torch.zeros(len(ids), dtype=torch.float64)
    differs = torch.zeros(len(ids), dtype=torch.bool)
    for j in range(0, len(candidates), DK_CHUNK):
        rows = torch.tensor(candidates[j:j + DK_CHUNK])
        kl[rows], differs[rows] = disagreement(logits["teacher"][rows], logits["student"][rows])
        ent[rows] = entropy(tempered_softmax(logits["teacher"][rows]))
    chosen = choose_panels(kl, differs, ent, candidates, n)
    views = inspect_positions(ids, logits, [i for i, _ in chosen], list(temperatures), k)
    positions = []
    for (i, why), view in zip(chosen, views):
        start = max(0, i + 1 - DK_CONTEXT)
        nxt = view.next_token
        entry = {"position": i, "why": why, "context": ("…" if start else "") + tok.decode(ids[start:i + 1]),
                 "token": tok.decode([view.token]), "next": None if nxt is None else tok.decode([nxt]),
                 "next_id": nxt, "argmax_differs": view.argmax_differs,
                 "kl": [view.kl[t] for t in temperatures]}
        for name in ("teacher", "student"):
            entry[name] = [_soft(st, tok) for st in view.models[name]]
            if nxt is not None:  # how much each model gives the token that actually follows, at T = 1
                entry[f"{name}_p_next"] = float(tempered_softmax(logits[name][i])[nxt])
        # the bar figure: the student's probabilities on the teacher's top-k tokens, per temperature
        entry["student_on_teacher_top"] = [[float(tempered_softmax(logits["student"][i], st.temperature)[v])
                                            for v in st.ids] for st in view.models["teacher"]]
        positions.append(entry)
    idx = torch.tensor(candidates)
    return {"format": 1, "example": index, "example_tokens": len(ids), "target_positions": len(candidates),
            "temperatures": list(temperatures), "top_k": k, "mean_kl": float(kl[idx].mean()),
            "argmax_differs": int(differs[idx].sum()), "positions": positions}


def write_dark_knowledge(run_dir: str | Path, recipe: Any, teacher: Any, student: Any, tok: Any,
                         examples: list[dict], vocab: int, row: str = "student") -> Path | None:
    """`<run_dir>/dark_knowledge.json` (atomically) for report.html, at eval time of `distil run` and
    `distil eval`. Writes nothing when eval.dark_knowledge is 0 or there is no teacher sharing the student's
    vocabulary (`teacher` None: the caller passes None across tokenizers, where the teacher cannot score the
    student's tokens); the page then says why the panels are missing. Returns the path written, or None."""
    import json

    from distil.atomic import write_atomic

    n = recipe.eval.dark_knowledge
    if not n or teacher is None or student is None:
        return None
    record = held_out_dark_knowledge(teacher, student, tok, examples, n, vocab)
    if record is None:
        return None
    record = {"teacher": recipe.teacher.source, "student": row, **record}
    path = Path(run_dir) / DK_FILE
    write_atomic(path, json.dumps(record, indent=1, ensure_ascii=False))
    return path
