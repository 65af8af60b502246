"""`distil run`: the stages a recipe names, in order, into one run directory.

recipe -> models (teacher, student) -> data -> method (a loss function) -> trainer (one loop)
-> eval -> save. The run directory `<output.dir>/<name>/` holds recipe.yaml (resolved),
metrics.jsonl, checkpoints/, student/, eval.json and report.md.
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

from distil import data as data_mod
from distil.errors import DistilError
from distil.eval.metrics import evaluate, format_table
from distil.methods import METHODS, NEEDS_TEACHER
from distil.models import (Loaded, check_same_vocab, count_params, freeze, load_model, resolve_dtype,
                           student_from_teacher)
from distil.recipe import Recipe, dump_recipe
from distil.trainer import make_accelerator, train


@dataclass
class RunResult:
    run_dir: Path
    eval: dict | None
    student_dir: Path | None
    table: str | None


def load_teacher(recipe: Recipe, device: Any = "cpu") -> Loaded | None:
    if not recipe.teacher.source:
        return None
    t = recipe.teacher
    loaded = load_model(t.source, dtype=t.dtype, config=t.config, tokenizer=t.tokenizer,
                        trust_remote_code=t.trust_remote_code, role="teacher", seed=recipe.seed, device=device)
    freeze(loaded.model.to(device))
    return loaded


def load_student(recipe: Recipe, teacher: Loaded | None, device: Any = "cpu") -> Loaded:
    s = recipe.student
    if s.source == "teacher":
        if teacher is None:
            raise DistilError("student.source: 'teacher' needs teacher.source to be set")
        student = student_from_teacher(teacher, s.layers)
    else:
        student = load_model(s.source, dtype=s.dtype, config=s.config, tokenizer=s.tokenizer,
                             trust_remote_code=s.trust_remote_code, teacher=teacher, role="student",
                             seed=recipe.seed, device=device)
        if s.layers is not None:
            student = student_from_teacher(student, s.layers)
    # The student keeps fp32 master weights whatever the teacher's dtype; on GPUs the trainer runs
    # its forward/backward under bf16 autocast (train.precision), the optimizer updates stay fp32.
    student.model.to(device=device, dtype=torch.float32 if s.dtype == "auto" else resolve_dtype(s.dtype))
    for p in student.model.parameters():
        p.requires_grad_(True)
    if s.freeze_embeddings:
        for module in (student.model.get_input_embeddings(), student.model.get_output_embeddings()):
            for p in module.parameters():
                p.requires_grad_(False)
    return student


def prepare_run_dir(recipe: Recipe, resume: str | None, overwrite: bool) -> Path:
    run_dir = Path(recipe.output.dir) / recipe.name
    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        if not overwrite:
            raise DistilError(f"{run_dir}: the run directory already exists; pass --resume to continue it, "
                              f"--overwrite to replace it, or name=... for a new run")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def save_student(student: Loaded, target: Path) -> Path:
    """Save as a Hugging Face directory, atomically (temp dir, then rename)."""
    tmp = target.parent / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    student.model.save_pretrained(tmp, safe_serialization=True)
    student.tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def run(recipe: Recipe, *, resume: str | None = None, overwrite: bool = False, echo: Any = print) -> RunResult:
    """Run every stage the recipe names. Returns where things were written."""
    acc = make_accelerator(recipe.train.precision)
    device = acc.device
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    run_dir = Path(recipe.output.dir) / recipe.name
    if acc.is_main_process and run_dir.exists() and any(run_dir.iterdir()) and not (resume or overwrite):
        prepare_run_dir(recipe, resume, overwrite)  # refuses before any expensive loading

    # Load and check everything first: bad input fails before anything is written.
    method = recipe.distill.method
    need_teacher = NEEDS_TEACHER[method] or recipe.eval.enabled or recipe.student.source == "teacher"
    teacher = load_teacher(recipe, device) if need_teacher else None
    student = load_student(recipe, teacher, device)
    vocab = check_same_vocab(teacher, student) if teacher is not None else len(student.tokenizer)
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
    pad = data_mod.pad_id(student.tokenizer)
    targets = teacher.model if teacher else None
    if method == "cache":  # the teacher's top-k from disk; the teacher is loaded only if the cache needs building
        from distil.methods.cache import ensure_cache, with_index

        targets = ensure_cache(recipe, train_ex, student.tokenizer, teacher=teacher, device=device, echo=echo,
                               main=acc.is_main_process, wait=acc.wait_for_everyone)
        train_ex = with_index(train_ex)
    echo(f"teacher: {teacher.source if teacher else '-'} ({count_params(teacher.model) / 1e6:.1f}M params)"
         if teacher else "teacher: none")
    echo(f"student: {count_params(student.model) / 1e6:.1f}M params; data: {len(train_ex)} train / "
         f"{len(eval_ex)} eval examples of <= {recipe.data.seq_len} tokens; method: {method}, loss: "
         f"{recipe.distill.loss}")

    if acc.is_main_process:
        prepare_run_dir(recipe, resume, overwrite)
        dump_recipe(recipe, run_dir / "recipe.yaml")
    acc.wait_for_everyone()

    initial = copy.deepcopy(student.model).eval() if recipe.eval.enabled else None
    loss_fn = METHODS[method](targets, recipe.distill, vocab)
    if method == "cache" and not recipe.eval.enabled:
        teacher = None  # it only built the student (or the cache): train without it in memory
    result = train(student.model, loss_fn, train_ex, recipe.train, run_dir=run_dir, seed=recipe.seed, pad_id=pad,
                   resume=resume, accelerator=acc, tag=method)
    echo(f"trained {result.steps} steps, {result.tokens} target tokens in {result.seconds:.0f}s "
         f"({result.tokens / max(result.seconds, 1e-9):.0f} tokens/s); final loss {result.last_loss:.4f}")

    baseline = None
    if recipe.eval.hard_label_baseline and method != "hard_labels":
        # The control: the same initial student, data, steps and schedule, hard labels only.
        baseline = copy.deepcopy(initial).train()
        for p_base, p_student in zip(baseline.parameters(), student.model.parameters()):
            p_base.requires_grad_(p_student.requires_grad)  # same trainable set as the distilled run
        base_dir = run_dir / "hard_labels"
        base_resume = "latest" if resume and (base_dir / "checkpoints").is_dir() else None
        hard = METHODS["hard_labels"](None, recipe.distill, vocab)
        res = train(baseline, hard, train_ex, recipe.train, run_dir=base_dir, seed=recipe.seed, pad_id=pad,
                    resume=base_resume, accelerator=acc, tag="hard_labels")
        echo(f"hard-label baseline: {res.steps} steps in {res.seconds:.0f}s; final loss {res.last_loss:.4f}")

    student_dir = None
    if acc.is_main_process and recipe.output.save_student:
        student_dir = save_student(student, run_dir / "student")

    results, table = None, None
    if recipe.eval.enabled and acc.is_main_process:
        rows = {"student (before)": initial, f"student ({method})": student.model}
        if baseline is not None:
            rows["student (hard_labels)"] = baseline
        results = evaluate(teacher.model if teacher else None, rows, eval_ex, batch_size=recipe.eval.batch_size,
                           pad_id=pad, vocab=vocab, chunk_size=recipe.distill.chunk_size, device=device)
        params = {name: count_params(m) for name, m in rows.items()}
        if teacher is not None:
            params["teacher"] = count_params(teacher.model)
        table = format_table(results, params)
        write_report(run_dir, recipe, results, params, table)
        echo(table)
    if recipe.export.enabled and acc.is_main_process:
        export_student(recipe, run_dir, student_dir, echo)
    acc.wait_for_everyone()
    return RunResult(run_dir=run_dir, eval=results, student_dir=student_dir, table=table)


def export_student(recipe: Recipe, run_dir: Path, student_dir: Path | None, echo: Any = print) -> Path:
    """The `export:` stage: the saved student -> GGUF (+ Modelfile), and llama.cpp's answer to a prompt."""
    from distil.export import export_gguf
    from distil.generate import llamacpp_available, llamacpp_chat

    spec = recipe.export
    if student_dir is None:
        raise DistilError("export.enabled: the export stage needs output.save_student: true")
    out = Path(spec.path) if spec.path else run_dir / "export" / f"{recipe.name}-{spec.quant}.gguf"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = export_gguf(student_dir, out, spec.quant, modelfile=spec.modelfile, name=recipe.name)
    echo(f"exported {result.path} ({spec.quant}, {result.size_bytes / 1e6:.1f} MB)"
         + (f"; Ollama: ollama create {recipe.name} -f {result.modelfile}" if result.modelfile else ""))
    if spec.prompt:
        if llamacpp_available():
            answer = llamacpp_chat(result.path, spec.prompt, spec.max_tokens)
            echo(f"llama.cpp, {spec.quant} student> {spec.prompt}\n{answer.strip()}")
        else:
            echo("llama-cpp-python is not installed: skipping the llama.cpp answer (pip install distil[llamacpp])")
    return Path(result.path)


def write_report(run_dir: Path, recipe: Recipe, results: dict, params: dict, table: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    (run_dir / "eval.json").write_text(json.dumps({"results": results, "params": params, "date": stamp}, indent=2))
    (run_dir / "report.md").write_text(
        f"# {recipe.name}\n\n{stamp}. Method `{recipe.distill.method}`, loss `{recipe.distill.loss}`, "
        f"{recipe.train.steps} steps.\n\n```\n{table}\n```\n")
