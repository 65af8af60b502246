"""Online distillation: deep mutual learning (Zhang et al. 2018), and a teacher that keeps training.

"Online" is the glossary's sense: the models train together, instead of a frozen, pre-trained teacher (offline).
`peers` students of one architecture train in one step, each on its own loss plus the KL to the others'
predictions, which are detached (each peer learns from the others, never through them):

    L_k = base_k + weight * mean_{l != k} T^2 KL(p_l || p_k)          (T = mutual.temperature, p_l detached)

    base_k   online_teacher: false   the `distill` section's loss against the frozen teacher (offline KD)
             online_teacher: true    the same loss against the teacher's CURRENT predictions (detached): the
                                     teacher is one more peer, trained too, on
                                     L_T = CE(z_T, y) + weight * mean_k T^2 KL(p_k || p_T)

Every peer (and the training teacher) is in one Trainable (the student + extras), so the optimizer,
checkpoints, resume and DDP see all of them; only the student is saved and exported. The training teacher's
learning rate is `teacher_lr_scale` x train.lr, in its own optimizer parameter group with its own gradient clip
(clipped with the students, its larger gradients would shrink their steps). The evaluation gains a
row per other peer, and the trained teacher's row (the "teacher" row stays the frozen original).

Peers 2.. start from the student's initial weights plus seeded Gaussian noise (`peer_init: perturbed`: two
identical copies on the same batches would stay identical) or from a fresh random initialisation (`random`,
the paper's setting, which needs far more steps than a depth-pruned copy of the teacher).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from distil.errors import DistilError
from distil.heads import shift
from distil.losses import LossOutput, distillation_loss, hard_ce
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.models import random_like
from distil.options import option


@dataclass
class MutualSpec:
    """Online distillation: deep mutual learning between student peers, and a teacher that trains with them."""

    peers: int = option(2, "Student peers trained together: the student and peers-1 more of its architecture, each "
                           "on its loss plus the KL to the others' (detached) predictions. Only the student is "
                           "saved and exported.", ge=1)
    weight: float = option(1.0, "Weight of the mutual term: mean over the other peers of T^2 KL(p_other || p_self).",
                           ge=0.0)
    temperature: float = option(1.0, "Softmax temperature T of the mutual term (the paper's is 1).", gt=0.0)
    online_teacher: bool = option(False, "true: the teacher trains too, as one more peer (online distillation: "
                                         "labels + the KL to the students' predictions), and the students learn "
                                         "from its current predictions; false: it stays frozen (offline).")
    teacher_lr_scale: float = option(1.0, "online_teacher: the teacher's learning rate as a multiple of train.lr "
                                          "(the schedule applies alike; it is also gradient-clipped on its own). "
                                          "At 1 a trained teacher drifts from what it knew (README: measured).",
                                     gt=0.0)
    peer_init: Literal["perturbed", "random"] = option(
        "perturbed", "How peers 2.. start: the student's initial weights plus Gaussian noise of std noise x each "
                     "weight tensor's std (seeded), or a fresh random initialisation of its architecture.")
    noise: float = option(0.01, "peer_init perturbed: the noise's std relative to each weight tensor's std.", ge=0.0)


def peer_kl(logits: list[Tensor], k: int, labels: Tensor | None, *, temperature: float = 1.0,
            num_items: float | None = None, chunk_size: int | None = None) -> Tensor:
    """The mutual term of peer k: mean over l != k of sum_items T^2 KL(p_l || p_k) / num_items, p = softmax(z/T),
    with z_l detached (gradient to peer k only). logits [..., C] each; labels [...] (-100 = not an item; None =
    every position is one)."""
    others = [z for i, z in enumerate(logits) if i != k]
    if not others:
        raise DistilError("mutual: a peer needs at least one other peer to learn from, found none")
    if labels is None:
        labels = torch.zeros(logits[k].shape[:-1], dtype=torch.long, device=logits[k].device)
    total = sum(distillation_loss(logits[k], z.detach(), labels, kind="forward_kl", alpha=1.0,
                                  temperature=temperature, num_items=num_items, chunk_size=chunk_size).loss
                for z in others)
    return total / len(others)


def make_peer(student: torch.nn.Module, spec: MutualSpec, seed: int) -> torch.nn.Module:
    """Peer k: the student's initial weights with seeded relative noise, or a seeded fresh initialisation; the
    same trainable parameters (frozen embeddings stay frozen)."""
    g = torch.Generator().manual_seed(seed)
    if spec.peer_init == "random":
        return random_like(student, seed)
    peer = copy.deepcopy(student)
    with torch.no_grad():
        for p in peer.parameters():
            if p.requires_grad and p.numel() > 1 and spec.noise > 0:
                noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p)
                p.add_(noise * (spec.noise * float(p.float().std())))
    return peer


def stage(ctx: Context) -> Stage:
    spec, dspec = ctx.recipe.mutual, ctx.recipe.distill
    teacher = ctx.teacher().model
    names = [f"peer{k}" for k in range(2, spec.peers + 1)]
    extras: dict[str, torch.nn.Module] = {n: make_peer(ctx.student.model, spec, ctx.recipe.seed + k)
                                          for k, n in enumerate(names, start=2)}
    if spec.online_teacher:  # a trainable copy: the frozen original stays the evaluation's "teacher" row
        online = copy.deepcopy(teacher).to(torch.float32).train()
        for p in online.parameters():
            p.requires_grad_(True)
        extras["teacher"] = online
        names.append("teacher")
    n_students = spec.peers
    vocab, chunk = ctx.vocab, dspec.chunk_size

    def forward_fn(m: Trainable, **batch: Any) -> list[Tensor]:
        return [m.student(**batch).logits, *(m.extras[n](**batch).logits for n in names)]

    module = Trainable(ctx.student.model, extras, forward_fn=forward_fn,
                       lr_scale={"teacher": spec.teacher_lr_scale} if spec.online_teacher else None)

    def loss_fn(m: Any, batch: dict, num_items: float) -> LossOutput:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        shifted = [shift(z, batch["labels"], vocab) for z in m(**inputs)]
        labels = shifted[0][1]
        logits = [z for z, _ in shifted]
        students = logits[:n_students]
        if spec.online_teacher:
            t_logits = logits[n_students].detach()
        else:
            with torch.no_grad():
                t_logits, _ = shift(teacher(**inputs).logits, batch["labels"], vocab)
        total, metrics = torch.zeros((), device=labels.device), {}
        for k, z in enumerate(students):
            tag = "" if k == 0 else f"_{k + 1}"
            base = distillation_loss(z, t_logits, labels, kind=dspec.loss, alpha=dspec.alpha,
                                     temperature=dspec.temperature, beta=dspec.beta, skew_alpha=dspec.skew_alpha,
                                     num_items=num_items, chunk_size=chunk)
            total = total + base.loss
            metrics.update({f"{name}{tag}": v for name, v in base.metrics.items()})
            if n_students > 1:
                kl = peer_kl(students, k, labels, temperature=spec.temperature, num_items=num_items,
                             chunk_size=chunk)
                total = total + spec.weight * kl
                metrics[f"mutual{tag}"] = kl.detach()
        if spec.online_teacher:  # the teacher peer: labels + what the students predict
            z_t = logits[n_students]
            ce = hard_ce(z_t.reshape(-1, z_t.shape[-1]), labels.reshape(-1)).sum() / max(float(num_items), 1.0)
            kl = peer_kl([*students, z_t], n_students, labels, temperature=spec.temperature, num_items=num_items,
                         chunk_size=chunk)
            total = total + ce + spec.weight * kl
            metrics.update(ce_teacher=ce.detach(), mutual_teacher=kl.detach())
        return LossOutput(total, metrics, int((labels != -100).sum()))

    rows = {f"student (peer {k})": extras[n] for k, n in enumerate(names[:n_students - 1], start=2)}
    if spec.online_teacher:
        rows["teacher (online, trained)"] = extras["teacher"]
    return Stage(phases=[Phase(name="mutual", module=module, loss_fn=loss_fn, examples=ctx.train_examples)],
                 eval_rows=lambda: rows)


def check(recipe: Any, where: str) -> None:
    spec = recipe.mutual
    if spec.peers < 2 and not spec.online_teacher:
        raise DistilError(f"{where}: mutual.peers: deep mutual learning trains two or more models together: "
                          f"expected peers >= 2 (or mutual.online_teacher: true, the teacher as the other peer), "
                          f"found {spec.peers}")
    if spec.teacher_lr_scale != 1.0 and not spec.online_teacher:
        raise DistilError(f"{where}: mutual.teacher_lr_scale: sets the learning rate of a teacher that trains; "
                          f"expected mutual.online_teacher: true with it, found online_teacher: false "
                          f"(a frozen teacher has no learning rate)")


METHOD = Method(
    name="mutual",
    summary="online distillation: deep mutual learning between student peers (each learns from the others' "
            "predictions), and with online_teacher a teacher that keeps training with them",
    teacher="train",
    build=stage,
    options=MutualSpec,
    check=check,
)
