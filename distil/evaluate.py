"""`distil eval`: evaluate a finished run (or a recipe's initial student) against its teacher.

Evaluating a run adds to or refreshes its record, never drops rows: the rows it can recompute (the teacher,
the initial student, the trained student/, the hard-label control from its last checkpoint) replace the
same-named rows of the run's eval.json; rows it cannot recompute are kept as the run recorded them.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from distil import data as data_mod
from distil.checkpoint import list_checkpoints
from distil.errors import DistilError
from distil.eval.answers import format_answers, format_task, generation_eval
from distil.eval.metrics import evaluate, format_table
from distil.methods.contract import Trainable
from distil.models import check_same_vocab, count_params, load_model, load_student, load_teacher
from distil.methods import METHODS
from distil.pipeline import CONTROL, pair_vocabulary, write_report
from distil.recipe import load_recipe


def _control(run_dir: Path, initial: object) -> object | None:
    """The hard-label control of a run, from its newest checkpoint (it is not saved as a model directory)."""
    found = list_checkpoints(run_dir / "hard_labels" / "checkpoints")
    if not found:
        return None
    from safetensors.torch import load_model as load_weights

    module = Trainable(copy.deepcopy(initial))
    try:
        load_weights(module, str(found[-1] / "model.safetensors"))
    except Exception as exc:
        raise DistilError(f"{found[-1]}: the hard-label control's checkpoint is unreadable "
                          f"({type(exc).__name__})") from None
    return module.student.eval()


def _previous(run_dir: Path) -> dict:
    path = run_dir / "eval.json"
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DistilError(f"{path}: expected the run's evaluation record (JSON), found something else; move it "
                          f"away to evaluate afresh") from None
    return record if isinstance(record, dict) else {}


def evaluate_target(target: str, overrides: list[str], student_dir: str | None = None) -> str:
    """A run directory: teacher, the initial student, the trained student/ and the control on the recipe's
    held-out split, merged into the run's record. A recipe file: teacher and the initial student only.
    Returns the table."""
    path = Path(target)
    run_dir = path if (path / "recipe.yaml").is_file() else None
    if run_dir is None and not path.is_file():
        raise DistilError(f"{path}: expected a run directory (with recipe.yaml) or a recipe file, found nothing")
    recipe = load_recipe(run_dir / "recipe.yaml" if run_dir else path, overrides)
    teacher = load_teacher(recipe)
    if teacher is None:
        raise DistilError(f"{target}: teacher.source: evaluation needs a teacher")
    initial = load_student(recipe, teacher)
    rows = {"student (before)": initial.model}
    trained_dir = Path(student_dir) if student_dir else (run_dir / "student" if run_dir else None)
    if trained_dir is not None:
        if not trained_dir.is_dir():
            raise DistilError(f"{trained_dir}: trained student directory not found")
        trained = load_model(str(trained_dir), teacher=teacher, role="student")
        rows[f"student ({recipe.distill.method})"] = trained.model
    if run_dir is not None:
        control = _control(run_dir, initial.model)
        if control is not None:
            rows[CONTROL] = control
    vocab, shared = pair_vocabulary(METHODS[recipe.distill.method], recipe, teacher, initial)
    if shared and trained_dir is not None:
        check_same_vocab(teacher, trained)
    _, eval_ex = data_mod.load_examples(recipe.data, initial.tokenizer, recipe.seed)
    # across tokenizers the teacher cannot score the student's tokens: perplexities only
    results = evaluate(teacher.model if shared else None, rows, eval_ex, batch_size=recipe.eval.batch_size,
                       pad_id=data_mod.pad_id(initial.tokenizer), vocab=vocab, chunk_size=recipe.distill.chunk_size)
    params = {name: count_params(m) for name, m in rows.items()}
    if shared:
        params["teacher"] = count_params(teacher.model)
    before: dict = {}
    if run_dir is not None:
        before = _previous(run_dir)
        old_results, old_params = before.get("results") or {}, before.get("params") or {}
        results = {**old_results, **results}  # recorded rows keep their place; recomputed ones are refreshed
        params = {**old_params, **params}
    table = format_table(results, params)
    generation = {}
    if recipe.eval.answers or recipe.eval.task:  # what each row writes, recomputed like the numbers
        teacher_row = teacher.model if shared else (teacher.model, teacher.tokenizer)
        generation = generation_eval(recipe, {"teacher": teacher_row, **rows}, initial.tokenizer, eval_ex)
        if run_dir is not None and isinstance(before.get("generation"), dict):
            old_gen = before["generation"]
            if "task" in generation and isinstance(old_gen.get("task"), dict) and \
                    old_gen["task"].get("name") == generation["task"]["name"]:
                generation["task"]["rows"] = {**(old_gen["task"].get("rows") or {}), **generation["task"]["rows"]}
    if run_dir is not None:
        if trained_dir is not None:  # report.html's dark-knowledge panels, refreshed like the numbers (two forwards)
            from distil.eval.inspect import write_dark_knowledge

            write_dark_knowledge(run_dir, recipe, teacher.model if shared else None, trained.model, initial.tokenizer,
                                 eval_ex, vocab, row=f"student ({recipe.distill.method})")
        write_report(run_dir, recipe, results, params, table, generation)
    blocks = [b for b in (format_answers(generation), format_task(generation)) if b]
    return "\n".join([table, *blocks])
