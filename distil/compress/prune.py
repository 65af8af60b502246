"""Structured pruning: remove whole layers (depth) or whole neurons and attention heads (width), and slice the
weights into a smaller model of the same architecture with a valid config (widths uniform across layers), which
transformers saves and reloads and the GGUF exporter accepts.

Depth: Block Influence (ShortGPT, Men et al. 2024). For decoder layer i with input h_in and output h_out at a
calibration token t, BI_i = 1 - mean_t cos(h_in_t, h_out_t): a layer that barely turns the residual stream
changes little and is the first to go. The `depth` layers with the highest BI are kept, in order. The control
is `depth_score: uniform` (evenly spaced layers, the first and the last included).

Width: activation importance on calibration data (Minitron, Muralidharan et al. 2024). An MLP neuron j scores
||a_j||_2 over the calibration tokens, a_j being its activation act(gate_j x) * up_j x, i.e. the input of
down_proj; an attention head scores the L2 norm over tokens and head dimensions of its attention output, the
slice of o_proj's input it owns. GQA stays valid: the `kv_heads` KV groups with the largest summed head scores
are kept and, inside each, its `heads / kv_heads` best query heads, ordered group by group so that query head
j still reads KV group j // (heads / kv_heads). Every layer keeps the same counts (the config has one width).

Removing neuron j is exactly zeroing its row of gate/up (act(0) * 0 = 0); removing a head is exactly zeroing
its columns of o_proj: the sliced model computes what the masked full model computes (tested to fp32).

Hidden channels (Minitron's embedding-channel pruning): channel c of the residual stream scores
sqrt(sum over every RMSNorm output (input_layernorm and post_attention_layernorm of every layer, and the final
norm) and every real calibration token of y_c^2), the L2 norm of what the norms hand to the linear maps and the
head in that channel (Minitron takes the LayerNorm outputs; we aggregate them as one L2 norm over tokens and
norms). The `hidden_size - H'` lowest channels go from every tensor that has the hidden axis: the embedding's
columns (and so the tied head's), every norm weight, the input columns of q/k/v/gate/up and lm_head, the output
rows of o_proj/down_proj (and their biases). An RMSNorm over H' channels of a vector whose removed channels were
0 divides by sqrt(H / H') times its RMS over H channels, so every norm weight is multiplied by sqrt(H / H'):
the sliced model then computes what the full model computes with those residual channels held at zero (their
embedding columns and o_proj/down_proj rows zeroed), exactly up to the norms' epsilon (eps stays as configured:
qwen3's per-head q/k norms share it). A channel that is zero everywhere can thus be sliced away for free.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from distil.compress.calibration import run_hooked, valid_rows
from distil.errors import DistilError
from distil.options import option

# Architectures whose decoder layers are self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj (+ q/k norms of one
# head_dim in qwen3, + q/k/v biases in qwen2): the slicer knows where every width lives in them.
SLICEABLE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class PruneSpec:
    """Structured pruning, then distillation recovers the student (also read by `distil prune`).

    Depth: Block Influence (ShortGPT); width: Minitron's activation importance on calibration data."""

    depth: int = option(0, "Decoder layers to keep (0 = all): the others, lowest Block Influence "
                        "(1 - mean cos(layer input, layer output) on calibration tokens), are removed.", ge=0)
    depth_score: Literal["block_influence", "uniform"] = option(
        "block_influence", "How the kept layers are chosen: block_influence (ShortGPT) or uniform (evenly spaced, "
        "first and last included: the control).")
    mlp: float = option(0.0, "Fraction of MLP intermediate neurons removed in every layer (0 = none), the lowest "
                        "activation norms on calibration tokens.", ge=0.0, lt=1.0)
    hidden: float = option(0.0, "Fraction of hidden (residual-stream, embedding) channels removed from every "
                           "tensor (0 = none), the lowest activation norms of the RMSNorm outputs on calibration "
                           "tokens (Minitron's embedding-channel pruning).", ge=0.0, lt=1.0)
    heads: int = option(0, "Query heads kept per layer (0 = all of the kept KV groups'); must be a multiple of the "
                        "KV groups kept.", ge=0)
    kv_heads: int = option(0, "KV groups (key/value heads) kept per layer (0 = all).", ge=0)
    multiple_of: int = option(1, "Round the kept MLP and hidden widths down to a multiple of this (e.g. 256: "
                              "k-quant super-blocks of the GGUF export); the hidden width is also a multiple of the "
                              "attention heads (transformers requires it).", gt=0)
    calib_examples: int = option(64, "Calibration examples (the first of the training data).", gt=0)
    calib_batch: int = option(8, "Calibration examples per forward.", gt=0)


@dataclass
class PruneReport:
    """What was removed, with the scores that chose it."""

    layers_before: int
    layers_kept: list[int]
    block_influence: list[float] = field(default_factory=list)
    mlp_before: int = 0
    mlp_kept: int = 0
    heads_before: int = 0
    heads_kept: int = 0
    kv_before: int = 0
    kv_kept: int = 0
    hidden_before: int = 0
    hidden_kept: int = 0
    params_before: int = 0
    params_after: int = 0

    def summary(self) -> str:
        bits = [f"layers {self.layers_before} -> {len(self.layers_kept)}"]
        if self.mlp_kept != self.mlp_before:
            bits.append(f"MLP width {self.mlp_before} -> {self.mlp_kept}")
        if (self.heads_kept, self.kv_kept) != (self.heads_before, self.kv_before):
            bits.append(f"heads {self.heads_before}/{self.kv_before} KV -> {self.heads_kept}/{self.kv_kept} KV")
        if self.hidden_kept != self.hidden_before:
            bits.append(f"hidden {self.hidden_before} -> {self.hidden_kept}")
        return (f"pruned: {', '.join(bits)}; parameters {self.params_before / 1e6:.2f}M -> "
                f"{self.params_after / 1e6:.2f}M")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# The model's parts


def check_sliceable(model: Any) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SLICEABLE:
        raise DistilError(f"prune: the slicer knows the architectures {', '.join(SLICEABLE)}; expected one of them, "
                          f"found {model_type!r}")


def decoder_layers(model: Any) -> Any:
    return model.model.layers


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def count_params(model: Any) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def rebuild(model: Any, config: Any, state: dict[str, torch.Tensor]) -> Any:
    """A fresh model of `config` holding `state` (every parameter accounted for), with the original's dtype,
    device, training mode and per-parameter requires_grad (a frozen embedding stays frozen)."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    new = AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(state, strict=False)
    tied = set(getattr(new, "_tied_weights_keys", None) or []) | {"lm_head.weight"}
    missing = [k for k in missing if not (k in tied and config.tie_word_embeddings)]
    if missing or unexpected:  # a bug in the slicer, not bad input
        raise RuntimeError(f"prune: rebuilt model does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    new.to(param.device)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    for n, p in new.named_parameters():
        p.requires_grad_(n not in frozen)
    return new.train(model.training)


# ----------------------------------------------------------------------------------------------
# Depth: Block Influence


def block_influence(model: Any, batches: list[dict]) -> list[float]:
    """BI_i = 1 - mean over real calibration tokens of cos(input of layer i, output of layer i), in float64."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    state: dict = {}
    hooks = []

    def hook(i: int):
        def fn(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            x, y = valid_rows(h_in, state["mask"]), valid_rows(h_out, state["mask"])
            sums[i] += torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-12).sum()
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    run_hooked(model, batches, state, hooks)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return [float(v) for v in 1.0 - sums / tokens]


def choose_layers(scores: list[float], depth: int, how: str = "block_influence") -> list[int]:
    """The `depth` layers to keep, in order: the highest Block Influence (ties: the earlier layer), or evenly
    spaced (first and last included)."""
    n = len(scores)
    if not 0 < depth <= n:
        raise DistilError(f"prune.depth: expected 1..{n} layers to keep (the model has {n}), found {depth}")
    if how == "uniform":
        if depth == 1:
            return [0]
        return sorted({round(i * (n - 1) / (depth - 1)) for i in range(depth)})
    ranked = sorted(range(n), key=lambda i: (-scores[i], i))
    return sorted(ranked[:depth])


def keep_layers(model: Any, keep: list[int]) -> Any:
    """A copy of the model with only the decoder layers `keep` (0-based, in order)."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    remap = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, value in model.state_dict().items():
        if ".layers." in key:
            head, tail = key.split(".layers.", 1)
            idx, rest = tail.split(".", 1)
            if int(idx) not in remap:
                continue
            key = f"{head}.layers.{remap[int(idx)]}.{rest}"
        state[key] = value.detach().clone()
    return rebuild(model, config, state)


# ----------------------------------------------------------------------------------------------
# Width: activation importance


@dataclass
class WidthScores:
    mlp: list[torch.Tensor]  # per layer [intermediate]: ||a_j||_2 over calibration tokens
    heads: list[torch.Tensor]  # per layer [num_attention_heads]: ||attention output of head h||_2


def width_scores(model: Any, batches: list[dict]) -> WidthScores:
    """Minitron's activation importance of every MLP neuron and attention head, from hooks on the inputs of
    down_proj and o_proj (float64 sums of squares over real tokens, then the square root)."""
    config = model.config
    hd, n_heads = _head_dim(config), config.num_attention_heads
    layers = decoder_layers(model)
    mlp = [torch.zeros(layer.mlp.down_proj.in_features, dtype=torch.float64) for layer in layers]
    heads = [torch.zeros(n_heads, dtype=torch.float64) for _ in layers]
    state: dict = {}
    hooks = []

    def on_down(i: int):
        def fn(module, args):
            mlp[i].add_(valid_rows(args[0], state["mask"]).pow(2).sum(0))
        return fn

    def on_o(i: int):
        def fn(module, args):
            x = valid_rows(args[0], state["mask"])  # [N, heads * head_dim], head h owns columns h*hd..(h+1)*hd
            heads[i].add_(x.view(x.shape[0], n_heads, hd).pow(2).sum((0, 2)))
        return fn

    for i, layer in enumerate(layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(on_down(i)))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(on_o(i)))
    run_hooked(model, batches, state, hooks)
    return WidthScores(mlp=[m.sqrt() for m in mlp], heads=[h.sqrt() for h in heads])


def _topk_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores (ties: the lower index), in increasing order."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def mlp_width(intermediate: int, ratio: float, multiple_of: int = 1, key: str = "prune.mlp") -> int:
    """Width kept when the fraction `ratio` of `intermediate` goes, rounded down to a multiple of `multiple_of`
    (never below one multiple, never above the width)."""
    if not 0.0 <= ratio < 1.0:
        raise DistilError(f"{key}: expected a fraction to remove in [0, 1) (0 = none), found {ratio}")
    if ratio == 0.0:  # nothing removed: no rounding either (576 is not a multiple of 256, and stays)
        return intermediate
    keep = int(math.floor(intermediate * (1.0 - ratio) + 1e-9))
    keep = max(multiple_of, keep // multiple_of * multiple_of)
    return min(keep, intermediate)


def hidden_width(hidden: int, ratio: float, multiple_of: int, heads: int) -> int:
    """Hidden width kept when the fraction `ratio` goes: rounded down to a multiple of both `multiple_of` and the
    query heads kept (transformers' llama/qwen configs refuse to save a hidden_size that is not a multiple of
    num_attention_heads, even with head_dim set); refused when no such width is left."""
    if not 0.0 <= ratio < 1.0:
        raise DistilError(f"prune.hidden: expected a fraction to remove in [0, 1) (0 = none), found {ratio}")
    if ratio == 0.0:
        return hidden
    step = math.lcm(multiple_of, heads)
    keep = int(math.floor(hidden * (1.0 - ratio) + 1e-9)) // step * step
    if keep <= 0:
        raise DistilError(f"prune.hidden: keeping {1.0 - ratio:.3f} of {hidden} channels as a multiple of {step} "
                          f"(prune.multiple_of {multiple_of} and the {heads} attention heads) leaves none; expected "
                          f"a smaller ratio or multiple_of, found {ratio}")
    return min(keep, hidden)


def head_counts(config: Any, heads: int, kv_heads: int) -> tuple[int, int]:
    """(query heads, KV groups) to keep, checked against the model's GQA grouping."""
    n, kv = config.num_attention_heads, config.num_key_value_heads
    group = n // kv
    new_kv = kv_heads or kv
    new_h = heads or new_kv * group
    if new_kv > kv:
        raise DistilError(f"prune.kv_heads: the model has {kv} KV groups, found {new_kv}")
    if new_h > n:
        raise DistilError(f"prune.heads: the model has {n} attention heads, found {new_h}")
    if new_h % new_kv:
        raise DistilError(f"prune.heads: expected a multiple of the {new_kv} KV groups kept (each group keeps the "
                          f"same number of query heads), found {new_h}")
    if new_h // new_kv > group:
        raise DistilError(f"prune.heads: {new_kv} KV groups hold at most {new_kv * group} query heads "
                          f"({group} each), found {new_h}")
    return new_h, new_kv


def choose_heads(scores: torch.Tensor, n_kv: int, new_h: int, new_kv: int) -> tuple[list[int], list[int]]:
    """(kept query heads, kept KV groups): the KV groups with the largest summed head scores, then the best
    new_h / new_kv query heads inside each kept group, group by group."""
    group = len(scores) // n_kv
    group_scores = scores.view(n_kv, group).sum(1)
    groups = _topk_sorted(group_scores, new_kv)
    per = new_h // new_kv
    kept = []
    for g in groups:
        kept += [g * group + j for j in _topk_sorted(scores[g * group:(g + 1) * group], per)]
    return kept, groups


def _rows(idx: list[int], size: int) -> torch.Tensor:
    """Row indices of blocks `idx` of `size` rows each (a head's head_dim rows)."""
    return torch.tensor([b * size + r for b in idx for r in range(size)], dtype=torch.long)


def width_plan(model: Any, scores: WidthScores, spec: Any) -> dict:
    """Per layer, which neurons, query heads and KV groups stay."""
    config = model.config
    new_i = mlp_width(config.intermediate_size, spec.mlp, spec.multiple_of)
    new_h, new_kv = head_counts(config, spec.heads, spec.kv_heads)
    plan = {"mlp": [], "heads": [], "kv": [], "sizes": (new_i, new_h, new_kv)}
    for i in range(len(decoder_layers(model))):
        plan["mlp"].append(_topk_sorted(scores.mlp[i], new_i))
        kept, groups = choose_heads(scores.heads[i], config.num_key_value_heads, new_h, new_kv)
        plan["heads"].append(kept)
        plan["kv"].append(groups)
    return plan


def slice_width(model: Any, plan: dict) -> Any:
    """A copy of the model with only the planned neurons, query heads and KV groups (weights sliced)."""
    config = copy.deepcopy(model.config)
    hd = _head_dim(config)
    new_i, new_h, new_kv = plan["sizes"]
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = new_i, new_h, new_kv
    config.head_dim = hd  # no longer hidden / heads once heads go
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for i in range(len(decoder_layers(model))):
        p = f"model.layers.{i}."
        neurons = torch.tensor(plan["mlp"][i], dtype=torch.long)
        q_rows, kv_rows = _rows(plan["heads"][i], hd), _rows(plan["kv"][i], hd)
        for name, rows in (("mlp.gate_proj", neurons), ("mlp.up_proj", neurons), ("self_attn.q_proj", q_rows),
                           ("self_attn.k_proj", kv_rows), ("self_attn.v_proj", kv_rows)):
            state[p + name + ".weight"] = state[p + name + ".weight"][rows].clone()
            if p + name + ".bias" in state:
                state[p + name + ".bias"] = state[p + name + ".bias"][rows].clone()
        for name, cols in (("mlp.down_proj", neurons), ("self_attn.o_proj", q_rows)):
            state[p + name + ".weight"] = state[p + name + ".weight"][:, cols].clone()
    return rebuild(model, config, state)


def mask_width(model: Any, plan: dict) -> Any:
    """The reference the sliced model must equal: a copy of the full model with the removed neurons' gate/up
    rows and the removed heads' o_proj columns zeroed (tests)."""
    masked = copy.deepcopy(model)
    hd = _head_dim(model.config)
    with torch.no_grad():
        for i, layer in enumerate(decoder_layers(masked)):
            drop = sorted(set(range(layer.mlp.gate_proj.out_features)) - set(plan["mlp"][i]))
            layer.mlp.gate_proj.weight[drop] = 0.0
            layer.mlp.up_proj.weight[drop] = 0.0
            n_heads = layer.self_attn.o_proj.in_features // hd
            gone = sorted(set(range(n_heads)) - set(plan["heads"][i]))
            layer.self_attn.o_proj.weight[:, _rows(gone, hd)] = 0.0
    return masked


# ----------------------------------------------------------------------------------------------
# Hidden channels: activation importance of the residual stream's channels


def _norms(model: Any) -> list[Any]:
    """Every RMSNorm whose output feeds linear maps or the head: input_layernorm and post_attention_layernorm of
    every layer, and the final norm."""
    out = []
    for layer in decoder_layers(model):
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out + [model.model.norm]


def hidden_scores(model: Any, batches: list[dict]) -> torch.Tensor:
    """[hidden] importance of every residual channel: the L2 norm over real calibration tokens and over every
    RMSNorm output (`_norms`) of that channel, accumulated in float64."""
    total = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    state: dict = {}

    def fn(module, args, output):
        total.add_(valid_rows(output, state["mask"]).pow(2).sum(0))

    hooks = [norm.register_forward_hook(fn) for norm in _norms(model)]
    run_hooked(model, batches, state, hooks)
    return total.sqrt()


def slice_hidden(model: Any, keep: list[int]) -> Any:
    """A copy of the model with only the residual channels `keep` (increasing), every tensor with the hidden axis
    sliced consistently, and the norm weights multiplied by sqrt(H / H') (module docstring)."""
    config = copy.deepcopy(model.config)
    old, new = config.hidden_size, len(keep)
    config.head_dim = _head_dim(config)  # no longer hidden / heads
    config.hidden_size = new
    idx = torch.tensor(keep, dtype=torch.long)
    gain = math.sqrt(old / new)
    state = {}
    for key, value in model.state_dict().items():
        v = value.detach()
        if key in ("model.embed_tokens.weight", "lm_head.weight") or key.endswith(
                ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            v = v[:, idx]  # [out, hidden]: the input columns
        elif key.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias", "down_proj.bias")):
            v = v[idx]  # [hidden, in] / [hidden]: the output rows
        elif key.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")) or key == "model.norm.weight":
            v = v[idx] * gain
        elif any(d == old for d in v.shape) and not key.endswith(
                ("q_norm.weight", "k_norm.weight", "inv_freq", "_proj.bias")):
            raise RuntimeError(f"prune: the hidden slicer does not know tensor {key} {list(v.shape)}")  # a bug
        state[key] = v.clone()
    return rebuild(model, config, state)


def mask_hidden(model: Any, keep: list[int]) -> Any:
    """The reference the hidden-sliced model must equal (up to the norms' eps): a copy of the full model whose
    removed residual channels are held at zero (their embedding columns and o_proj/down_proj rows zeroed; tests)."""
    masked = copy.deepcopy(model)
    gone = sorted(set(range(model.config.hidden_size)) - set(keep))
    with torch.no_grad():
        masked.model.embed_tokens.weight[:, gone] = 0.0
        for layer in decoder_layers(masked):
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight[gone] = 0.0
                if lin.bias is not None:
                    lin.bias[gone] = 0.0
    return masked


# ----------------------------------------------------------------------------------------------


def prune(model: Any, spec: Any, batches: list[dict]) -> tuple[Any, PruneReport]:
    """Depth first (Block Influence on the full model), then width: neurons, heads and hidden channels, all
    scored on the depth-pruned model before any of them is sliced."""
    check_sliceable(model)
    config = model.config
    n = config.num_hidden_layers
    report = PruneReport(layers_before=n, layers_kept=list(range(n)), mlp_before=config.intermediate_size,
                         heads_before=config.num_attention_heads, kv_before=config.num_key_value_heads,
                         hidden_before=config.hidden_size, params_before=count_params(model))
    # validate every count before the (expensive) scoring
    if spec.depth and spec.depth > n:
        raise DistilError(f"prune.depth: expected 1..{n} layers to keep (the model has {n}), found {spec.depth}")
    new_i = mlp_width(config.intermediate_size, spec.mlp, spec.multiple_of)
    new_h, new_kv = head_counts(config, spec.heads, spec.kv_heads)
    new_hidden = hidden_width(config.hidden_size, getattr(spec, "hidden", 0.0), spec.multiple_of, new_h)
    out = model
    if spec.depth and spec.depth < n:
        scores = block_influence(model, batches) if spec.depth_score == "block_influence" else [0.0] * n
        report.block_influence = scores if spec.depth_score == "block_influence" else []
        report.layers_kept = choose_layers(scores, spec.depth, spec.depth_score)
        out = keep_layers(model, report.layers_kept)
    # every width is scored on the same (depth-pruned) model, before any width is sliced (Minitron)
    channels = hidden_scores(out, batches) if new_hidden != config.hidden_size else None
    if (new_i, new_h, new_kv) != (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads):
        out = slice_width(out, width_plan(out, width_scores(out, batches), spec))
    if channels is not None:
        out = slice_hidden(out, _topk_sorted(channels, new_hidden))
    report.mlp_kept, report.heads_kept, report.kv_kept, report.hidden_kept = new_i, new_h, new_kv, new_hidden
    report.params_after = count_params(out)
    if out is model:
        out = copy.deepcopy(model)
    return out, report
