"""Feature-based distillation for language models (method `features`, section `features:`): logit KD (the
`distill` section's loss, exactly as method `offline` computes it, fused or plain) plus the teacher's hidden
states, and optionally its attention maps, layer by layer.

Layer map: student layer i learns teacher layer m[i]. By default m is the depth-pruned initialisation itself
(`student.layers`: student layer i was copied from teacher layer layers[i], the map DistilBERT and Minitron
use); `features.every_k: k` gives m[i] = k (i + 1) - 1 (the last layer of each block of k); `features.layer_map`
writes it out (null = that student layer is not matched). A layer's feature is its output (the residual stream
after the block, before the final norm), read through forward hooks (distil/features.py).

Per target position (the positions whose next token is trained: the same items the logit loss counts), the
loss of one step is

    loss = logit KD  +  weight * mean_l feature_loss(P_l(h_S,l), h_T,m[l])
                     +  attention_weight * mean_l KL(A_T,m[l] || A_S,l)      (per query row; heads mean/mapped)

summed over the global batch's target positions and divided by their count (like every loss of the loop).
P_l is a learned projection (FitNets' regressor; `projection: auto` = only where the widths differ, `on` =
everywhere, starting as the identity when the widths match, `off` = never); the projections live in the
phase's `Trainable.extras["features"]`: trained with the student, saved in its checkpoints and restored on
resume, never saved with or exported as the student. Attention maps need attention probabilities, which only
the eager attention computes: with `attention` on, both models run `attn_implementation='eager'` while training
and get their own implementation back before the evaluation and save.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

from distil.errors import DistilError
from distil.features import FeatureMatcher, FeaturePair, attention_map_loss, capture, resolve
from distil.heads import choose_fused
from distil.losses import LossOutput
from distil.methods.contract import IGNORE, Context, Method, Phase, Stage, Trainable, unwrap
from distil.methods.offline import kd_from_hidden, kd_from_logits
from distil.options import option


@dataclass
class FeaturesSpec:
    """Feature-based KD: logit KD plus the teacher's hidden states (and attention maps), layer by layer."""

    layer_map: Optional[list[Optional[int]]] = option(
        None, "Student layer i learns teacher layer layer_map[i] (null = not matched; a shorter list leaves the last "
        "student layers unmatched). Unset: the depth-pruned init's student.layers (or every layer of a full copy).")
    every_k: int = option(0, "Instead of layer_map: student layer i learns teacher layer k*(i+1)-1 (0 = off).", ge=0)
    loss: Literal["mse", "cosine", "nmse"] = option(
        "mse", "Hidden-state loss per token: mse = mean_d (s-t)^2; cosine = 1 - cos(s, t); nmse = MSE of the "
        "L2-normalised vectors, 2(1 - cos)/D.")
    weight: float = option(1.0, "Weight of the hidden-state term (mean over matched layers); 0 = no hidden-state "
                           "term. The logit term keeps distill.alpha.", ge=0.0)
    projection: Literal["auto", "on", "off"] = option(
        "auto", "Learned projection of each student hidden state to the teacher's width (FitNets regressor): "
        "auto = only where the widths differ; on = always (identity-initialised at equal widths); off = never "
        "(different widths are refused). Trained and checkpointed with the student, never exported.")
    attention: Literal["off", "mean", "mapped"] = option(
        "off", "Attention-map transfer on the same layer map: KL(teacher || student) per query row of the attention "
        "probabilities, heads averaged (mean) or student head i <- teacher head attention_heads[i] (mapped). Runs "
        "both models with eager attention while training.")
    attention_weight: float = option(1.0, "Weight of the attention-map term (mean over matched layers).", ge=0.0)
    attention_heads: Optional[list[int]] = option(
        None, "attention: mapped: the teacher head each student head learns (default: head i <- head i).")


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `features` that need no model."""
    spec, student = recipe.features, recipe.student
    if spec.layer_map is not None and spec.every_k:
        raise DistilError(f"{where}: features.every_k: expected layer_map or every_k, found both "
                          f"(layer_map={spec.layer_map}, every_k={spec.every_k})")
    if spec.layer_map is not None:
        if any(j is not None and j < 0 for j in spec.layer_map) or all(j is None for j in spec.layer_map):
            raise DistilError(f"{where}: features.layer_map: expected teacher layer indices >= 0 (null = not "
                              f"matched), at least one, found {spec.layer_map}")
        if student.layers is not None and len(spec.layer_map) > len(student.layers):
            raise DistilError(f"{where}: features.layer_map: {len(spec.layer_map)} entries, but the student has "
                              f"{len(student.layers)} layers (student.layers); expected at most "
                              f"{len(student.layers)}")
    elif not spec.every_k and student.source != "teacher":
        raise DistilError(f"{where}: features.layer_map: the student ({student.source!r}) is not a copy of the "
                          f"teacher's layers, so there is no default map; expected features.layer_map or "
                          f"features.every_k")
    if spec.attention_heads is not None and spec.attention != "mapped":
        raise DistilError(f"{where}: features.attention_heads: only with attention: mapped, found attention: "
                          f"{spec.attention!r}")
    if spec.weight == 0 and spec.attention == "off":
        raise DistilError(f"{where}: features.weight: 0 with attention: off leaves logit KD only; expected a "
                          f"weight > 0 or an attention term (or method 'offline')")


# ----------------------------------------------------------------------------------------------------------------
# Layers and paths


def layers_path(model: nn.Module) -> str:
    """The dotted path of a causal LM's decoder layers (the ModuleList of config.num_hidden_layers blocks)."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.split(".")[-1] in ("layers", "h", "layer"):
            return name
    raise DistilError(f"features: found no list of {n} decoder layers in {type(model).__name__}")


def layer_map(recipe: Any, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """[(student layer, teacher layer)] from the recipe; DistilError when it does not fit the models."""
    spec = recipe.features
    if spec.layer_map is not None:
        key, mapping = "features.layer_map", list(spec.layer_map)
    elif spec.every_k:
        key, mapping = "features.every_k", [spec.every_k * (i + 1) - 1 for i in range(n_student)]
    elif recipe.student.layers is not None:
        key, mapping = "student.layers", list(recipe.student.layers)
    else:
        key, mapping = "features.layer_map", list(range(n_student))
    if len(mapping) > n_student:
        raise DistilError(f"{key}: {len(mapping)} entries, but the student has {n_student} layers; expected at most "
                          f"{n_student}")
    past = [j for j in mapping if j is not None and j >= n_teacher]
    if past:
        raise DistilError(f"{key}: teacher layer {past[0]} does not exist; the teacher has {n_teacher} layers "
                          f"(0..{n_teacher - 1}), map {mapping}")
    return [(i, j) for i, j in enumerate(mapping) if j is not None]


def _set_attention(model: Any, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def target_positions(batch: dict) -> torch.Tensor:
    """[B, T] bool: positions t whose next token is a target (labels[t + 1] != -100); the last position never is.
    These are the items `count_targets` counts, so sums over them divided by num_items are per-token means."""
    labels = batch["labels"]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


# ----------------------------------------------------------------------------------------------------------------


def stage(ctx: Context) -> Stage:
    recipe, spec, dspec = ctx.recipe, ctx.recipe.features, ctx.recipe.distill
    teacher = ctx.teacher().model
    student = ctx.student.model
    s_layers, t_layers = layers_path(student), layers_path(teacher)
    pairs_idx = layer_map(recipe, student.config.num_hidden_layers, teacher.config.num_hidden_layers)
    hidden = spec.weight > 0
    s_hidden = [f"{s_layers}.{i}" for i, _ in pairs_idx] if hidden else []
    t_hidden = [f"{t_layers}.{j}" for _, j in pairs_idx] if hidden else []
    s_attn = [f"{s_layers}.{i}.self_attn" for i, _ in pairs_idx] if spec.attention != "off" else []
    t_attn = [f"{t_layers}.{j}.self_attn" for _, j in pairs_idx] if spec.attention != "off" else []
    heads: str | list[int] = "mean"
    if spec.attention == "mapped":
        n_s, n_t = student.config.num_attention_heads, teacher.config.num_attention_heads
        heads = list(spec.attention_heads) if spec.attention_heads is not None else list(range(n_s))
        if spec.attention_heads is None and n_s != n_t:
            raise DistilError(f"features.attention_heads: attention: mapped with {n_s} student and {n_t} teacher "
                              f"heads needs the map (one teacher head per student head), found none")
        if len(heads) != n_s or any(not 0 <= h < n_t for h in heads):
            raise DistilError(f"features.attention_heads: expected {n_s} teacher head indices in 0..{n_t - 1}, "
                              f"found {heads}")

    for model, paths in ((student, s_attn), (teacher, t_attn)):  # a model without `self_attn`: refused here
        for path in paths:
            resolve(model, path)
    restore = {}
    if s_attn:  # attention probabilities exist only in the eager implementation
        for who, model in (("student", student), ("teacher", teacher)):
            restore[who] = (model, model.config._attn_implementation)
            _set_attention(model, "eager")

    pairs = [FeaturePair(sp, tp, spec.loss, 1.0 / len(s_hidden),
                         None if spec.projection == "auto" else spec.projection == "on")
             for sp, tp in zip(s_hidden, t_hidden)]
    extras = {}
    if pairs:
        probe = ctx.train_examples[0]
        ids = torch.tensor([probe["input_ids"]], device=ctx.device)
        try:
            matcher = FeatureMatcher.probe(pairs, student, teacher, input_ids=ids)
        except DistilError as exc:
            raise DistilError(f"features.projection: {spec.projection}: {exc}") from None
        extras["features"] = matcher.to(ctx.device)

    def forward_fn(m: Trainable, input_ids: Any, attention_mask: Any, fused: bool) -> Any:
        """The student's one forward (DDP's), with its hooked layers projected inside it."""
        with capture(m.student, s_hidden) as feats, capture(m.student, s_attn, index=1) as attn:
            out = m.student(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=fused,
                            logits_to_keep=1 if fused else 0)
        projected = m.extras["features"].project(feats) if "features" in m.extras else []
        return out, projected, [attn[p] for p in s_attn]

    module = Trainable(student, extras, forward_fn=forward_fn)
    fused_ok: dict[str, Any] = {"ok": None}

    def loss_fn(model: Any, batch: dict, num_items: float) -> LossOutput:
        if fused_ok["ok"] is None:
            fused_ok["ok"] = choose_fused(dspec.fused, batch, {"teacher": teacher, "student": unwrap(model)},
                                          ctx.echo)
        fused = fused_ok["ok"]
        ids, am = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad(), capture(teacher, t_hidden) as t_feats, capture(teacher, t_attn, index=1) as t_att:
            t_out = teacher(input_ids=ids, attention_mask=am, output_hidden_states=fused,
                            logits_to_keep=1 if fused else 0)
        s_out, s_proj, s_att = model(input_ids=ids, attention_mask=am, fused=fused)
        # the logit term: method offline's computation (distil/methods/offline.py), on these forwards
        if fused:
            kd = kd_from_hidden(dspec, ctx.vocab, model, teacher, s_out.hidden_states[-1],
                                t_out.hidden_states[-1], batch["labels"], num_items)
        else:
            kd = kd_from_logits(dspec, ctx.vocab, s_out.logits, t_out.logits, batch["labels"], num_items)
        mask = target_positions(batch)
        loss, metrics = kd.loss, dict(kd.metrics)
        if pairs:
            per_pair = extras["features"].losses(s_proj, t_feats, mask, reduction="sum")
            feature = sum(p.weight * x for p, x in zip(pairs, per_pair)) / num_items
            loss = loss + spec.weight * feature
            metrics["feature"] = feature.detach()
        if s_attn:
            attention = sum(attention_map_loss(a_s, t_att[tp], mask, heads, reduction="sum")
                            for a_s, tp in zip(s_att, t_attn)) / (len(s_attn) * num_items)
            loss = loss + spec.attention_weight * attention
            metrics["attention"] = attention.detach()
        return LossOutput(loss, metrics, kd.n_tokens)

    def finalize() -> nn.Module:
        for model, impl in restore.values():  # the evaluation and the saved config see the models' own attention
            _set_attention(model, impl)
        return student

    return Stage(phases=[Phase(name="features", module=module, loss_fn=loss_fn, examples=ctx.train_examples)],
                 finalize=finalize)


METHOD = Method(
    name="features",
    summary="logit KD plus the teacher's hidden states (and attention maps) layer by layer, through hooks and a "
            "layer map (feature-based KD)",
    teacher="train",
    build=stage,
    options=FeaturesSpec,
    section="features",
    check=check,
)
