"""The Python API: distil any `nn.Module` pair (a classifier, a custom model) through THE training loop.

    import distil
    result = distil.distill(teacher, student, (x_train, y_train), loss="kd", temperature=4.0, alpha=0.9,
                            epochs=10, batch_size=64, lr=3e-3, eval_data=(x_test, y_test))
    result.student, result.eval["student"]["accuracy"], result.history[-1]["loss"]

Language models keep using recipes (`distil run`); this is the same loop (`distil.trainer.train`: AdamW, warmup +
cosine, clipping, metrics.jsonl, atomic checkpoints, exact resume, accelerate/DDP) with a batch made of tensors:

  - data: a tuple of tensors (X, Y), a list of (x, y) pairs, of dicts of tensors, or a map-style torch Dataset of
    either. A pair calls `model(x)` and `y` is the label; a dict calls `model(**inputs)` with every key but
    "labels". Labels are class indices (int64), any leading shape ([N] for classifiers, [N, S] for sequence
    taggers); -100 marks an item without a label. Items without labels need alpha = 1 (soft targets only).
  - outputs: a tensor of logits [..., C], or anything with `.logits` (Hugging Face) or a "logits" key.
  - the student and every learned extra part (feature projections, peers) are one `Trainable`, so the optimizer,
    checkpoints, resume and DDP see all of them; the teacher is frozen outside it (eval mode, no_grad).

The loss of a batch, over its labelled items i (the trainer divides sums by the global item count):

    logit term   alpha * T^2 KL(softmax(z_T/T) || softmax(z_S/T)) + (1 - alpha) CE(z_S, y)   (Hinton et al. 2015;
                 loss="kd", i.e. distil.losses' forward_kl; any other distil.losses divergence by name; "ce" for
                 labels only)
    + sum of the weighted feature terms (FeaturePair: FitNets hints through a learned projection; AttentionPair:
      Zagoruyko & Komodakis' attention transfer) and relation terms (RelationPair: RKD over the samples of the
      batch, FSP between two layers), each a batch mean counted once per item.

`born_again` (Furlanello et al. 2018) and `mutual` (deep mutual learning, Zhang et al. 2018) are the same loop
with generations and with peers.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor, nn

from distil.errors import DistilError
from distil.losses import DIVERGENCES, LossOutput, distillation_loss, hard_ce, token_divergence
from distil.methods.contract import Trainable

IGNORE = -100
LOSSES = ("kd", "ce") + DIVERGENCES


# ----------------------------------------------------------------------------------------------------------------
# What a user writes


@dataclass
class AttentionPair:
    """Attention transfer (Zagoruyko & Komodakis 2017) between two conv feature maps [B, C, H, W] of equal spatial
    size (the channel counts may differ): || Q_S/|Q_S| - Q_T/|Q_T| ||, Q = sum_c |F_c|^p."""

    student: str  # module path in the student
    teacher: str  # module path in the teacher
    weight: float = 1.0
    p: float = 2.0


@dataclass
class RelationPair:
    """A relation-based term.

    kind "rkd": RKD (Park et al. 2019) between the samples of a batch, on the outputs of module `student` /
    `teacher` flattened to one embedding per sample ("" = the model's output): lambda_d * distance + lambda_a *
    angle (Huber). Needs batches of at least 3 samples (2 with lambda_a = 0).
    kind "fsp": FSP (Yim et al. 2017): `student` and `teacher` are lists of (path_a, path_b) layer pairs; the
    student's FSP matrices learn the teacher's (each normalised: FSP's known instability; the loop clips
    gradients too). Student maps whose channel counts differ from the teacher's go through a learned 1x1
    projection first."""

    kind: Literal["rkd", "fsp"]
    student: Any
    teacher: Any
    weight: float = 1.0
    lambda_d: float = 1.0
    lambda_a: float = 2.0
    normalize: bool = True
    samples: int | None = None  # RKD on the first `samples` items of each batch only (the angle term costs B^3)


@dataclass
class DistillResult:
    """What `distill`, `born_again` and `mutual` return."""

    student: nn.Module  # the deliverable: trained in place (born_again: the last generation)
    history: list[dict]  # metrics.jsonl rows of the (last) training: step, loss, kd, ce, feature ..., lr, grad_norm
    eval: dict[str, dict] | None = None  # row -> {accuracy, ce, kl, agreement, items} on eval_data
    run_dir: Path | None = None  # None: trained in a temporary directory, removed afterwards
    students: list[nn.Module] = field(default_factory=list)  # born_again: every generation; mutual: every peer
    histories: dict[str, list[dict]] = field(default_factory=dict)  # per generation / phase
    seconds: float = 0.0


# ----------------------------------------------------------------------------------------------------------------
# Data


class _Pairs(torch.utils.data.Dataset):
    """(X, Y) tensors as a dataset of (x, y) items."""

    def __init__(self, tensors: tuple[Tensor, ...]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(t[i] for t in self.tensors)


def as_dataset(data: Any, what: str = "train_data") -> Any:
    """Anything with len() and [i] that yields (x, y) / (x,) / x / {name: tensor} items."""
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        if len({len(t) for t in data}) != 1:
            raise DistilError(f"{what}: expected tensors with one first dimension, found "
                              f"{[tuple(t.shape) for t in data]}")
        data = _Pairs(data)
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise DistilError(f"{what}: expected a tuple of tensors (X, Y), a list of (x, y) or dict items, or a "
                          f"map-style torch Dataset, found {type(data).__name__}")
    if len(data) == 0:
        raise DistilError(f"{what}: expected at least one example, found none")
    return data


def _stack(values: list[Any], what: str) -> Tensor:
    try:
        return torch.stack([torch.as_tensor(v) for v in values])
    except (RuntimeError, TypeError) as exc:
        raise DistilError(f"{what}: the items of a batch must stack into one tensor ({exc})") from None


def collate(items: list[Any]) -> dict[str, Tensor]:
    """A micro-batch of items -> {"x": ..., "labels": ...} (pairs) or {name: stacked} (dicts)."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _stack([it[k] for it in items], f"data key {k!r}") for k in first}
    if isinstance(first, (tuple, list)):
        batch = {"x": _stack([it[0] for it in items], "data inputs")}
        if len(first) > 1:
            batch["labels"] = _stack([it[1] for it in items], "data labels").long()
        return batch
    return {"x": _stack(items, "data inputs")}


def count_items(batch: dict) -> int:
    """Items of a micro-batch: its labelled entries (label != -100), or its rows when it has no labels."""
    labels = batch.get("labels")
    return int((labels != IGNORE).sum()) if labels is not None else len(next(iter(batch.values())))


def logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise DistilError(f"model output: expected a tensor of logits, or an output with .logits, found "
                      f"{type(out).__name__}")


def call(model: nn.Module, batch: dict) -> Any:
    """The model's forward on a batch: model(x) for pairs, model(**inputs) for dict items."""
    if "x" in batch:
        return model(batch["x"])
    return model(**{k: v for k, v in batch.items() if k != "labels"})


# ----------------------------------------------------------------------------------------------------------------
# The logit loss


def logit_loss(s_logits: Tensor, t_logits: Tensor | None, labels: Tensor | None, *, loss: str = "kd",
               temperature: float = 4.0, alpha: float = 0.9, num_items: float | None = None) -> LossOutput:
    """(alpha * sum_i T^2 D(p_T^T, p_S^T) + (1 - alpha) * sum_i CE(z_S, y_i)) / num_items over the labelled items
    (Hinton's KD for loss="kd": D = KL(p_T || p_S)); loss="ce" (or no teacher): sum CE / num_items.
    s_logits [..., C], labels [...] (-100 = no label), teacher logits detached. Metrics: kd, ce."""
    if loss == "ce" or t_logits is None:
        if labels is None:
            raise DistilError("labels: a hard-label loss needs labelled data, found items without labels")
        ce = hard_ce(s_logits, labels)
        denom = max(float(num_items if num_items is not None else int((labels != IGNORE).sum())), 1.0)
        total = ce.sum() / denom
        return LossOutput(total, {"ce": total.detach()}, int((labels != IGNORE).sum()))
    kind = "forward_kl" if loss == "kd" else loss
    if labels is None:
        if alpha < 1:
            raise DistilError(f"alpha: the data has no labels, so only the soft term can train: expected alpha=1.0, "
                              f"found {alpha}")
        labels = torch.zeros(s_logits.shape[:-1], dtype=torch.long, device=s_logits.device)
        out = distillation_loss(s_logits, t_logits.detach(), labels, kind=kind, alpha=1.0, temperature=temperature,
                                num_items=num_items, chunk_size=None)
        return LossOutput(out.loss, {"kd": out.metrics["kd"]}, out.n_tokens)
    return distillation_loss(s_logits, t_logits.detach(), labels, kind=kind, alpha=alpha, temperature=temperature,
                             num_items=num_items, chunk_size=None)


# ----------------------------------------------------------------------------------------------------------------
# Feature and relation terms: one Trainable (student + projections), the teacher outside


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


class _Terms:
    """The feature / relation terms of one distillation: which paths to capture, the learned parts (extras) and
    the weighted per-batch value (each term a batch mean)."""

    def __init__(self, features: Sequence[Any], relations: Sequence[RelationPair], teacher: nn.Module | None,
                 student: nn.Module, probe_batch: dict | None, batch_size: int):
        self.attention = [f for f in features if isinstance(f, AttentionPair)]
        self.feature_pairs = [f for f in features if not isinstance(f, AttentionPair)]
        if self.feature_pairs:
            from distil.features import FeaturePair

            for f in self.feature_pairs:
                if not isinstance(f, FeaturePair):
                    raise DistilError(f"features: expected FeaturePair or AttentionPair items, found "
                                      f"{type(f).__name__}")
        self.relations = list(relations)
        for r in self.relations:
            if not isinstance(r, RelationPair) or r.kind not in ("rkd", "fsp"):
                raise DistilError(f"relations: expected RelationPair(kind='rkd'|'fsp', ...) items, found {r!r}")
            if r.kind == "rkd":
                need = 3 if r.lambda_a else 2
                used = min(batch_size, r.samples or batch_size)
                if used < need:
                    raise DistilError(f"relations: RKD relates the samples of a batch: expected batch_size (and "
                                      f"samples) >= {need}{' (its angle term needs triplets)' if need == 3 else ''}, "
                                      f"found {used}")
            elif not (isinstance(r.student, (list, tuple)) and isinstance(r.teacher, (list, tuple))
                      and len(r.student) == len(r.teacher) and r.student
                      and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in [*r.student, *r.teacher])):
                raise DistilError(f"relations: FSP: expected student and teacher as equally long lists of "
                                  f"(path_a, path_b) layer pairs, found {r.student!r} and {r.teacher!r}")
        if (self.feature_pairs or self.attention or self.relations) and teacher is None:
            raise DistilError("features/relations: expected a teacher to match, found teacher=None")
        self.s_paths = sorted({f.student for f in [*self.feature_pairs, *self.attention]}
                              | {p for r in self.relations for p in _rel_paths(r.student, r.kind)})
        self.t_paths = sorted({f.teacher for f in [*self.feature_pairs, *self.attention]}
                              | {p for r in self.relations for p in _rel_paths(r.teacher, r.kind)})
        self.extras: dict[str, nn.Module] = {}
        if not self.s_paths:
            return
        from distil.features import FeatureMatcher, capture, resolve, make_projection

        for p in self.s_paths:
            resolve(student, p)  # a bad path fails here with the nearest valid ones
        for p in self.t_paths:
            resolve(teacher, p)
        shapes = []
        for model, paths in ((student, self.s_paths), (teacher, self.t_paths)):
            was = model.training
            model.eval()
            try:
                with torch.no_grad(), capture(model, paths) as feats:
                    call(model, {k: v.to(_device(model)) for k, v in probe_batch.items()})
            finally:
                model.train(was)
            shapes.append({p: tuple(v.shape) for p, v in feats.items()})
        if self.feature_pairs:
            self.extras["features"] = FeatureMatcher(self.feature_pairs, shapes[0], shapes[1])
        fsp = nn.ModuleDict()
        for r_i, r in enumerate(self.relations):
            if r.kind != "fsp":
                continue
            for pair_i, (sp, tp) in enumerate(zip(r.student, r.teacher)):
                for side in (0, 1):
                    s_shape, t_shape = shapes[0][sp[side]], shapes[1][tp[side]]
                    if s_shape[1] != t_shape[1]:
                        fsp[f"{r_i}_{pair_i}_{side}"] = make_projection(s_shape[1], t_shape[1],
                                                                        conv=len(s_shape) == 4)
        if len(fsp):
            self.extras["fsp"] = fsp

    @property
    def active(self) -> bool:
        return bool(self.s_paths)

    def student_side(self, m: Trainable, feats: dict[str, Tensor]) -> dict:
        """Run inside the Trainable's forward (DDP): the learned projections of the student's features."""
        out: dict[str, Any] = {"feats": feats}
        if "features" in m.extras:
            out["projected"] = m.extras["features"].project(feats)
        if "fsp" in m.extras:
            out["fsp"] = {k: proj(_fsp_input(feats, k, self.relations)) for k, proj in m.extras["fsp"].items()}
        return out

    def value(self, m: Any, side: dict, t_feats: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """sum of weighted terms (batch means) and each term's value."""
        from distil.features import attention_transfer
        from distil.relations import fsp_loss, rkd_loss

        feats, terms = side["feats"], {}
        if self.feature_pairs:
            matcher = _extras(m)["features"]
            losses = matcher.losses(side["projected"], t_feats)
            terms["feature"] = sum(p.weight * x for p, x in zip(self.feature_pairs, losses))
        if self.attention:
            terms["attention"] = sum(a.weight * attention_transfer(feats[a.student], t_feats[a.teacher].detach(), a.p)
                                     for a in self.attention)
        for r_i, r in enumerate(self.relations):
            if r.kind == "rkd":
                k = r.samples or len(feats[r.student])
                v = rkd_loss(_flat(feats[r.student][:k]), _flat(t_feats[r.teacher][:k].detach()), r.lambda_d,
                             r.lambda_a)
            else:
                pairs_s = [tuple(side.get("fsp", {}).get(f"{r_i}_{i}_{k}", feats[sp[k]]) for k in (0, 1))
                           for i, sp in enumerate(r.student)]
                pairs_t = [(t_feats[tp[0]].detach(), t_feats[tp[1]].detach()) for tp in r.teacher]
                v = fsp_loss(pairs_s, pairs_t, normalize=r.normalize)
            terms[r.kind] = terms.get(r.kind, 0) + r.weight * v
        total = sum(terms.values())
        return total, terms


def _rel_paths(spec: Any, kind: str) -> list[str]:
    if kind == "rkd":
        return [spec or ""]
    return [p for pair in spec for p in pair]


def _fsp_input(feats: dict[str, Tensor], key: str, relations: list[RelationPair]) -> Tensor:
    r_i, pair_i, side = (int(x) for x in key.split("_"))
    return feats[relations[r_i].student[pair_i][side]]


def _extras(m: Any) -> nn.ModuleDict:
    return getattr(m, "module", m).extras


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(models: dict[str, nn.Module], data: Any, *, teacher: nn.Module | None = None,
             batch_size: int = 256) -> dict[str, dict]:
    """Each model's accuracy (argmax == label), mean CE, and with a teacher KL(p_T || p_S) at T=1 and top-1
    agreement with it, over the labelled items of `data`; the teacher is the row "teacher". Modes restored."""
    data = as_dataset(data, "eval_data")
    rows = {"teacher": teacher, **models} if teacher is not None else dict(models)
    device = _device(*rows.values())
    states = {name: m.training for name, m in rows.items()}
    sums = {name: {"correct": 0.0, "nll": 0.0, "kl": 0.0, "agree": 0.0} for name in rows}
    n = 0
    try:
        for m in rows.values():
            m.eval()
        for start in range(0, len(data), batch_size):
            batch = {k: v.to(device) for k, v in
                     collate([data[i] for i in range(start, min(start + batch_size, len(data)))]).items()}
            labels = batch.get("labels")
            if labels is None:
                raise DistilError("eval_data: expected labelled items (x, y), found items without labels")
            valid = labels != IGNORE
            n += int(valid.sum())
            outs = {name: logits_of(call(m, batch))[valid].double() for name, m in rows.items()}
            t = outs.get("teacher")
            for name, z in outs.items():
                s = sums[name]
                s["correct"] += float((z.argmax(-1) == labels[valid]).sum())
                s["nll"] += float(torch.nn.functional.cross_entropy(z, labels[valid], reduction="sum"))
                if t is not None:
                    s["kl"] += float(token_divergence(z, t, "forward_kl").sum())
                    s["agree"] += float((z.argmax(-1) == t.argmax(-1)).sum())
    finally:
        for name, m in rows.items():
            m.train(states[name])
    out = {}
    for name, s in sums.items():
        row = {"accuracy": s["correct"] / max(n, 1), "ce": s["nll"] / max(n, 1), "items": n}
        if teacher is not None:
            row.update(kl=s["kl"] / max(n, 1), agreement=s["agree"] / max(n, 1))
        out[name] = row
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running the loop


@dataclass
class _Run:
    """The loop's settings of one API call."""

    spec: Any  # recipe.TrainSpec
    seed: int
    run_dir: Path | None
    resume: bool | str
    accelerator: Any

    def train(self, module: Trainable, loss_fn: Callable, data: Any, where: Path, tag: str) -> list[dict]:
        from distil.checkpoint import list_checkpoints
        from distil.trainer import train

        resume = None
        if self.resume:
            explicit = isinstance(self.resume, (str, Path)) and not isinstance(self.resume, bool)
            if explicit and Path(self.resume).resolve().parent == (where / "checkpoints").resolve():
                resume = str(self.resume)
            elif list_checkpoints(where / "checkpoints"):
                resume = "latest"
        train(module, loss_fn, data, self.spec, run_dir=where, seed=self.seed, pad_id=0, resume=resume,
              accelerator=self.accelerator, tag=tag, count=count_items, collate=collate)
        path = where / "metrics.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []


def _prepare(data: Any, *, steps: int | None, epochs: float | None, batch_size: int, lr: float, seed: int,
             run_dir: str | Path | None, resume: bool | str, train: dict) -> tuple[Any, _Run]:
    from distil.options import _build
    from distil.recipe import TrainSpec
    from distil.trainer import make_accelerator

    data = as_dataset(data)
    if resume and run_dir is None:
        raise DistilError("resume: expected a run_dir to resume from, found run_dir=None")
    if steps is not None and epochs is not None:
        raise DistilError(f"steps/epochs: expected one of them, found steps={steps} and epochs={epochs}")
    options = {"batch_size": batch_size, "lr": lr, "warmup_steps": 0, "progress": False, **train}
    spec = _build(TrainSpec, {**options, "steps": 1}, "distil.distill", "train")  # checks every value
    acc = make_accelerator(spec.precision)
    if steps is None:
        epochs = 1.0 if epochs is None else epochs
        if not epochs > 0:
            raise DistilError(f"epochs: expected a number > 0, found {epochs}")
        per_step = spec.batch_size * spec.grad_accum * acc.num_processes
        steps = max(1, math.ceil(epochs * len(data) / per_step))
    spec = _build(TrainSpec, {**options, "steps": steps}, "distil.distill", "train")
    return data, _Run(spec, seed, Path(run_dir) if run_dir is not None else None, resume, acc)


class _Where:
    """The run directory, or a temporary one removed on exit."""

    def __init__(self, run_dir: Path | None):
        self.path = run_dir if run_dir is not None else Path(tempfile.mkdtemp(prefix="distil-api-"))
        self.temporary = run_dir is None

    def __enter__(self) -> Path:
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def __exit__(self, *exc: Any) -> None:
        if self.temporary:
            shutil.rmtree(self.path, ignore_errors=True)


def _check_loss(loss: str, temperature: float, alpha: float) -> None:
    if loss not in LOSSES:
        raise DistilError(f"loss: expected one of {', '.join(LOSSES)}, found {loss!r}")
    if not temperature > 0:
        raise DistilError(f"temperature: expected a number > 0, found {temperature}")
    if not 0 <= alpha <= 1:
        raise DistilError(f"alpha: expected a number in [0, 1], found {alpha}")


def _device(*models: nn.Module) -> torch.device:
    """Where the models' weights are (the first one that has any; CPU otherwise)."""
    for m in models:
        for p in m.parameters():
            return p.device
    return torch.device("cpu")


def _frozen(teacher: nn.Module | None, device: Any = None) -> Any:
    """The teacher in eval mode while training, on the loop's device (moved there in place); its mode is restored
    afterwards."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        was = teacher.training if teacher is not None else None
        if teacher is not None:
            teacher.eval()
            if device is not None:
                teacher.to(device)
        try:
            yield
        finally:
            if teacher is not None:
                teacher.train(was)
    return ctx()


def _distill_module(teacher: nn.Module | None, student: nn.Module, data: Any, run: _Run, *, loss: str,
                    temperature: float, alpha: float, features: Sequence[Any], relations: Sequence[RelationPair]
                    ) -> tuple[Trainable, Callable]:
    """The Trainable (student + projections) and the loss function of one teacher -> student distillation."""
    probe = collate([data[i] for i in range(min(len(data), run.spec.batch_size))])
    terms = _Terms(features, relations, teacher, student, probe, run.spec.batch_size)

    def forward_fn(m: Trainable, batch: dict) -> tuple[Tensor, dict | None]:
        if not terms.active:
            return logits_of(call(m.student, batch)), None
        from distil.features import capture

        with capture(m.student, terms.s_paths) as feats:
            out = call(m.student, batch)
        return logits_of(out), terms.student_side(m, feats)

    module = Trainable(student, terms.extras, forward_fn=forward_fn)

    def loss_fn(m: Any, batch: dict, num_items: float) -> LossOutput:
        labels = batch.get("labels")
        t_logits, t_feats = None, {}
        if teacher is not None and (loss != "ce" or terms.active):
            with torch.no_grad():
                if terms.active:
                    from distil.features import capture

                    with capture(teacher, terms.t_paths) as t_feats:
                        t_logits = logits_of(call(teacher, batch))
                else:
                    t_logits = logits_of(call(teacher, batch))
        s_logits, side = m(batch)
        out = logit_loss(s_logits, t_logits if loss != "ce" else None, labels, loss=loss, temperature=temperature,
                         alpha=alpha, num_items=num_items)
        if not terms.active:
            return out
        total, values = terms.value(m, side, t_feats)
        share = count_items(batch) / max(float(num_items), 1.0)  # a batch mean counts once per item
        metrics = {**out.metrics, **{k: v.detach() * share for k, v in values.items()}}
        return LossOutput(out.loss + total * share, metrics, out.n_tokens)

    return module, loss_fn


def distill(teacher: nn.Module | None, student: nn.Module, train_data: Any, *, loss: str = "kd",
            temperature: float = 4.0, alpha: float = 0.9, features: Sequence[Any] = (),
            relations: Sequence[RelationPair] = (), steps: int | None = None, epochs: float | None = None,
            batch_size: int = 64, lr: float = 1e-3, seed: int = 0, run_dir: str | Path | None = None,
            resume: bool | str = False, eval_data: Any = None, eval_batch_size: int = 256,
            **train: Any) -> DistillResult:
    """Distil `teacher` into `student` (trained in place) on `train_data`; returns a DistillResult.

    loss: "kd" (Hinton: alpha * T^2 KL(p_T^T || p_S^T) + (1 - alpha) CE), another distil.losses divergence
    ("reverse_kl", "jsd", "tvd", ...), or "ce" (labels only; teacher=None trains the student alone).
    features: FeaturePair (distil.features: module paths, mse/cosine/nmse, a learned projection when widths
    differ) and AttentionPair items; relations: RelationPair items (RKD, FSP).
    steps, or epochs over train_data (default 1 epoch); batch_size per process; lr; seed (data order, dropout).
    run_dir: where metrics.jsonl and checkpoints/ go (None: a temporary directory); resume=True continues the
    run in run_dir from its newest checkpoint (or a checkpoint path), step for step as if never interrupted.
    eval_data: labelled held-out data; result.eval has the rows "teacher", "student (before)", "student".
    **train: any other `train:` key of a recipe (warmup_steps, weight_decay, max_grad_norm, grad_accum,
    save_every, keep_last, min_lr_ratio, betas, precision, threads, progress, log_every).
    """
    _check_loss(loss, temperature, alpha)
    if teacher is None and loss != "ce":
        raise DistilError(f"teacher: loss {loss!r} needs a teacher, found None (loss='ce' trains the student alone)")
    data, run = _prepare(train_data, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         run_dir=run_dir, resume=resume, train=train)
    t0 = time.perf_counter()
    before = copy.deepcopy(student) if eval_data is not None else None
    with _frozen(teacher, run.accelerator.device), _Where(run.run_dir) as where:
        module, loss_fn = _distill_module(teacher, student, data, run, loss=loss, temperature=temperature,
                                          alpha=alpha, features=features, relations=relations)
        history = run.train(module, loss_fn, data, where, "distill")
    result = DistillResult(student=student, history=history, run_dir=run.run_dir, students=[student],
                           seconds=time.perf_counter() - t0)
    if eval_data is not None:
        result.eval = evaluate({"student (before)": before, "student": student}, eval_data, teacher=teacher,
                               batch_size=eval_batch_size)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Self-distillation: Born-Again Networks


def fresh_copy(template: nn.Module | Callable[[], nn.Module], seed: int) -> nn.Module:
    """A freshly initialised model of the template's architecture: `template()` when it is a factory, else a copy
    whose every submodule with `reset_parameters` is re-initialised; seeded, so a resumed run rebuilds it."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if not isinstance(template, nn.Module):
            return template()
        model = copy.deepcopy(template)
        for sub in model.modules():
            if hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
        return model
    finally:
        torch.random.set_rng_state(state)


def born_again(student: nn.Module | Callable[[], nn.Module], train_data: Any, *, generations: int = 3,
               teacher: nn.Module | None = None, ensemble: bool = True, loss: str = "kd", temperature: float = 4.0,
               alpha: float = 0.9, steps: int | None = None, epochs: float | None = None, batch_size: int = 64,
               lr: float = 1e-3, seed: int = 0, run_dir: str | Path | None = None, resume: bool | str = False,
               eval_data: Any = None, eval_batch_size: int = 256, **train: Any) -> DistillResult:
    """Born-Again Networks (Furlanello et al. 2018): `generations` students of one architecture, each freshly
    initialised and trained on the previous generation's soft targets plus the labels (the `loss`, alpha, T of
    `distill`), with the same budget (steps or epochs) each.

    `student`: a module (each generation a seeded re-initialisation of it; the module itself is not trained) or
    a factory returning a fresh one. Generation 1 learns from `teacher`; with teacher=None it learns from
    generation 0, the same architecture trained on the labels alone (the paper's born-again setting).
    Each generation trains in run_dir/gen-<k>/ (own metrics and checkpoints; resume continues each one from its
    newest checkpoint). result.student is the last generation, result.students all of them; with eval_data a row
    per generation and, with `ensemble`, the row "ensemble" (the mean of every distilled generation's
    probabilities, BAN's ensemble)."""
    from distil.methods.born_again import Ensemble

    if not isinstance(generations, int) or generations < 1:
        raise DistilError(f"generations: expected an integer >= 1, found {generations!r}")
    _check_loss(loss, temperature, alpha)
    data, run = _prepare(train_data, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         run_dir=run_dir, resume=resume, train=train)
    t0 = time.perf_counter()
    models: list[nn.Module] = []
    histories: dict[str, list[dict]] = {}
    with _Where(run.run_dir) as where:
        previous = teacher
        first = 1 if teacher is not None else 0
        for g in range(first, generations + 1):
            model = fresh_copy(student, seed * 1000 + g)
            with _frozen(previous, run.accelerator.device):
                module, loss_fn = _distill_module(previous, model, data, run,
                                                  loss=loss if previous is not None else "ce",
                                                  temperature=temperature, alpha=alpha, features=(), relations=())
                histories[f"gen-{g}"] = run.train(module, loss_fn, data, where / f"gen-{g}", f"gen-{g}")
            models.append(model)
            previous = model
    result = DistillResult(student=models[-1], history=histories[f"gen-{generations}"], run_dir=run.run_dir,
                           students=models, histories=histories, seconds=time.perf_counter() - t0)
    if eval_data is not None:
        rows = {f"generation {first + i}": m for i, m in enumerate(models)}
        distilled = models[1:] if first == 0 else models  # generation 0 learned from the labels only
        if ensemble and len(distilled) > 1:
            rows["ensemble"] = Ensemble(distilled)
        result.eval = evaluate(rows, eval_data, teacher=teacher, batch_size=eval_batch_size)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Online distillation: deep mutual learning


def mutual(peers: Sequence[nn.Module], train_data: Any, *, weight: float = 1.0, temperature: float = 1.0,
           teacher: nn.Module | None = None, loss: str = "kd", kd_temperature: float = 4.0, alpha: float = 0.9,
           lr_scales: Sequence[float] | None = None,
           steps: int | None = None, epochs: float | None = None, batch_size: int = 64, lr: float = 1e-3,
           seed: int = 0, run_dir: str | Path | None = None, resume: bool | str = False, eval_data: Any = None,
           eval_batch_size: int = 256, **train: Any) -> DistillResult:
    """Deep mutual learning (Zhang et al. 2018): the peers train together, each on

        L_k = CE(z_k, y) + weight * mean_{l != k} T^2 KL(p_l || p_k)      (p_l detached; T = `temperature`)

    With a frozen `teacher`, CE(z_k, y) is replaced by the `distill` loss against it (loss, kd_temperature,
    alpha). For online distillation with a teacher that keeps learning, pass the teacher as one of the peers, and
    with `lr_scales` (one per peer, a multiple of `lr` each; e.g. [1.0, 0.1]) give it a smaller learning rate;
    with lr_scales every peer is also its own optimizer group, gradient-clipped on its own (the paper's one
    optimizer per network); without, the peers share one group and one clip.
    Every peer is in one Trainable (one optimizer, one checkpoint, DDP-wrapped together). result.student is
    peers[0], result.students every peer; with eval_data a row per peer ("peer 1", "peer 2", ...)."""
    from distil.methods.mutual import peer_kl

    peers = list(peers)
    if len(peers) < 2:
        raise DistilError(f"peers: deep mutual learning trains two or more models together, found {len(peers)}")
    if len({id(p) for p in peers}) != len(peers):
        raise DistilError("peers: expected distinct models, found the same module twice")
    if not weight >= 0:
        raise DistilError(f"weight: expected a number >= 0, found {weight}")
    if not temperature > 0:
        raise DistilError(f"temperature: expected a number > 0, found {temperature}")
    _check_loss(loss, kd_temperature, alpha)
    if lr_scales is not None and (len(lr_scales) != len(peers) or not all(
            isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in lr_scales)):
        raise DistilError(f"lr_scales: expected one number > 0 per peer ({len(peers)}), found {list(lr_scales)}")
    data, run = _prepare(train_data, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         run_dir=run_dir, resume=resume, train=train)
    t0 = time.perf_counter()
    names = [f"peer{k}" for k in range(2, len(peers) + 1)]

    def forward_fn(m: Trainable, batch: dict) -> list[Tensor]:
        return [logits_of(call(p, batch)) for p in [m.student, *(m.extras[n] for n in names)]]

    module = Trainable(peers[0], dict(zip(names, peers[1:])), forward_fn=forward_fn,
                       lr_scale=dict(zip(["student", *names], map(float, lr_scales))) if lr_scales else None)

    def loss_fn(m: Any, batch: dict, num_items: float) -> LossOutput:
        labels = batch.get("labels")
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = logits_of(call(teacher, batch))
        logits = m(batch)
        total, metrics = 0.0, {}
        for k, z in enumerate(logits):
            base = logit_loss(z, t_logits, labels, loss=loss if teacher is not None else "ce",
                              temperature=kd_temperature, alpha=alpha, num_items=num_items)
            kl = peer_kl(logits, k, labels, temperature=temperature, num_items=num_items)
            total = total + base.loss + weight * kl
            for name, v in base.metrics.items():
                metrics[f"{name}_{k + 1}"] = v
            metrics[f"mutual_{k + 1}"] = kl.detach()
        return LossOutput(total, metrics, count_items(batch))

    with _frozen(teacher, run.accelerator.device), _Where(run.run_dir) as where:
        history = run.train(module, loss_fn, data, where, "mutual")
    result = DistillResult(student=peers[0], history=history, run_dir=run.run_dir, students=peers,
                           seconds=time.perf_counter() - t0)
    if eval_data is not None:
        result.eval = evaluate({f"peer {k + 1}": p for k, p in enumerate(peers)}, eval_data, teacher=teacher,
                               batch_size=eval_batch_size)
    return result
