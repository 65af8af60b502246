"""Preference (DPO) distillation: pairs built without humans, the teacher's answer preferred to the student's own.

For every training prompt (DistiLLM-2 style):
    chosen   = the teacher's answer            (greedy by default: its most likely answer)
    rejected = the student's own answer        (sampled from the student as it is before this stage)
and the student is trained with the DPO loss (Rafailov et al. 2023) against a frozen reference, the student before
this stage:

    log pi(y | x)  = sum over the answer's tokens of log p(y_t | x, y_<t)        (the answer's end token included)
    margin         = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss           = sum over pairs of -log sigmoid(margin) / number of pairs in the global batch

so at the first step (pi == ref) every pair's loss is log 2. Pairs whose chosen and rejected answers are the same
tokens carry no preference: they are dropped and counted. The answers are generated once, before training, by
`distil.generate.generate` (resumable JSONL files with an identity sidecar, beside the run directory like SeqKD's
corpus): `teacher.jsonl`, `student.jsonl`, and the pairs with their provenance in `pairs.jsonl`.

How a pair reaches the loss: the examples the loop batches are the chosen sequences, each tagged with its pair
`index`; the phase's `before_step` puts each micro-batch's rejected sequences beside them ([chosen; rejected],
2B rows), and the phase's count hook counts pairs, not tokens.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from distil.atomic import write_atomic
from distil.compat import check_teacher_data
from distil.data import IGNORE, collate
from distil.errors import DistilError
from distil.eval.answers import prompt_part
from distil.losses import LossOutput, denominator
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.models import freeze
from distil.options import option


@dataclass
class PreferenceSpec:
    """Preference (DPO) distillation: the teacher's answer is chosen, the student's own answer rejected."""

    beta: float = option(0.1, "DPO beta: how far the student may move from the reference (the student before "
                         "this stage); larger = a sharper preference, less freedom.", gt=0.0)
    max_new_tokens: int = option(64, "Longest answer (teacher's and student's), in tokens.", gt=0)
    teacher_temperature: float = option(0.0, "Sampling temperature of the teacher's (chosen) answers; 0 = greedy.",
                                        ge=0.0)
    student_temperature: float = option(1.0, "Sampling temperature of the student's (rejected) answers; 0 = greedy.",
                                        ge=0.0)
    seed: int = option(0, "Seed of both models' sampling (per answer: see distil/generation/params.py).", ge=0,
                       lt=2**32)
    batch_size: int = option(8, "Prompts per generation batch (transformers backend).", gt=0)
    backend: Literal["hf", "llamacpp"] = option("hf", "Who runs the teacher's generation: transformers, or "
                                                "llama.cpp (the teacher's GGUF). The student always runs in "
                                                "transformers (it is the model being trained).")
    dir: str = option("", "Where the answers and pairs go; empty = <output.dir>/<name>-preference.")


# ----------------------------------------------------------------------------------------------------------------
# The loss


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_t log softmax(logits)[t, labels[t]] per row over labels != -100: aligned logits [B, S, V] -> [B]."""
    valid = labels != IGNORE
    lp = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    tok = lp.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (tok * valid).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, num_items: float | None = None) -> LossOutput:
    """The DPO loss of pairs from their sequence log-probs [P] (module docstring), summed / num_items (pairs of the
    global batch). Metrics: margin (mean beta * log-ratio difference), accuracy (fraction with margin > 0)."""
    denom = denominator(num_items, len(policy_chosen))
    margin = beta * ((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected))
    loss = -F.logsigmoid(margin).sum() / denom
    m = margin.detach()
    return LossOutput(loss=loss, metrics={"margin": m.sum() / denom, "accuracy": (m > 0).float().sum() / denom},
                      n_tokens=len(policy_chosen))


def build_dpo(reference: Any, beta: float, vocab: int) -> Any:
    """loss_fn(module, batch, num_items) on [chosen; rejected] batches (2P rows)."""

    def loss_fn(module: Any, batch: dict, num_items: float) -> LossOutput:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        logp = sequence_logprobs(module(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab], labels)
        with torch.no_grad():
            ref = sequence_logprobs(reference(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab], labels)
        p = len(ids) // 2
        return dpo_loss(logp[:p], logp[p:], ref[:p], ref[p:], beta=beta, num_items=num_items)

    return loss_fn


def count_pairs(batch: dict) -> int:
    return len(batch["input_ids"]) // 2


# ----------------------------------------------------------------------------------------------------------------
# The pairs


def _answer(tok: Any, record: dict, end: list[int]) -> list[int]:
    ids = list(tok(record["completion"], add_special_tokens=False)["input_ids"])
    return ids + list(end) if record["finish_reason"] == "stop" else ids  # a finished answer ends as the format does


def build_pairs(prompts: list[list[int]], chosen: list[dict], rejected: list[dict], tok: Any, seq_len: int,
                end: list[int]) -> tuple[list[dict], list[dict], list[dict], int]:
    """(chosen examples tagged with their pair index, rejected examples, provenance rows, pairs dropped because both
    answers are the same tokens). Answers cut away entirely by seq_len drop their pair too (counted)."""
    by_prompt = {r["prompt_index"]: r for r in rejected}
    good, bad, rows, dropped = [], [], [], 0
    for c in chosen:
        p = c["prompt_index"]
        r = by_prompt.get(p)
        if r is None:
            continue
        ids = prompts[p]
        w, l = _answer(tok, c, end), _answer(tok, r, end)
        ex_w = {"input_ids": (ids + w)[:seq_len], "labels": ([IGNORE] * len(ids) + w)[:seq_len]}
        ex_l = {"input_ids": (ids + l)[:seq_len], "labels": ([IGNORE] * len(ids) + l)[:seq_len]}
        if ex_w["input_ids"] == ex_l["input_ids"] or not all(any(v != IGNORE for v in e["labels"][1:])
                                                             for e in (ex_w, ex_l)):
            dropped += 1
            continue
        good.append({**ex_w, "index": len(bad)})
        bad.append(ex_l)
        rows.append({"prompt_index": p, "prompt": tok.decode(ids), "chosen": c["completion"],
                     "rejected": r["completion"], "chosen_finish": c["finish_reason"],
                     "rejected_finish": r["finish_reason"], "chosen_by": c["model"], "rejected_by": r["model"],
                     "chosen_params": c["params"], "rejected_params": r["params"]})
    return good, bad, rows, dropped


def pairs_dir(recipe: Any) -> Path:
    spec = recipe.preference
    return Path(spec.dir) if spec.dir else Path(recipe.output.dir) / f"{recipe.name}-preference"


def prepare(ctx: Context) -> dict:
    """The teacher and the student answer every training prompt (resumably); the pairs are built and saved."""
    from distil.generate import generate
    from distil.generation.params import GenParams

    spec, recipe = ctx.recipe.preference, ctx.recipe
    tok = ctx.student.tokenizer
    prompts = [prompt_part(e, tok.bos_token_id) for e in ctx.train_examples]
    keep = [p for p in prompts if p]
    if not keep:
        raise DistilError(f"data.source: method 'preference' needs prompts (prompt/response or messages records: "
                          f"both models answer the prompts), found {recipe.data.source} with none")
    end = check_teacher_data(ctx.teacher().tokenizer, tok, student_model=ctx.student.model,
                             chat=recipe.data.chat_template, where="preference")
    out = pairs_dir(recipe)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistilError(f"{out}: preference.dir: cannot create the directory ({exc.strerror or exc})") from None
    remedy = f"delete {out} to make them again, or set preference.dir to keep both"
    if ctx.main:
        if spec.backend == "llamacpp":
            from distil.generation.sources import load_for_backend

            t = recipe.teacher
            teacher, t_tok = load_for_backend({"source": t.source, "tokenizer": t.tokenizer}, "llamacpp")
        else:
            teacher, t_tok = ctx.teacher().model, ctx.teacher().tokenizer
        params = dict(max_new_tokens=spec.max_new_tokens, seed=spec.seed)
        t_res = generate(teacher, t_tok, keep, GenParams(temperature=spec.teacher_temperature, **params),
                         out=out / "teacher.jsonl", batch_size=spec.batch_size, model_name=recipe.teacher.source,
                         remedy=remedy)
        s_res = generate(ctx.student.model, tok, keep, GenParams(temperature=spec.student_temperature, **params),
                         out=out / "student.jsonl", batch_size=spec.batch_size, model_name="student (before)",
                         remedy=remedy)
        ctx.student.model.train()
        good, bad, rows, dropped = build_pairs(keep, t_res.records, s_res.records, tok, recipe.data.seq_len, end)
        write_atomic(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        ctx.echo(f"preference: {len(rows)} pairs in {out / 'pairs.jsonl'} (chosen: the teacher's answer, rejected: "
                 f"the student's own); {dropped} dropped (chosen == rejected, or cut away by data.seq_len)")
    ctx.wait()
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines() if x.strip()]  # noqa: E731
    good, bad, _, _ = build_pairs(keep, read("teacher.jsonl"), read("student.jsonl"), tok, recipe.data.seq_len, end)
    if not good:
        raise DistilError(f"{out}: no preference pair left: every student answer equals the teacher's or is cut away "
                          f"by data.seq_len={recipe.data.seq_len}; try preference.student_temperature > 0")
    return {"chosen": good, "rejected": bad}


def stage(ctx: Context) -> Stage:
    spec = ctx.recipe.preference
    reference = freeze(copy.deepcopy(ctx.student.model).eval())  # the student before this stage
    rejected = ctx.artifact["rejected"]
    chosen = {e["index"]: e for e in ctx.artifact["chosen"]}

    def before_step(module: Any, batches: list[dict], step: int) -> list[dict]:
        out = []
        for b in batches:
            idx = b["index"].tolist()
            pair = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], ctx.pad_id)
            out.append({k: v.to(b["input_ids"].device) for k, v in pair.items() if k != "index"})
        return out

    return Stage(phases=[Phase(name="preference", module=Trainable(ctx.student.model),
                               loss_fn=build_dpo(reference, spec.beta, ctx.vocab), examples=ctx.artifact["chosen"],
                               count=count_pairs, before_step=before_step)])


METHOD = Method(
    name="preference",
    summary="preference (DPO) distillation: the teacher's answer is chosen, the student's own answer rejected, "
            "the DPO loss against the student before this stage",
    teacher="prepare",
    prepare=prepare,
    build=stage,
    options=PreferenceSpec,
)
