"""THE method contract: what a distillation method declares and returns, and nothing else.

`distil run` (pipeline.run) is the same code for every method:

    recipe -> load + check (models, data) -> method.prepare(ctx)   [optional: a cache, a generated corpus]
           -> method.build(ctx) -> Stage: phases (0..k) + finalize  -> THE loop (trainer.train) per phase
           -> eval rows (before, after, controls, stage rows) in one teacher pass -> save -> export

A method is one file with one `Method` value registered by name in `distil/methods/__init__.py`:

  - `teacher`: when the frozen teacher must be in memory: "train" (its logits are computed every step),
    "prepare" (only to build an artifact, e.g. the top-k cache; loaded lazily, dropped before training),
    or "none" (never, e.g. hard labels). `ctx.teacher()` loads it on first use.
  - `options`: the dataclass of the method's own recipe section (named `section`, e.g. `cache:`),
    validated, explained and fuzzed like every other section; `check(recipe, where)` adds cross-key checks.
  - `prepare(ctx)`: builds or reopens an artifact (stored with a manifest and an identity, written with
    `distil.atomic.write_atomic`, resumable, refused when stale: `methods/cache_store.py` is the model to
    follow); the result is `ctx.artifact`.
  - `build(ctx) -> Stage`: the phases to train (each a `Phase`: one `Trainable` module holding every
    trainable part, a loss function, examples and per-step hooks) and `finalize` (the deliverable).

The loss function of a phase is `loss_fn(module, batch, num_items) -> LossOutput` where `module` is the
phase's `Trainable` (possibly wrapped by DDP: call it, do not reach into it, for the student's forward)
and `num_items` is the number of target items of the GLOBAL batch (all micro-batches, all processes),
counted by `phase.count` AFTER `phase.before_step` ran (on-policy methods generate the batch there).
`LossOutput.metrics` are named, detached scalars already divided by `num_items`, so the loop sums them
over micro-batches and processes; each one becomes a `metrics.jsonl` column and a progress-bar field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import torch

from distil.errors import DistilError

IGNORE = -100


# ----------------------------------------------------------------------------------------------
# What trains: one module


class Trainable(torch.nn.Module):
    """Every trainable part of a phase in one module (student, learned projections, peers), so that the
    optimizer, checkpoints, resume and DDP see all of it. The frozen teacher is never inside it: it is
    never broadcast, never saved.

    Calling the module runs the student (`module(input_ids=..., attention_mask=...)`), or `forward_fn(self,
    *args, **kwargs)` when a method needs its extra parts in the same forward (DDP requires one forward per
    backward through the wrapper)."""

    def __init__(self, student: torch.nn.Module, extras: dict[str, torch.nn.Module] | None = None,
                 forward_fn: Callable[..., Any] | None = None, lr_scale: dict[str, float] | None = None):
        super().__init__()
        self.student = student
        self.extras = torch.nn.ModuleDict(extras or {})
        self._forward_fn = forward_fn
        unknown = sorted(set(lr_scale or {}) - set(self.extras) - {"student"})
        if unknown:
            raise ValueError(f"lr_scale names {unknown}, which are not parts ('student', {sorted(self.extras)})")
        # A part named here ("student" or an extra's name) is a model of its own in the optimizer: its own
        # parameter group, at lr_scale x the schedule's lr, and gradient-clipped on its own (train.max_grad_norm
        # per group). An online teacher is one: already trained, it wants a smaller step than the student, and
        # clipped together with the student its large gradients would shrink the student's step.
        self.lr_scale = {n: float(v) for n, v in (lr_scale or {}).items()}

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: one group (all trainable parameters, in module order) unless parts
        are named in lr_scale; then the rest in one group and each named part in its own, with its "lr_scale"."""
        if not self.lr_scale:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        by_part: dict[str | None, list[torch.nn.Parameter]] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                part = name.split(".")[1] if name.startswith("extras.") else "student"
                by_part.setdefault(part if part in self.lr_scale else None, []).append(p)
        return [{"params": ps, "lr_scale": self.lr_scale.get(part, 1.0)} for part, ps in by_part.items()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._forward_fn is not None:
            return self._forward_fn(self, *args, **kwargs)
        return self.student(*args, **kwargs)


def unwrap(module: Any) -> Any:
    """The student model inside a (DDP-wrapped) Trainable; a bare model is returned as is."""
    module = getattr(module, "module", module)  # DistributedDataParallel keeps the model in .module
    return module.student if isinstance(module, Trainable) else module


# ----------------------------------------------------------------------------------------------
# What a method returns


def count_targets(batch: dict) -> int:
    """Target tokens of a micro-batch: labels shifted by one (position t predicts t + 1), -100 excluded."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


@dataclass
class Phase:
    """One run of THE training loop."""

    name: str  # progress-bar tag; also the sub-directory of the run for metrics/checkpoints ("" = the run dir)
    module: Trainable
    loss_fn: Callable[[Any, dict, float], Any]
    examples: list[dict]
    count: Callable[[dict], int] = count_targets  # target items of a micro-batch, after before_step
    # before_step(module, batches, step) -> batches: e.g. replace the batch by the student's own samples.
    before_step: Optional[Callable[[Any, list[dict], int], list[dict]]] = None
    # after_step(module, step): e.g. re-apply pruning masks, update fake-quant observers.
    after_step: Optional[Callable[[Any, int], None]] = None
    subdir: str = ""
    # collate(items) -> dict of tensors: how a micro-batch's examples become a batch; None = the language-model
    # collate (data.collate: right-padded input_ids, labels, attention_mask). A general field, for data that is not
    # tokenized text.
    collate: Optional[Callable[[list[Any]], dict]] = None


@dataclass
class Stage:
    """What a method does with the student: zero or more phases, then the deliverable."""

    phases: Iterable[Phase]  # a list, or a generator (Born-Again: generation k+1 needs generation k trained)
    # finalize() -> the model to save/evaluate/export (QAT conversion, pruning commit); None = the student as trained
    finalize: Optional[Callable[[], torch.nn.Module]] = None
    # extra evaluation rows ({"student (peer 2)": model, ...}), evaluated with the others in one teacher pass
    eval_rows: Callable[[], dict[str, torch.nn.Module]] = field(default=lambda: {})
    # the held-out examples every row is evaluated on; None = the recipe's held-out split (ctx.eval_examples).
    # A teacher-data method may evaluate on the teacher's own answers to the held-out prompts instead.
    eval_examples: Optional[list[dict]] = None


# ----------------------------------------------------------------------------------------------
# What a method gets


@dataclass
class Context:
    """Everything loaded and checked before the method runs; `teacher()` loads the teacher lazily."""

    recipe: Any
    student: Any  # models.Loaded: .model (trained in place), .tokenizer
    train_examples: list[dict]
    eval_examples: list[dict]
    vocab: int
    pad_id: int
    device: Any
    run_dir: Path
    echo: Callable[[str], None] = print
    main: bool = True  # this process is rank 0 (writes files)
    wait: Callable[[], None] = lambda: None  # barrier across processes
    artifact: Any = None  # what method.prepare returned
    load_teacher: Optional[Callable[[], Any]] = None
    _teacher: Any = None

    def teacher(self) -> Any:
        """The frozen teacher (`models.Loaded`), loaded on first use."""
        if self._teacher is None:
            if self.load_teacher is None:
                raise DistilError("teacher.source: this method needs a teacher, found none")
            self._teacher = self.load_teacher()
        return self._teacher

    @property
    def has_teacher(self) -> bool:
        return self._teacher is not None

    def drop_teacher(self) -> None:
        self._teacher = None


TeacherUse = Literal["train", "prepare", "none"]


@dataclass(frozen=True)
class Method:
    """A distillation method: a name, what it needs, and two functions. See the module docstring."""

    name: str
    summary: str  # one line for `distil validate --explain` and the README
    teacher: TeacherUse | Callable[[Any], TeacherUse]  # or a function of the recipe (an option may need it)
    build: Callable[[Context], Stage]
    prepare: Optional[Callable[[Context], Any]] = None
    options: Optional[type] = None  # dataclass of the method's own recipe section
    section: Optional[str] = None  # its key in the recipe (defaults to the method's name)
    check: Optional[Callable[[Any, str], None]] = None  # cross-key checks at validation time
    # "same": the method compares token distributions, so teacher and student share one vocabulary (checked before
    # anything is loaded twice); "any": it learns the teacher's text only and works across tokenizers (the
    # evaluation then has no KL/agreement columns). A function of the recipe when an option decides.
    tokenizers: Literal["same", "any"] | Callable[[Any], str] = "same"
    # the recipe key naming the objective when the method's own section has it (e.g. "onpolicy.loss"): what
    # `distil validate`, the run header and report.md print instead of distill.loss
    loss_key: str = "distill.loss"

    def teacher_use(self, recipe: Any) -> TeacherUse:
        return self.teacher(recipe) if callable(self.teacher) else self.teacher

    def tokenizer_use(self, recipe: Any) -> str:
        return self.tokenizers(recipe) if callable(self.tokenizers) else self.tokenizers

    def loss_name(self, recipe: Any) -> str:
        """The objective this recipe trains with, as `key=value` when it is not distill.loss."""
        section, key = self.loss_key.split(".")
        return self.format_loss(getattr(getattr(recipe, section), key))

    def format_loss(self, value: Any) -> str:
        """The loss_key's value as the run header, report.md and report.html print it."""
        return str(value) if self.loss_key == "distill.loss" else f"{self.loss_key}={value}"

    @property
    def section_name(self) -> str | None:
        return (self.section or self.name) if self.options is not None else None
