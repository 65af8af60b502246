"""`distil run`: the stages a recipe names, in order, into one run directory. The same code for every method.

recipe -> models (teacher, student) -> data -> method.prepare (an artifact, optional) -> method.build (phases +
finalize) -> THE loop per phase -> controls -> save -> eval (every row in one teacher pass) -> export.
The run directory `<output.dir>/<name>/` holds recipe.yaml (resolved), metrics.jsonl, checkpoints/, student/,
eval.json and report.md. The method contract is in distil/methods/contract.py and docs/design.md.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from distil import data as data_mod
from distil.errors import DistilError, crash_point
from distil.eval.answers import format_answers, format_task, generation_eval, held_out_prompts
from distil.eval.metrics import evaluate, format_table
from distil.methods import METHODS
from distil.methods.contract import Context, Phase, Trainable
from distil.methods.hard_labels import build_hard_labels
from distil.models import (Loaded, check_same_vocab, count_params, load_student, tokenizer_name,  # noqa: F401
                           load_teacher, save_student)
from distil.recipe import Recipe, dump_recipe, recipe_from_dict, recipe_to_dict
from distil.report_html import write_page
from distil.atomic import write_atomic
from distil.checkpoint import list_checkpoints, resolve_resume
from distil.trainer import make_accelerator, train

CONTROL = "student (hard_labels)"
# Keys a resumed run may change: they do not change what the run computes, only how long, how often it
# logs/saves, and what happens after training.
RESUMABLE_CHANGES = ("train.steps", "train.progress", "train.log_every", "train.save_every", "train.keep_last",
                     "train.threads", "train.report_to", "eval.batch_size", "eval.dark_knowledge", "export.",
                     "output.save_student", "output.report_html")


@dataclass
class RunResult:
    run_dir: Path
    eval: dict | None
    student_dir: Path | None
    table: str | None


# ----------------------------------------------------------------------------------------------
# The run directory


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _check_resume(recipe: Recipe, run_dir: Path, resume: str) -> None:
    """A resumed run must be the same run: refuse a changed recipe (naming the first changed key) before anything
    is written, and a run that never started."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        raise DistilError(f"{run_dir}: --resume: nothing to resume (no recipe.yaml: the run never started); "
                          f"run without --resume")
    try:
        before = yaml.safe_load(saved.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError):
        raise DistilError(f"{saved}: --resume: the run's recipe.yaml is not valid YAML") from None
    if resume != "latest":  # an explicit checkpoint: complete, and one of this run's own
        path = resolve_resume(resume, Path(resume).parent)
        if run_dir.resolve() not in path.resolve().parents:
            raise DistilError(f"{path}: --resume: expected a checkpoint of the run {run_dir}, found one elsewhere")
    try:  # the saved recipe with today's defaults filled in: a key added to distil since the run started reads as
        # its default (what the run did), not as a change; one that no longer parses is compared as written
        old = _flatten(recipe_to_dict(recipe_from_dict(before, str(saved))))
    except DistilError:
        old = _flatten(before if isinstance(before, dict) else {})
    new = _flatten(recipe_to_dict(recipe))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES):
            raise DistilError(f"{saved}: --resume: {key}: the run was made with {old.get(key)!r}, the recipe now says "
                              f"{new.get(key)!r}; resume with the run's own recipe, or start a new run (name=...)")


def check_run_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> Path:
    """Everything about the run directory that can be refused before models are loaded: nothing is written."""
    out = Path(recipe.output.dir)
    run_dir = out / recipe.name
    for path, key in ((out, "output.dir"), (run_dir, "name")):
        if path.exists() and not path.is_dir():
            raise DistilError(f"{path}: {key}: expected a directory, found a file")
    ancestor = out
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DistilError(f"{out}: output.dir: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise DistilError(f"{out}: output.dir: {ancestor} is not writable")
    if resume:
        _check_resume(recipe, run_dir, resume)
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise DistilError(f"{run_dir}: the run directory already exists; pass --resume to continue it, "
                          f"--overwrite to replace it, or name=... for a new run")
    return run_dir


def prepare_run_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> Path:
    run_dir = check_run_dir(recipe, resume, overwrite)
    try:
        if run_dir.exists() and any(run_dir.iterdir()) and overwrite and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")
    except OSError as exc:
        raise DistilError(f"{run_dir}: output.dir: cannot write the run directory ({exc.strerror or exc})") from None
    return run_dir


def _drop_unstarted(run_dir: Path) -> None:
    """A method that refuses its input while building (after the run directory was made) leaves no half-made run:
    a directory holding nothing but the recipe.yaml this call wrote is removed, so the same command can be rerun
    without --overwrite. Anything else in it (written by the method) stays."""
    try:
        if run_dir.is_dir() and [p.name for p in run_dir.iterdir()] == ["recipe.yaml"]:
            (run_dir / "recipe.yaml").unlink()
            run_dir.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Phases


def _phase_resume(resume: str | None, ckpt_root: Path) -> str | None:
    """`--resume` for one phase: an explicit checkpoint belongs to the phase whose checkpoints/ holds it; any other
    phase of a resumed run continues from its newest checkpoint, or starts (it never saved one)."""
    if not resume:
        return None
    if resume != "latest" and Path(resume).resolve().parent == ckpt_root.resolve():
        return resume
    return "latest" if list_checkpoints(ckpt_root) else None


def run_phase(phase: Phase, ctx: Context, resume: str | None, acc: Any) -> Any:
    """One phase through THE loop, in its sub-directory of the run (metrics.jsonl, checkpoints/)."""
    recipe, echo = ctx.recipe, ctx.echo
    phase_dir = ctx.run_dir / phase.subdir if phase.subdir else ctx.run_dir
    res = train(phase.module, phase.loss_fn, phase.examples, recipe.train, run_dir=phase_dir, seed=recipe.seed,
                pad_id=ctx.pad_id,
                resume=_phase_resume(resume, phase_dir / "checkpoints"), accelerator=acc, tag=phase.name,
                count=phase.count, before_step=phase.before_step, after_step=phase.after_step, collate=phase.collate)
    echo(f"{phase.name}: trained {res.steps} steps, {res.tokens} target tokens in {res.seconds:.0f}s "
         f"({res.tokens / max(res.seconds, 1e-9):.0f} tokens/s); final loss {res.last_loss:.4f}")
    return res


def pair_vocabulary(method: Any, recipe: Recipe, teacher: Loaded | None, student: Loaded) -> tuple[int, bool]:
    """(the vocabulary size the losses use, whether teacher and student share one vocabulary). A method that
    compares token distributions across two vocabularies is refused in one line naming both tokenizers and the
    methods that do work across them. One vocabulary means one token-to-id map: embedding matrices padded beyond it
    (151,936 vs 152,064 rows in one family) are the same vocabulary, their logits sliced to the tokenizer's length.
    The teacher then reads the student's token ids, so both must add the same BOS (compat.check_bos: a Gemma
    teacher would read every example without the BOS it needs)."""
    if teacher is None:
        return len(student.tokenizer), True
    tt, ts = teacher.tokenizer, student.tokenizer
    if tt is ts or tt.get_vocab() == ts.get_vocab():
        if tt is not ts:
            from distil.compat import check_bos

            check_bos(tt, ts)
        return check_same_vocab(teacher, student), True
    if method.tokenizer_use(recipe) == "same":
        # a method whose options decide says which ones in its function's docstring
        across = ", ".join(m.name + (f" ({(m.tokenizers.__doc__ or 'without token-level KD').strip()})"
                                     if callable(m.tokenizers) else "")
                           for m in METHODS.values() if m.tokenizers != "same") or "none"
        raise DistilError(f"teacher tokenizer {tokenizer_name(tt)!r} ({len(tt)} tokens) and student tokenizer "
                          f"{tokenizer_name(ts)!r} ({len(ts)} tokens) differ: method {method.name!r} compares token "
                          f"distributions and needs one vocabulary; methods that work across tokenizers: {across}")
    return len(ts), False


def hard_label_control(initial: torch.nn.Module, ctx: Context) -> Phase:
    """The control row: the same initial student, data, steps and schedule, hard labels only."""
    control = copy.deepcopy(initial).train()
    for p_base, p_student in zip(control.parameters(), ctx.student.model.parameters()):
        p_base.requires_grad_(p_student.requires_grad)  # same trainable set as the distilled run
    return Phase(name="hard_labels", module=Trainable(control), loss_fn=build_hard_labels(vocab=ctx.vocab),
                 examples=ctx.train_examples, subdir="hard_labels")


# ----------------------------------------------------------------------------------------------


def run(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, echo: Any = print) -> RunResult:
    """Run every stage the recipe names. Returns where things were written."""
    acc = make_accelerator(recipe.train.precision)
    device = acc.device
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    method = METHODS[recipe.distill.method]
    if acc.is_main_process:
        check_run_dir(recipe, resume, overwrite)  # refuses before any expensive loading

    # Load and check everything first: bad input fails before anything is written.
    needs_teacher = method.teacher_use(recipe) == "train" or recipe.eval.enabled or recipe.student.source == "teacher"
    teacher = load_teacher(recipe, device) if needs_teacher else None
    student = load_student(recipe, teacher, device)
    vocab, shared = pair_vocabulary(method, recipe, teacher, student)
    for role, loaded in (("teacher", teacher), ("student", student)):
        limit = getattr(loaded.model.config, "max_position_embeddings", None) if loaded else None
        if limit and recipe.data.seq_len > limit:
            raise DistilError(f"data.seq_len: the {role} handles at most {limit} positions "
                              f"(max_position_embeddings), found {recipe.data.seq_len}")
    if recipe.export.enabled:  # fail before training, not after it
        from distil.export import ARCHITECTURES

        model_type = getattr(student.model.config, "model_type", None)
        if model_type not in ARCHITECTURES:
            raise DistilError(f"export.enabled: the student's architecture {model_type!r} cannot be exported to "
                              f"GGUF; supported: {', '.join(ARCHITECTURES)}")
    train_ex, eval_ex = data_mod.load_examples(recipe.data, student.tokenizer, recipe.seed)
    if recipe.eval.enabled and recipe.eval.answers and not held_out_prompts(eval_ex, student.tokenizer, 1):
        raise DistilError(f"eval.answers: the held-out examples of {recipe.data.source} have no prompts (text "
                          f"records); expected prompt/response or messages records, or eval.answers: 0")
    pad = data_mod.pad_id(student.tokenizer)
    run_dir = Path(recipe.output.dir) / recipe.name
    ctx = Context(recipe=recipe, student=student, train_examples=train_ex, eval_examples=eval_ex, vocab=vocab,
                  pad_id=pad, device=device, run_dir=run_dir, echo=echo, main=acc.is_main_process,
                  wait=acc.wait_for_everyone, load_teacher=lambda: load_teacher(recipe, device), _teacher=teacher)
    del teacher
    if method.prepare is not None:  # e.g. the teacher cache: built (or finished) before the run directory exists
        ctx.artifact = method.prepare(ctx)
    echo(f"teacher: {ctx.teacher().source} ({count_params(ctx.teacher().model) / 1e6:.1f}M params)"
         if ctx.has_teacher else "teacher: none")
    echo(f"student: {count_params(student.model) / 1e6:.1f}M params; data: {len(train_ex)} train / "
         f"{len(eval_ex)} eval examples of <= {recipe.data.seq_len} tokens; method: {method.name}, loss: "
         f"{method.loss_name(recipe)}")
    if method.teacher_use(recipe) != "train" and not recipe.eval.enabled:
        ctx.drop_teacher()  # it only built the student or the artifact: train without it in memory

    if acc.is_main_process:
        prepare_run_dir(recipe, resume, overwrite)
    acc.wait_for_everyone()

    initial = copy.deepcopy(student.model).eval() if recipe.eval.enabled else None
    try:
        stage = method.build(ctx)
    except DistilError:
        if acc.is_main_process and not resume:
            _drop_unstarted(run_dir)
        raise
    for phase in stage.phases:
        run_phase(phase, ctx, resume, acc)
    rows: dict[str, torch.nn.Module] = {}
    if recipe.eval.hard_label_baseline and method.name != "hard_labels":
        res = run_phase(hard_label_control(initial, ctx), ctx, resume, acc)
        rows[CONTROL] = res.model.student
    final = stage.finalize() if stage.finalize is not None else student.model
    if not acc.is_main_process:  # rank 0 alone saves, evaluates and exports; the others are done
        return RunResult(run_dir=run_dir, eval=None, student_dir=None, table=None)

    student_dir = None
    if recipe.output.save_student:
        student_dir = save_student(Loaded(final, student.tokenizer, student.source, student.path),
                                   run_dir / "student")
    crash_point("run:saved-student")
    results, table, generation = None, None, {}
    if recipe.eval.enabled:
        rows = {"student (before)": initial, f"student ({method.name})": final, **rows, **stage.eval_rows()}
        teacher_model = ctx.teacher().model if recipe.teacher.source else None
        held_out = stage.eval_examples if stage.eval_examples is not None else eval_ex
        # across tokenizers the teacher cannot score the student's tokens: perplexities only (no KL, no agreement)
        results = evaluate(teacher_model if shared else None, rows, held_out, batch_size=recipe.eval.batch_size, pad_id=pad,
                           vocab=vocab, chunk_size=recipe.distill.chunk_size, device=device)
        params = {name: count_params(m) for name, m in rows.items()}
        if teacher_model is not None and shared:
            params["teacher"] = count_params(teacher_model)
        table = format_table(results, params)
        echo(table)
        if recipe.eval.answers or recipe.eval.task:  # what each row writes (answers, task accuracy, diversity)
            teacher_row = {} if teacher_model is None else \
                {"teacher": teacher_model if shared else (teacher_model, ctx.teacher().tokenizer)}
            generation = generation_eval(recipe, {**teacher_row, **rows}, student.tokenizer, held_out)
            for block in (format_answers(generation), format_task(generation)):
                if block:
                    echo(block)
        from distil.eval.inspect import write_dark_knowledge  # report.html's panels: one forward of each model

        write_dark_knowledge(run_dir, recipe, teacher_model if shared else None, final, student.tokenizer, held_out,
                             vocab, row=f"student ({method.name})")
        write_report(run_dir, recipe, results, params, table, generation, page=False)
    if recipe.export.enabled:
        export_student(recipe, run_dir, student_dir, echo, generation)
    if recipe.output.report_html:
        write_page(run_dir)  # report.html: curves, eval, export; after the export, so it can show it
    return RunResult(run_dir=run_dir, eval=results, student_dir=student_dir, table=table)


def export_student(recipe: Recipe, run_dir: Path, student_dir: Path | None, echo: Any = print,
                   generation: dict | None = None) -> Path:
    """The `export:` stage: the saved student -> GGUF (+ Modelfile), and llama.cpp's answers: to `export.prompt`,
    and to the held-out prompts of eval.answers, printed beside the teacher's answers to them."""
    from distil.export import export_gguf
    from distil.generate import export_prompt_block, llamacpp_available

    spec = recipe.export
    if student_dir is None:
        raise DistilError("export.enabled: the export stage needs output.save_student: true")
    out = Path(spec.path) if spec.path else run_dir / "export" / f"{recipe.name}-{spec.quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_gguf(student_dir, out, spec.quant, modelfile=spec.modelfile, name=recipe.name)
    echo(f"exported {result.path} ({spec.quant}, {result.size_bytes / 1e6:.1f} MB)"
         + (f"; Ollama: ollama create {recipe.name} -f {result.modelfile}" if result.modelfile else ""))
    held_out = (generation or {}).get("prompt_ids")
    if not (spec.prompt or held_out):
        return Path(result.path)
    if not llamacpp_available():
        echo("llama-cpp-python is not installed: skipping the llama.cpp answers (pip install distil[llamacpp])")
        return Path(result.path)
    if spec.prompt:  # the student's answer and tokens/s, and the teacher's beside it when the teacher is a GGUF
        text, answers = export_prompt_block(result.path, spec.quant, spec.prompt, spec.max_tokens,
                                            recipe.teacher.source, recipe.train.threads or None)
        echo(text)
        (run_dir / "export").mkdir(parents=True, exist_ok=True)  # recorded for report.html
        write_atomic(run_dir / "export" / "answer.json", json.dumps(answers, indent=2))
    if held_out:
        from distil.eval.answers import format_answers
        from distil.generate import generate
        from distil.generation.llamacpp import LlamaCppModel
        from distil.generation.params import GenParams

        model = LlamaCppModel(result.path, n_threads=recipe.train.threads or None)
        try:
            records = generate(model, None, held_out, GenParams(max_new_tokens=recipe.eval.max_new_tokens)).records
        finally:
            model.close()
        rows = {name: texts for name, texts in generation["answers"].items() if name == "teacher"}
        rows[f"student ({spec.quant})"] = [r["completion"].strip() for r in records]
        echo(f"llama.cpp, {spec.quant} student, held-out prompts:\n"
             + format_answers({"questions": generation["questions"], "answers": rows}))
    return Path(result.path)


def write_report(run_dir: Path, recipe: Recipe, results: dict, params: dict, table: str,
                 generation: dict | None = None, page: bool = True) -> None:
    """eval.json (the numbers; with eval.answers/eval.task also the answers and the task metrics), report.md and
    (`page`) report.html (distil/report_html.py)."""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    record = {"results": results, "params": params, "date": stamp}
    generation = {k: v for k, v in (generation or {}).items() if k != "prompt_ids"}
    if generation:
        record["generation"] = generation
    write_atomic(run_dir / "eval.json", json.dumps(record, indent=2))
    blocks = [b for b in (format_answers(generation), format_task(generation)) if b]
    write_atomic(run_dir / "report.md",
                 f"# {recipe.name}\n\n{stamp}. Method `{recipe.distill.method}`, loss "
                 f"`{METHODS[recipe.distill.method].loss_name(recipe)}`, "
                 f"{recipe.train.steps} steps.\n\n```\n{table}\n```\n"
                 + "".join(f"\n```\n{b}\n```\n" for b in blocks))
    if page and recipe.output.report_html:
        write_page(run_dir)
