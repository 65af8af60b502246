"""Calibration data for the scorers of pruning and quantization: a few tokenized examples, collated into batches,
and the mask of the real (non-padding) tokens every statistic is taken over."""

from __future__ import annotations

from typing import Any, Iterator

import torch

from distil.data import collate
from distil.errors import DistilError


def calibration_batches(examples: list[dict], n_examples: int, batch_size: int, pad_id: int,
                        where: str = "calibration") -> list[dict]:
    """The first `n_examples` examples as batches of `batch_size`; refused when the data holds fewer (the scores
    would silently rest on less calibration than the recipe asked for) or no tokens at all."""
    if len(examples) < n_examples:
        raise DistilError(f"{where}: expected {n_examples} calibration examples (the first of the training data), "
                          f"found {len(examples)}; lower {where} or give more training data")
    chosen = examples[:n_examples]
    if not chosen or sum(len(e["input_ids"]) for e in chosen) < 2:
        raise DistilError(f"{where}: expected calibration examples (the training data), found "
                          f"{len(chosen)} example(s) with {sum(len(e['input_ids']) for e in chosen)} tokens")
    return [collate(chosen[i:i + batch_size], pad_id) for i in range(0, len(chosen), batch_size)]


def run_batches(model: Any, batches: list[dict], state: dict) -> Iterator[None]:
    """Run the model over the batches in eval mode without gradients; before each forward `state["mask"]` is the
    batch's [B, T] bool mask of real tokens, so forward hooks can pick them. Yields after each batch."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                state["mask"] = mask.bool()
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                yield None
    finally:
        state.pop("mask", None)
        model.train(was_training)


def run_hooked(model: Any, batches: list[dict], state: dict, hooks: list) -> None:
    """Run every calibration batch (`run_batches`) with the forward hooks that collect the statistics installed,
    then remove them, whatever happens."""
    try:
        for _ in run_batches(model, batches, state):
            pass
    finally:
        for h in hooks:
            h.remove()


def valid_rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [N, ...]: the rows at real tokens, as float64 (statistics are accumulated in float64)."""
    return x[mask].double()
