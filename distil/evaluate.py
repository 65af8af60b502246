"""`distil eval`: evaluate a finished run (or a recipe's initial student) against its teacher."""

from __future__ import annotations

from pathlib import Path

from distil import data as data_mod
from distil.errors import DistilError
from distil.eval.metrics import evaluate, format_table
from distil.models import check_same_vocab, count_params, load_model
from distil.models import load_student, load_teacher
from distil.pipeline import write_report
from distil.recipe import load_recipe


def evaluate_target(target: str, overrides: list[str], student_dir: str | None = None) -> str:
    """A run directory: teacher, the initial student and the trained student/ on the recipe's
    held-out split. A recipe file: teacher and the initial student only. Returns the table."""
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
        check_same_vocab(teacher, trained)
        rows[f"student ({recipe.distill.method})"] = trained.model
    vocab = check_same_vocab(teacher, initial)
    _, eval_ex = data_mod.load_examples(recipe.data, teacher.tokenizer, recipe.seed)
    results = evaluate(teacher.model, rows, eval_ex, batch_size=recipe.eval.batch_size,
                       pad_id=data_mod.pad_id(teacher.tokenizer), vocab=vocab, chunk_size=recipe.distill.chunk_size)
    params = {name: count_params(m) for name, m in rows.items()}
    params["teacher"] = count_params(teacher.model)
    table = format_table(results, params)
    if run_dir is not None:
        write_report(run_dir, recipe, results, params, table)
    return table
