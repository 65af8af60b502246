"""Recipes: one YAML file describes a run.

A recipe is a tree of typed, documented dataclasses (`Recipe` at the root). YAML is read with
`yaml.safe_load` only, every key is checked against the dataclass fields (unknown keys are errors
with a "did you mean"), every value against its type and range, and every error names the file
and the dotted key path. `key.sub=value` overrides from the command line go through the same
checks. Components are chosen by `Literal` names, never by import paths: a recipe cannot make
distil import or run arbitrary code.

Each field's `help` metadata is the documentation; `distil validate --explain` prints it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from distil.errors import DistilError
from distil.eval.tasks import TaskName
from distil.methods import METHODS
from distil.options import (_build, _check_range, _convert, _found, _type_name,  # noqa: F401
                            apply_overrides, option, parse_override, read_yaml)

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl"]
# Method names come from the registry (distil/methods/__init__.py): a Literal, never an import path.
Method = Literal[tuple(METHODS)]  # type: ignore[valid-type]
DType = Literal["auto", "float32", "bfloat16", "float16"]


_f = option  # a documented, range-checked dataclass field (distil/options.py)


@dataclass
class ModelSpec:
    """Where a model comes from and how it is loaded."""

    source: str = _f("", "A Hugging Face directory (safetensors), a .gguf file, 'embedded:smollm2-135m-instruct' or "
                     "'embedded:gemma-3-270m', 'config:PATH' (random init from a config.json or a directory "
                     "holding one), 'config:tiny-llama-char' (a tiny Llama with a character tokenizer, for models "
                     "trained from scratch), or, for the student only, 'teacher' (a copy of the teacher, usually "
                     "with `layers`).")
    layers: Optional[list[int]] = _f(None, "Student only: keep these teacher layers (0-based, in order) plus the "
                                     "embeddings, final norm and head: the usual depth-pruned initialisation.")
    config: dict[str, Any] = _f(help="Overrides applied to the model config before a random init "
                                "(e.g. {num_hidden_layers: 2, hidden_size: 64}); only with 'config:' sources.",
                                factory=dict)
    tokenizer: Optional[str] = _f(None, "Directory with the tokenizer, when the source has none "
                                  "(defaults to the source, then to the teacher's).")
    dtype: DType = _f("auto", "Weights dtype: auto = float32 on CPU, bfloat16 on GPUs that support it.")
    trust_remote_code: bool = _f(False, "Allow model code from the model directory. Off: model files are untrusted.")
    chat_template: Optional[str] = _f(None, "Student only: the student's chat template, saved with it and written "
                                      "into its GGUF: 'teacher' (the teacher's) or a Jinja template string; "
                                      "unset = the student tokenizer's own.")
    eos_token: Optional[str] = _f(None, "Student only: the token the student's answers end with and generation "
                                  "stops at (tokenizer, config and generation config; saved and exported), e.g. "
                                  "'<|im_end|>' for a base student that learns an instruct teacher's chat format.")
    freeze_embeddings: bool = _f(False, "Student only: keep the input embeddings and the output head frozen (they "
                                 "come from the teacher already); saves the head's weight gradient, the "
                                 "costliest matmul of a small student with a large vocabulary.")


@dataclass
class DataSpec:
    """Training data: files or a built-in corpus, tokenized into training examples."""

    source: str = _f("builtin:pydoc", "A .jsonl/.json/.csv/.parquet/.txt file, a directory saved with "
                     "datasets' save_to_disk, or a built-in corpus (no download): 'builtin:pydoc' (Python's own "
                     "documentation), 'builtin:pydoc_qa' (its topics as prompt/response records), 'builtin:python_qa' "
                     "(those + built-ins and str/list/dict/set methods, ~230 questions), 'builtin:<task>' / "
                     "'builtin:<task>_answers' (a verifiable task's train questions with the gold chain of thought / "
                     "the answer only; tasks: arithmetic, sum3, arithmetic_hard).")
    seq_len: int = _f(256, "Tokens per training example (plain text is packed into blocks of this length).", ge=8)
    pack: bool = _f(True, "Pack plain-text records into fixed-length blocks (separated by EOS).")
    chat_template: bool = _f(True, "Render prompt/response and messages records with the tokenizer's chat template.")
    max_records: Optional[int] = _f(None, "Use only the first N records (after reading).", gt=0)
    eval_size: int = _f(32, "Examples held out for evaluation (taken after a seeded shuffle).", ge=0)


@dataclass
class DistillSpec:
    """How targets are sourced (the method) and how the student is scored against them (the loss)."""

    method: Method = _f("offline", "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values())
                        + ". A method with options reads them from its own section (e.g. cache:).")
    loss: Divergence = _f("forward_kl", "Divergence between teacher and student token distributions: forward_kl = "
                          "KL(p_T||p_S) (mode-covering), reverse_kl = KL(p_S||p_T) (mode-seeking), jsd (beta), tvd, "
                          "skew_forward_kl / skew_reverse_kl (DistiLLM, skew_alpha).")
    alpha: float = _f(1.0, "Weight of the distillation term; (1 - alpha) weights hard-label cross-entropy.", ge=0.0, le=1.0)
    temperature: float = _f(1.0, "Softmax temperature T for the soft term (both models); the term is scaled by T^2.", gt=0.0)
    beta: float = _f(0.5, "JSD mixture weight: M = (1-beta) p_S + beta p_T; beta=0 is forward KL, 1 reverse KL.", ge=0.0, le=1.0)
    skew_alpha: float = _f(0.1, "Skew of the skewed KLs (DistiLLM uses 0.1).", ge=0.0, le=1.0)
    chunk_size: int = _f(1024, "Tokens per chunk when evaluating full-vocabulary losses (memory bound).", gt=0)
    fused: bool = _f(True, "Offline and cache methods: compute the loss from the models' final hidden states and "
                     "output heads chunk by chunk, never materialising [tokens x vocab] logits (same values; less "
                     "memory and time). Checked once on the first batch: a model whose head does not reproduce its "
                     "own logits from hidden @ W.T (logit scaling, soft-capping) falls back to plain logits, with "
                     "one note.")


@dataclass
class TrainSpec:
    """The one training loop: AdamW, warmup + cosine, accumulation, clipping, checkpoints."""

    steps: int = _f(100, "Optimizer steps.", gt=0)
    batch_size: int = _f(8, "Examples per micro-batch per process.", gt=0)
    grad_accum: int = _f(1, "Micro-batches per optimizer step.", gt=0)
    lr: float = _f(1e-4, "Peak learning rate.", gt=0.0)
    min_lr_ratio: float = _f(0.1, "The cosine decays to lr * min_lr_ratio.", ge=0.0, le=1.0)
    warmup_steps: int = _f(10, "Linear warmup steps.", ge=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0.0)
    betas: list[float] = _f(help="AdamW betas.", factory=lambda: [0.9, 0.95])
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", ge=0.0)
    precision: Literal["auto", "fp32", "bf16"] = _f("auto", "auto = fp32 on CPU (bf16 is slow there), bf16 on GPUs with it.")
    threads: int = _f(0, "torch threads per process (0 = torch's default).", ge=0)
    log_every: int = _f(1, "Write a metrics.jsonl line every N steps.", gt=0)
    save_every: int = _f(0, "Checkpoint every N steps (0 = only at the end).", ge=0)
    keep_last: int = _f(2, "Checkpoints to keep.", gt=0)
    progress: bool = _f(True, "Show a progress bar (loss, tokens/s).")
    report_to: Literal["none", "tensorboard"] = _f("none", "Also log every metrics.jsonl row as TensorBoard scalars "
                                                   "(<run dir>/tensorboard/; needs pip install 'distil[tensorboard]').")


@dataclass
class EvalSpec:
    """Held-out evaluation: perplexity, top-1 agreement and KL(teacher || student)."""

    enabled: bool = _f(True, "Evaluate at the end of the run.")
    batch_size: int = _f(8, "Examples per eval batch.", gt=0)
    hard_label_baseline: bool = _f(False, "Also train the same student on hard labels only with the same budget "
                                   "and add it as a row (the control that shows what distillation adds).")
    answers: int = _f(0, "Every row (teacher, students) answers this many held-out prompts, greedy; printed side by "
                      "side and saved in eval.json/report.md (prompt/response or messages data only).", ge=0)
    max_new_tokens: int = _f(64, "Longest answer, in tokens, for eval.answers and eval.task.", gt=0)
    task: Optional[TaskName] = _f(None, "A verifiable task (distil/eval/tasks.py) every row answers: accuracy of "
                                  "the greedy answer, and with eval.samples > 1 pass@1/pass@n, distinct-n, "
                                  "self-BLEU, mean length and the fraction cut at max tokens.")
    task_size: int = _f(50, "Eval questions of eval.task (its hash-split eval side: never in any training set).",
                        gt=0)
    samples: int = _f(1, "Samples per eval.task question at eval.temperature for pass@k and diversity (1 = greedy "
                      "only).", ge=1)
    temperature: float = _f(0.8, "Sampling temperature of eval.samples.", gt=0.0)
    diversity_warn: float = _f(0.5, "Mode/diversity collapse: with eval.samples > 1, warn in the report when a "
                               "student's distinct-2 falls below this fraction of the teacher's (0 = never).",
                               ge=0.0, le=1.0)
    dark_knowledge: int = _f(4, "Dark-knowledge panels in report.html: at eval time, this many positions of the "
                             "first held-out example (where teacher and student disagree most, and the teacher's most "
                             "uncertain one) get both models' top-k soft targets at T = 1 and 2, entropy, mass outside "
                             "the top-1 and KL(teacher || student), saved in <run dir>/dark_knowledge.json (one "
                             "forward of each model; 0 = off; needs a teacher with the student's vocabulary).",
                             ge=0, le=32)


@dataclass
class OutputSpec:
    """Where the run directory goes and what is written into it."""

    dir: str = _f("runs", "Parent directory of run directories (runs/<name>/).")
    save_student: bool = _f(True, "Save the final student as a Hugging Face directory (runs/<name>/student).")
    report_html: bool = _f(True, "Write report.html (the run report as one offline page: curves, eval, dark "
                           "knowledge, export) beside report.md at the end of the run and after `distil eval`.")


@dataclass
class ExportSpec:
    """The end product: a GGUF file llama.cpp and Ollama run, written at the end of `distil run`."""

    enabled: bool = _f(False, "Export the trained student to GGUF at the end of the run.")
    quant: Literal["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K_M", "Q5_K_M", "Q6_K"] = _f(
        "Q4_K_M", "GGUF tensor type scheme (Q4_K_M: ~4.5-bit k-quants, llama.cpp's rules per tensor).")
    path: Optional[str] = _f(None, "Output .gguf path (default: <run dir>/export/<name>-<quant>.gguf).")
    modelfile: bool = _f(True, "Write an Ollama Modelfile next to the GGUF.")
    prompt: Optional[str] = _f(None, "If llama-cpp-python is installed, load the GGUF in llama.cpp and print "
                               "its answer to this chat prompt.")
    max_tokens: int = _f(32, "Tokens to generate for `prompt`.", gt=0)


@dataclass
class CoreRecipe:
    """The sections every run has; `Recipe` adds one section per method that has options."""

    name: str = _f("run", "Run name: the run directory is <output.dir>/<name>.")
    seed: int = _f(0, "Seed for initialisation, data order and dropout (0 <= seed < 2**32: numpy takes 32 bits).",
                   ge=0, lt=2**32)
    teacher: ModelSpec = _f(help="The frozen teacher.", factory=ModelSpec)
    student: ModelSpec = _f(help="The student that is trained.", factory=lambda: ModelSpec(source="teacher"))
    data: DataSpec = _f(help="Training and evaluation data.", factory=DataSpec)
    distill: DistillSpec = _f(help="Method and loss.", factory=DistillSpec)
    train: TrainSpec = _f(help="Optimisation.", factory=TrainSpec)
    eval: EvalSpec = _f(help="Evaluation.", factory=EvalSpec)
    output: OutputSpec = _f(help="Outputs.", factory=OutputSpec)
    export: ExportSpec = _f(help="GGUF export.", factory=ExportSpec)


def _method_sections() -> list[tuple[str, type, Any]]:
    """One recipe section per registered method with options (e.g. `cache:`), typed by the method's dataclass."""
    sections = []
    for m in METHODS.values():
        if m.options is not None:
            doc = (m.options.__doc__ or "").strip().splitlines()[0] if m.options.__doc__ else ""
            sections.append((m.section_name, m.options, _f(help=doc or f"Options of method {m.name!r}.",
                                                           factory=m.options)))
    return sections


# A whole run: teacher -> student -> data -> method (+ its section) + loss -> train -> eval -> output -> export.
Recipe = dataclasses.make_dataclass("Recipe", _method_sections(), bases=(CoreRecipe,))
Recipe.__module__ = __name__
Recipe.__doc__ = "A whole run: teacher -> student -> data -> method + loss -> train -> eval -> output -> export."


def _validate_cross(recipe: Recipe, where: str) -> None:
    """Checks that involve more than one key."""
    method = METHODS[recipe.distill.method]
    if not recipe.teacher.source and method.teacher_use(recipe) != "none":
        raise DistilError(f"{where}: teacher.source: expected a model source for method "
                          f"{recipe.distill.method!r}, found nothing")
    if not recipe.student.source:
        raise DistilError(f"{where}: student.source: expected a model source, found nothing")
    if recipe.student.source == "teacher" and not recipe.teacher.source:
        raise DistilError(f"{where}: student.source: 'teacher' needs teacher.source to be set, found nothing")
    if recipe.eval.hard_label_baseline and not recipe.eval.enabled:
        raise DistilError(f"{where}: eval.hard_label_baseline: the control is a row of the evaluation; expected "
                          f"eval.enabled: true, found false")
    if method.check is not None:
        method.check(recipe, where)  # the method's own cross-key checks
    if recipe.student.layers is not None:
        if not recipe.student.layers:
            raise DistilError(f"{where}: student.layers: expected a non-empty list of layer indices, found []")
        if any(i < 0 for i in recipe.student.layers) or len(set(recipe.student.layers)) != len(recipe.student.layers):
            raise DistilError(f"{where}: student.layers: expected distinct non-negative indices, "
                              f"found {recipe.student.layers}")
    for key in ("chat_template", "eos_token"):
        if getattr(recipe.teacher, key) is not None:
            raise DistilError(f"{where}: teacher.{key}: a student-only key (the teacher is used as it is); expected "
                              f"it unset, found {getattr(recipe.teacher, key)!r}")
    if recipe.student.chat_template == "teacher" and not recipe.teacher.source:
        raise DistilError(f"{where}: student.chat_template: 'teacher' needs teacher.source to be set, found nothing")
    for role in ("teacher", "student"):
        spec = getattr(recipe, role)
        if spec.config and not spec.source.startswith("config:"):
            raise DistilError(f"{where}: {role}.config: overrides need a 'config:' source, found source {spec.source!r}")
    if len(recipe.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in recipe.train.betas):
        raise DistilError(f"{where}: train.betas: expected two numbers in [0, 1), found {recipe.train.betas}")
    if recipe.train.report_to == "tensorboard":
        from distil.trainer import check_tensorboard

        check_tensorboard(where)  # missing: refused before anything is loaded or written
    if recipe.export.enabled and not recipe.output.save_student:
        raise DistilError(f"{where}: export.enabled: the export stage needs output.save_student: true, found false")
    if not recipe.name or "/" in recipe.name or recipe.name.startswith("."):
        raise DistilError(f"{where}: name: expected a plain directory name, found {recipe.name!r}")


def recipe_from_dict(data: Any, where: str = "<recipe>") -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistilError(f"{where}: expected a mapping of recipe sections at the top level, found {_found(data)}")
    recipe = _build(Recipe, data, where)
    _validate_cross(recipe, where)
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override, validate. Raises DistilError with 'file: key.path: problem'."""
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DistilError(f"{path}: expected a mapping of recipe sections at the top level, found {_found(data)}")
    apply_overrides(data, overrides or [])
    return recipe_from_dict(data, str(path))


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False), encoding="utf-8")


def leaf_keys(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every leaf key of a recipe class as a dotted path (`train.lr`, `cache.k` ...), method sections included."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(leaf_keys(hints[f.name], f"{prefix}{f.name}."))
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def explain(cls: type = Recipe, prefix: str = "") -> list[str]:
    """Every key with its type, default and help: the recipe reference."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{path}: {f.metadata.get('help', '')}")
            lines.extend(explain(hints[f.name], path + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {path} ({_type_name(hints[f.name])}; default {default!r}): {f.metadata.get('help', '')}")
    return lines
