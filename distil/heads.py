"""Output heads of causal LMs: the causal shift, the final hidden states, and whether the fused loss may
recompute a model's logits as `hidden @ W.T (+ b)` from them.

The fused losses (distil/fused.py, distil/sparse.py) never materialise [tokens x vocab] logits: they project the
last hidden states through the head chunk by chunk. That is only right when nothing happens between the head's
matmul and the logits the model returns: Granite divides them by `logits_scaling`, Gemma-2 soft-caps them,
Cohere multiplies them by `logit_scale`. A list of config keys cannot know every architecture, so
`fused_head_problem` checks, once, on a real input, that the recomputation reproduces the model's own logits,
and the methods fall back to the plain logits path (with one note) when it does not.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch


def shift(logits: torch.Tensor, labels: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal alignment: the logits at position t predict the token at t + 1.

    Logits are also sliced to the tokenizer's vocabulary: embedding matrices padded beyond it
    (e.g. to a multiple of 64) add rows that no token uses.
    """
    return logits[:, :-1, :vocab], labels[:, 1:]


def final_hidden(model: Any, batch: dict) -> torch.Tensor:
    """The last layer's (normed) hidden states [B, T, H], through the model's own forward (so DDP's
    hooks still see it); `logits_to_keep=1` makes the model project only one position."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    return out.hidden_states[-1]


def head_weights(model: Any, vocab: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The head's weight [V, H] and bias [V] (or None), sliced to the tokenizer's vocabulary."""
    head = model.get_output_embeddings()
    return head.weight[:vocab], (head.bias[:vocab] if head.bias is not None else None)


def _tolerance(dtype: torch.dtype) -> float:
    # relative to the largest logit: fp32 matmuls in another order differ by ~1e-6 relative; bf16/fp16 heads
    # round their outputs to 8/11 bits. A scaling or soft-capping changes logits by far more than this.
    return 1e-3 if dtype == torch.float32 else 3e-2


def fused_head_problem(model: Any, batch: dict | None = None) -> str | None:
    """Why the fused loss may not recompute this model's logits from its hidden states; None when it may.

    With a batch, the check is by reproduction: one forward on the batch's first example (eval mode, no
    gradient, RNG state restored so that a run's dropout draws do not change) and a comparison of
    `hidden[-1] @ W.T (+ b)` with the logits the model itself returns for the last position.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        return "its output head is not a plain linear layer"
    cfg = getattr(model, "config", None)
    if getattr(cfg, "final_logit_softcapping", None):
        return "its logits are soft-capped (final_logit_softcapping)"
    if getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return f"its logits are scaled (logit_scale={cfg.logit_scale})"
    if batch is None:
        return None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            out = model(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                        output_hidden_states=True, logits_to_keep=1)
            theirs = out.logits[:, -1].float()
            h = out.hidden_states[-1][:, -1].float()
            mine = h @ head.weight.float().T
            if head.bias is not None:
                mine = mine + head.bias.float()
    finally:
        model.train(was_training)
    scale = float(theirs.abs().max().clamp_min(1e-6))
    diff = float((mine - theirs).abs().max())
    if not diff <= _tolerance(head.weight.dtype) * scale:
        return (f"hidden @ W.T does not reproduce its logits (max difference {diff:.3g} at max |logit| {scale:.3g}; "
                f"e.g. a logit scaling)")
    return None


def stderr_note(text: str) -> None:
    print(text, file=sys.stderr)


def choose_fused(enabled: bool, batch: dict, models: dict[str, Any], echo: Callable[[str], None] = stderr_note) -> bool:
    """Whether a fused loss may run for these models ({"teacher": m, "student": m}), decided once per loss
    function on its first batch: every model's head must reproduce its logits; the first that does not gives one
    note and the plain logits path."""
    if not enabled:
        return False
    for who, model in models.items():
        problem = fused_head_problem(model, batch)
        if problem:
            echo(f"note: distill.fused: the {who}'s {problem}; computing the loss from full logits")
            return False
    return True
