"""Preference distillation: pairs built without humans, trained with DPO or with DistiLLM-2's contrastive loss.

Pairs (`preference.pairs`), for every training prompt:
  teacher_vs_student (DistiLLM-2 style)
    chosen   = the teacher's answer            (greedy by default: its most likely answer)
    rejected = the student's own answer        (sampled from the student as it is before this stage)
  best_of_n (the teacher as judge)
    the student samples n answers; the teacher scores each by its log-likelihood of the answer given the prompt
    (`judge: mean` per answer token, so length is not what decides; `sum`: the whole sequence's), and
    chosen   = the student answer the teacher likes best,  rejected = the one it likes least.

Losses (`preference.loss`):
  dpo (Rafailov et al. 2023), against a frozen reference, the student before this stage:

    log pi(y | x)  = sum over the answer's tokens of log p(y_t | x, y_<t)        (the answer's end token included)
    margin         = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
    loss           = sum over pairs of -log sigmoid(margin) / number of pairs in the global batch

so at the first step (pi == ref) every pair's loss is log 2.
  distillm2 (Ko et al. 2025, DistiLLM-2's contrastive loss), with the teacher's token distributions p_T:
    on the chosen answer's tokens    skew KL          KL(p_T || a p_T + (1-a) p_S)   pulls p_S up where p_T is
    on the rejected answer's tokens  skew reverse KL  KL(p_S || (1-a) p_T + a p_S)   pushes p_S down where p_S > p_T
    loss = (sum of both over the target tokens of both answers) / target tokens of the global batch; a = skew_alpha.
  The teacher then stays in memory while training (its logits on both answers every step).

Pairs whose chosen and rejected answers are the same
tokens carry no preference: they are dropped and counted. The answers are generated once, before training, by
`distil.generate.generate` (resumable JSONL files with an identity sidecar, beside the run directory like SeqKD's
corpus): `teacher.jsonl` (teacher_vs_student), `student.jsonl`, and the pairs with their provenance (who wrote
each answer, sampling parameters, the judge's scores) in `pairs.jsonl`.

How a pair reaches the loss: the examples the loop batches are the chosen sequences, each tagged with its pair
`index`; the phase's `before_step` puts each micro-batch's rejected sequences beside them ([chosen; rejected],
2B rows), and the phase's count hook counts pairs (dpo) or target tokens of both answers (distillm2).
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
from distil.methods.contract import Context, Method, Phase, Stage, Trainable, count_targets
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
    pairs: Literal["teacher_vs_student", "best_of_n"] = option(
        "teacher_vs_student", "How pairs are made: the teacher's answer over the student's own "
        "(teacher_vs_student), or the best over the worst of n student samples under the teacher's log-likelihood "
        "(best_of_n: the teacher as judge).")
    n: int = option(4, "best_of_n: student samples per prompt (needs student_temperature > 0).", ge=2)
    judge: Literal["mean", "sum"] = option("mean", "best_of_n: the teacher's score of an answer: its mean "
                                           "log-probability per answer token, or the sum over the answer.")
    loss: Literal["dpo", "distillm2"] = option("dpo", "dpo (against the student before this stage), or distillm2: "
                                               "skew KL on chosen + skew reverse KL on rejected answers, to the "
                                               "teacher's token distributions (keeps the teacher in memory).")
    skew_alpha: float = option(0.1, "distillm2: the skew a of both skew divergences (DistiLLM-2 uses 0.1).",
                               ge=0.0, le=1.0)
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


def build_distillm2(teacher: Any, skew_alpha: float, vocab: int) -> Any:
    """loss_fn(module, batch, num_items) on [chosen; rejected] batches: DistiLLM-2's contrastive loss (module
    docstring), summed over the target tokens of both halves, divided by `num_items` (those tokens, global)."""
    from distil.losses import token_divergence

    def loss_fn(module: Any, batch: dict, num_items: float) -> LossOutput:
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"][:, 1:]
        s_logits = module(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1, :vocab]
        p = len(ids) // 2
        valid = (labels != IGNORE).float()
        skl = token_divergence(s_logits[:p], t_logits[:p], "skew_forward_kl", skew_alpha=skew_alpha)
        srkl = token_divergence(s_logits[p:], t_logits[p:], "skew_reverse_kl", skew_alpha=skew_alpha)
        n_tokens = int(valid.sum())
        denom = denominator(num_items, n_tokens)
        skl_sum, srkl_sum = (skl * valid[:p]).sum(), (srkl * valid[p:]).sum()
        loss = (skl_sum + srkl_sum) / denom
        return LossOutput(loss=loss, metrics={"skl": skl_sum.detach() / denom, "srkl": srkl_sum.detach() / denom},
                          n_tokens=n_tokens)

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
                     "chosen_params": c["params"], "rejected_params": r["params"],
                     **({"chosen_judge": c["judge"], "rejected_judge": r["judge"]} if "judge" in c else {})})
    return good, bad, rows, dropped


def judge_scores(teacher: Any, prompts: list[list[int]], records: list[dict], tok: Any, end: list[int],
                 seq_len: int, how: str, batch_size: int, pad_id: int, vocab: int) -> list[float]:
    """The teacher's score of each answer (best_of_n): log p_T(answer | prompt) summed over the answer's tokens (its
    end token included when it finished), per token for `how="mean"`; one value per record, in order."""
    rows = []
    for r in records:
        ids, ans = prompts[r["prompt_index"]], _answer(tok, r, end)
        rows.append({"input_ids": (ids + ans)[:seq_len], "labels": ([IGNORE] * len(ids) + ans)[:seq_len]})
    device = next(teacher.parameters()).device
    scores: list[float] = []
    for i in range(0, len(rows), batch_size):
        b = {k: v.to(device) for k, v in collate(rows[i: i + batch_size], pad_id).items()}
        with torch.no_grad():
            logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1, :vocab]
        labels = b["labels"][:, 1:]
        total = sequence_logprobs(logits, labels).double()
        count = (labels != IGNORE).sum(-1).clamp(min=1)
        scores += (total / count if how == "mean" else total).tolist()
    return scores


def best_and_worst(records: list[dict], scores: list[float]) -> tuple[list[dict], list[dict]]:
    """Per prompt: the sample the judge scores highest (chosen) and lowest (rejected), each tagged with its score;
    ties go to the earlier sample for the best and the later one for the worst."""
    groups: dict[int, list[tuple[float, int, dict]]] = {}
    for r, sc in zip(records, scores):
        groups.setdefault(r["prompt_index"], []).append((sc, r["sample_index"], {**r, "judge": sc}))
    chosen = [max(g, key=lambda t: (t[0], -t[1]))[2] for g in groups.values()]
    rejected = [min(g, key=lambda t: (t[0], -t[1]))[2] for g in groups.values()]
    return chosen, rejected


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
    best_of_n = spec.pairs == "best_of_n"
    if ctx.main:
        params = dict(max_new_tokens=spec.max_new_tokens, seed=spec.seed)
        if not best_of_n:
            if spec.backend == "llamacpp":
                from distil.generation.sources import load_for_backend

                t = recipe.teacher
                teacher, t_tok = load_for_backend({"source": t.source, "tokenizer": t.tokenizer}, "llamacpp")
            else:
                teacher, t_tok = ctx.teacher().model, ctx.teacher().tokenizer
            generate(teacher, t_tok, keep, GenParams(temperature=spec.teacher_temperature, **params),
                     out=out / "teacher.jsonl", batch_size=spec.batch_size, model_name=recipe.teacher.source,
                     remedy=remedy)
        s_res = generate(ctx.student.model, tok, keep,
                         GenParams(temperature=spec.student_temperature, n=spec.n if best_of_n else 1, **params),
                         out=out / "student.jsonl", batch_size=spec.batch_size, model_name="student (before)",
                         remedy=remedy)
        ctx.student.model.train()
        if best_of_n:  # the judge's scores, saved so that every rank pairs the same answers
            scores = judge_scores(ctx.teacher().model, keep, s_res.records, tok, end, recipe.data.seq_len, spec.judge,
                                  spec.batch_size, ctx.pad_id, ctx.vocab)
            write_atomic(out / "judge.jsonl", "".join(
                json.dumps({"prompt_index": r["prompt_index"], "sample_index": r["sample_index"], "score": sc}) + "\n"
                for r, sc in zip(s_res.records, scores)))
    ctx.wait()
    read = lambda name: [json.loads(x) for x in (out / name).read_text().splitlines() if x.strip()]  # noqa: E731
    if best_of_n:
        students = read("student.jsonl")
        judged = {(j["prompt_index"], j["sample_index"]): j["score"] for j in read("judge.jsonl")}
        chosen, rejected = best_and_worst(students, [judged[(r["prompt_index"], r["sample_index"])]
                                                     for r in students])
        what = f"chosen/rejected: the best/worst of {spec.n} student answers under the teacher's {spec.judge} " \
               f"log-likelihood"
    else:
        chosen, rejected = read("teacher.jsonl"), read("student.jsonl")
        what = "chosen: the teacher's answer, rejected: the student's own"
    good, bad, rows, dropped = build_pairs(keep, chosen, rejected, tok, recipe.data.seq_len, end)
    if ctx.main:
        write_atomic(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
        ctx.echo(f"preference: {len(rows)} pairs in {out / 'pairs.jsonl'} ({what}); {dropped} dropped "
                 f"(chosen == rejected, or cut away by data.seq_len)")
    if not good:
        raise DistilError(f"{out}: no preference pair left: every student answer equals the teacher's or is cut away "
                          f"by data.seq_len={recipe.data.seq_len}; try preference.student_temperature > 0")
    return {"chosen": good, "rejected": bad}


def stage(ctx: Context) -> Stage:
    spec = ctx.recipe.preference
    # the student before this stage (dpo's reference)
    reference = freeze(copy.deepcopy(ctx.student.model).eval()) if spec.loss == "dpo" else None
    rejected = ctx.artifact["rejected"]
    chosen = {e["index"]: e for e in ctx.artifact["chosen"]}

    def before_step(module: Any, batches: list[dict], step: int) -> list[dict]:
        out = []
        for b in batches:
            idx = b["index"].tolist()
            pair = collate([chosen[i] for i in idx] + [rejected[i] for i in idx], ctx.pad_id)
            out.append({k: v.to(b["input_ids"].device) for k, v in pair.items() if k != "index"})
        return out

    if spec.loss == "distillm2":
        loss_fn, count = build_distillm2(ctx.teacher().model, spec.skew_alpha, ctx.vocab), count_targets
    else:
        loss_fn, count = build_dpo(reference, spec.beta, ctx.vocab), count_pairs
    return Stage(phases=[Phase(name="preference", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=ctx.artifact["chosen"], count=count, before_step=before_step)])


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `preference`, at validation."""
    spec = recipe.preference
    if spec.pairs == "best_of_n" and spec.student_temperature == 0:
        raise DistilError(f"{where}: preference.student_temperature: best_of_n needs {spec.n} different student "
                          f"answers per prompt; expected a temperature > 0, found 0")
    if spec.pairs == "best_of_n" and spec.backend == "llamacpp":
        raise DistilError(f"{where}: preference.backend: best_of_n generates with the student only (the teacher "
                          f"judges in transformers); expected hf, found llamacpp")


METHOD = Method(
    name="preference",
    summary="preference distillation: pairs without humans (the teacher's answer over the student's own, or the "
            "teacher judging n student samples), trained with DPO or DistiLLM-2's contrastive loss",
    teacher=lambda recipe: "train" if recipe.preference.loss == "distillm2" else "prepare",
    prepare=prepare,
    build=stage,
    options=PreferenceSpec,
    check=check,
    loss_key="preference.loss",
)
