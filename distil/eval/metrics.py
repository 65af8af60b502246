"""Held-out metrics for a teacher and any number of students, in one pass over the eval data.

For every target token t of the eval set (the same tokens the training loss uses):
  - perplexity      exp(mean_t  -log p_S(y_t))                      (lower is better)
  - KL(T || S)      mean_t  sum_v p_T(v) log(p_T(v) / p_S(v))       (nats/token, lower is better)
  - top-1 agreement mean_t  [argmax p_S == argmax p_T]              (higher is better)
The teacher's logits are computed once per batch and shared by every student row.
"""

from __future__ import annotations

from typing import Any

import torch

from distil.data import collate
from distil.losses import token_divergence


@torch.no_grad()
def evaluate(teacher: Any, models: dict[str, Any], examples: list[dict], *, batch_size: int, pad_id: int,
             vocab: int, chunk_size: int = 1024, device: str | torch.device = "cpu") -> dict[str, dict]:
    """Returns {row name: {ppl, kl, agreement, ce, tokens}}; the teacher is the row "teacher"."""
    rows = {"teacher": teacher, **models} if teacher is not None else dict(models)
    sums = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0} for name in rows}
    count = 0
    states = {name: m.training for name, m in rows.items()}
    for m in rows.values():
        m.eval()
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i: i + batch_size], pad_id).items()}
        labels = batch["labels"][:, 1:]
        valid = labels != -100
        n = int(valid.sum())
        if n == 0:
            continue
        count += n
        t_sel = None
        if teacher is not None:
            t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t_sel = t_logits[:, :-1, :vocab][valid].float()  # [n, V]: only the target positions
            del t_logits
        for name, model in rows.items():
            if name == "teacher":
                s_sel = t_sel
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                s_sel = logits[:, :-1, :vocab][valid].float()
                del logits
            y = labels[valid]
            for j in range(0, n, chunk_size):  # chunks keep [tokens x vocab] temporaries small
                s = s_sel[j: j + chunk_size]
                logp = torch.log_softmax(s, dim=-1)
                sums[name]["nll"] += float(-logp.gather(1, y[j: j + chunk_size, None]).sum())
                if t_sel is not None:
                    t = t_sel[j: j + chunk_size]
                    sums[name]["kl"] += float(token_divergence(s, t, "forward_kl").sum())
                    sums[name]["agree"] += float((s.argmax(-1) == t.argmax(-1)).sum())
    for name, m in rows.items():
        m.train(states[name])
    out = {}
    for name, s in sums.items():
        ce = s["nll"] / max(count, 1)
        row = {"ppl": float(torch.exp(torch.tensor(ce))), "ce": ce, "tokens": count}
        if teacher is not None:
            row["kl"] = s["kl"] / max(count, 1)
            row["agreement"] = s["agree"] / max(count, 1)
        out[name] = row
    return out


def format_table(results: dict[str, dict], params: dict[str, int] | None = None) -> str:
    """A plain-text table, one row per model."""
    params = params or {}
    head = f"{'model':<26} {'params':>9} {'ppl':>9} {'KL(T||S)':>9} {'top-1 agree':>11}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        p = f"{params[name] / 1e6:.1f}M" if name in params else ""
        kl = f"{r['kl']:.4f}" if "kl" in r else "-"
        ag = f"{100 * r['agreement']:.1f}%" if "agreement" in r else "-"
        lines.append(f"{name:<26} {p:>9} {r['ppl']:>9.2f} {kl:>9} {ag:>11}")
    return "\n".join(lines)
