"""Unstructured pruning: individual weights of the decoder layers' linear maps are set to zero (and kept there).

Scores (higher = kept):
  magnitude   |W_ij|, compared across the whole matrix (the classic layer-wise baseline)
  wanda       |W_ij| * ||X_j||_2 (Sun et al. 2023), X_j the j-th input feature of the layer over the calibration
              tokens; compared within each output row i, as the paper does. One dense calibration pass gives every
              layer's input norms (the paper feeds block k the outputs of the already-pruned blocks < k).
Patterns:
  unstructured  the lowest `sparsity` fraction of the scores go (per matrix for magnitude, per row for wanda)
  N:M           in every group of M consecutive weights of a row (along the input dimension) the N highest scores
                stay: 2:4 is the pattern sparse tensor cores run; the sparsity is 1 - N/M whatever `sparsity` says

Embeddings and the output head stay dense (as in Wanda and SparseGPT). The masks are kept (`Masks`) and applied
again after every optimizer step of the training that follows (`Phase.after_step`), so the pruned weights are zero
at every step's end and in every checkpoint, whatever AdamW's moments would do to them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch

from distil.compress.calibration import run_hooked, valid_rows
from distil.errors import DistilError
from distil.options import option

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


@dataclass
class SparseSpec:
    """Unstructured pruning (magnitude or Wanda; unstructured or N:M), masks enforced while the student trains."""

    score: Literal["wanda", "magnitude"] = option("wanda", "wanda: |W| * input-feature norm on calibration tokens, "
                                                  "per output row (Sun et al. 2023); magnitude: |W| per matrix.")
    sparsity: float = option(0.5, "Fraction of the weights of every decoder linear map set to zero (unstructured "
                             "pattern).", gt=0.0, lt=1.0)
    pattern: str = option("unstructured", "'unstructured', or 'N:M' (e.g. '2:4': N of every M consecutive weights "
                          "of a row stay; the sparsity is then 1 - N/M).")
    calib_examples: int = option(64, "Calibration examples for wanda (the first of the training data).", gt=0)
    calib_batch: int = option(8, "Calibration examples per forward.", gt=0)


def parse_pattern(pattern: str, where: str = "sparse.pattern") -> tuple[int, int] | None:
    """None for 'unstructured', else (N, M) with 0 < N < M."""
    if pattern == "unstructured":
        return None
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m or not 0 < int(m.group(1)) < int(m.group(2)):
        raise DistilError(f"{where}: expected 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'), found {pattern!r}")
    return int(m.group(1)), int(m.group(2))


def prunable(model: Any) -> dict[str, torch.nn.Linear]:
    """The decoder layers' linear maps by their qualified name."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LINEARS) and ".layers." in name:
            out[name] = module
    if not out:
        raise DistilError(f"sparse: found no decoder linear maps ({', '.join(LINEARS)}) in the model "
                          f"{getattr(model.config, 'model_type', '?')!r}")
    return out


def input_norms(model: Any, batches: list[dict]) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature j of every prunable linear map, over the real calibration tokens."""
    layers = prunable(model)
    sums = {name: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in layers.items()}
    state: dict = {}

    def hook(name: str):
        def fn(module, args):
            sums[name].add_(valid_rows(args[0], state["mask"]).pow(2).sum(0))
        return fn

    hooks = [lin.register_forward_pre_hook(hook(name)) for name, lin in layers.items()]
    run_hooked(model, batches, state, hooks)
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2 (float64)."""
    return weight.detach().double().abs() * norms.double()[None, :]


def keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool, nm: tuple[int, int] | None = None,
              where: str = "sparse") -> torch.Tensor:
    """Bool mask of the weights that stay. Ties are broken by position (stable sort), so masks are reproducible."""
    rows, cols = scores.shape
    if nm is not None:
        n, m = nm
        if cols % m:
            raise DistilError(f"{where}: pattern {n}:{m} needs rows whose length is a multiple of {m}; found a "
                              f"[{rows} x {cols}] matrix")
        groups = scores.reshape(rows, cols // m, m)
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        mask.scatter_(-1, order[..., :n], True)
        return mask.reshape(rows, cols)
    if per_row:
        drop = int(cols * sparsity)
        order = torch.argsort(scores, dim=1, stable=True)  # ascending: the lowest `drop` of each row go
        mask = torch.ones_like(scores, dtype=torch.bool)
        mask.scatter_(1, order[:, :drop], False)
        return mask
    drop = int(scores.numel() * sparsity)
    order = torch.argsort(scores.reshape(-1), stable=True)
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    mask[order[:drop]] = False
    return mask.reshape(rows, cols)


class Masks:
    """The kept-weight masks of a model's linear maps: apply them once, and again after every optimizer step."""

    def __init__(self, model: Any, masks: dict[str, torch.Tensor]):
        layers = prunable(model)
        self.masks = masks
        self.pairs = [(layers[name].weight, mask.to(layers[name].weight.device)) for name, mask in masks.items()]

    @torch.no_grad()
    def apply(self) -> None:
        for weight, mask in self.pairs:
            weight.mul_(mask)

    def after_step(self, module: Any, step: int) -> None:  # Phase.after_step
        self.apply()


def compute_masks(model: Any, spec: Any, batches: list[dict] | None) -> dict[str, torch.Tensor]:
    nm = parse_pattern(spec.pattern)
    layers = prunable(model)
    norms = input_norms(model, batches) if spec.score == "wanda" else None
    masks = {}
    for name, lin in layers.items():
        scores = wanda_scores(lin.weight, norms[name]) if norms is not None else lin.weight.detach().double().abs()
        masks[name] = keep_mask(scores, spec.sparsity, per_row=spec.score == "wanda", nm=nm, where=f"sparse: {name}")
    return masks


def sparsity_report(model: Any) -> dict[str, float]:
    """Fraction of exact zeros of every prunable linear map's weight, and their total ('all')."""
    out, zeros, total = {}, 0, 0
    for name, lin in prunable(model).items():
        z = int((lin.weight == 0).sum())
        out[name] = z / lin.weight.numel()
        zeros, total = zeros + z, total + lin.weight.numel()
    out["all"] = zeros / max(total, 1)
    return out


def format_report(report: dict[str, float], layers: int) -> str:
    """The total and the range of the per-layer means (every map's own number is in sparsity.json)."""
    per_layer = []
    for i in range(layers):
        vals = [v for k, v in report.items() if f".layers.{i}." in k]
        if vals:
            per_layer.append(sum(vals) / len(vals))
    spread = f" (per layer {100 * min(per_layer):.1f}% .. {100 * max(per_layer):.1f}%)" if per_layer else ""
    return f"sparsity of the decoder linear maps: {100 * report['all']:.2f}%{spread}"
