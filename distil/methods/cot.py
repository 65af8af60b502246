"""Chain-of-thought (CoT) distillation: the teacher writes rationale + answer, the student learns both.

For every training question the teacher writes `cot.n` samples (temperature > 0). **Rejection sampling**: a sample
is kept only if its final answer verifies against the question's gold answer (`distil.eval.tasks.verify`: the
answer is extracted from the sample and compared with the one extracted from the data's reference response, so any
prompt/response data whose references end in a checkable answer works, e.g. `builtin:sum3` or GSM8K's
'#### 72'); a sample cut at `cot.max_new_tokens` is never kept (it would teach the student not to stop), and an
answer that cannot be extracted is wrong. Then, optionally, only the `cot.shortest` shortest correct traces of a
question are kept (verbose traces hurt small students) and identical traces are kept once (`cot.unique`). This is
how DeepSeek-R1's distilled models were made (SFT on rejection-sampled teacher traces).

The student learns the kept traces (prompt masked, trace + its end token as targets) with cross-entropy;
`cot.token_kd` also matches the teacher's token distributions on them (the distill section's loss and alpha).

**Distilling step-by-step** (Hsieh et al. 2023, `cot.step_by_step`): each kept trace becomes two examples, the
label task `[label] <prompt>` -> the answer line and the rationale task `[rationale] <prompt>` -> the rationale;
loss = (sum of the label tokens' CE + lambda * sum of the rationale tokens' CE) / target tokens, lambda =
`cot.rationale_weight` (the token-level form of Hsieh et al.'s L_label + lambda L_rationale). The prefix is put in
front of the prompt's tokens (after BOS); at inference the student is asked with the label prefix and answers
directly, without writing a rationale.

The teacher's samples are an artifact beside the run (`<output.dir>/<name>-cot/teacher.jsonl`, resumable, with an
identity sidecar, like method `seqkd`); `run_dir/cot.json` records, per question, how many samples were generated,
verified and kept, and the fraction of questions with no correct sample.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from distil.atomic import write_atomic
from distil.data import IGNORE
from distil.errors import DistilError
from distil.eval.tasks import ANSWER_MARKER, Number, extract_answer, verify
from distil.heads import shift
from distil.losses import LossOutput, hard_ce
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.seqkd import prompt_ids, teacher_text_loss
from distil.options import option


@dataclass
class CoTSpec:
    """CoT distillation: the teacher's rationale + answer samples, kept when the answer verifies."""

    n: int = option(4, "Samples per question; rejection sampling keeps those whose final answer verifies.", gt=0)
    temperature: float = option(0.7, "Sampling temperature of the teacher (0 = greedy, with n: 1).", ge=0.0)
    top_p: float = option(1.0, "Nucleus sampling (1 = off).", gt=0.0, le=1.0)
    top_k: int = option(0, "Top-k sampling (0 = off).", ge=0)
    max_new_tokens: int = option(128, "Longest trace, in tokens; a trace cut there is never kept.", gt=0)
    seed: int = option(0, "Seed of the teacher's sampling (per sample: see distil/generation/params.py).", ge=0,
                       lt=2**32)
    batch_size: int = option(16, "Prompts per teacher generation batch (transformers backend).", gt=0)
    backend: Literal["hf", "llamacpp"] = option("hf", "Who runs the teacher's generation: transformers, or "
                                                "llama.cpp (the teacher exported once to F16).")
    shortest: int = option(0, "Keep at most this many correct traces per question, the shortest first (verbose "
                           "traces hurt small students); 0 = every correct one.", ge=0)
    unique: bool = option(True, "Keep identical correct traces of one question once.")
    step_by_step: bool = option(False, "Distilling step-by-step (Hsieh et al. 2023): the answer and the rationale "
                                "as two tasks, each prompt prefixed by its task's prefix.")
    rationale_weight: float = option(1.0, "Step-by-step: lambda, the weight of the rationale task's tokens (the "
                                     "label task's weigh 1).", ge=0.0)
    label_prefix: str = option("[label] ", "Step-by-step: the prefix of the label (answer) task's prompts.")
    rationale_prefix: str = option("[rationale] ", "Step-by-step: the prefix of the rationale task's prompts.")
    token_kd: bool = option(False, "Also match the teacher's token distributions on the kept traces (the distill "
                            "section's loss, temperature and alpha); keeps the teacher in memory while training.")
    dir: str = option("", "Where the teacher's samples go; empty = <output.dir>/<name>-cot (beside the run "
                      "directory, so `--overwrite` keeps them).")


def corpus_path(recipe: Any) -> Path:
    base = Path(recipe.cot.dir) if recipe.cot.dir else Path(recipe.output.dir) / f"{recipe.name}-cot"
    return base / "teacher.jsonl"


# -- rejection sampling ----------------------------------------------------------------------------------------------


def reference_answer(example: dict, tok: Any) -> Number | None:
    """The gold answer of a training example: the answer extracted from its reference response (its targets)."""
    targets = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    return extract_answer(tok.decode(targets, skip_special_tokens=True))


@dataclass
class Selection:
    kept: list[dict]  # the kept samples, question by question, shortest first within a question
    questions: list[dict]  # per question: prompt_index, gold, generated, finished, verified, kept

    def summary(self) -> dict:
        """Totals and per-question means; `no_correct` = fraction of the questions with a gold answer that got no
        verified sample (`no_gold`: questions whose reference has no extractable answer, never verified)."""
        q = self.questions
        graded = [x for x in q if x["gold"] is not None]
        out: dict[str, Any] = {"questions": len(q), "no_gold": len(q) - len(graded)}
        for key in ("generated", "finished", "verified", "kept"):
            total = sum(x[key] for x in q)
            out[key] = total
            out[f"{key}_per_question"] = total / len(q) if q else 0.0
        out["no_correct"] = sum(x["verified"] == 0 for x in graded) / len(graded) if graded else 1.0
        return out


def select(records: Sequence[dict], golds: Sequence[Number | None], shortest: int = 0,
           unique: bool = True) -> Selection:
    """Rejection sampling over generation records (`prompt_index`, `sample_index`, `completion`, `finish_reason`,
    `completion_tokens`): a sample is verified iff the teacher stopped by itself (finish_reason 'stop') and the
    answer extracted from it equals golds[prompt_index]; of a question's verified samples, identical completions
    are kept once (unique) and then the `shortest` ones with the fewest tokens (ties: lower sample index) are kept
    (0 = all)."""
    by_q: dict[int, list[dict]] = {i: [] for i in range(len(golds))}
    for r in records:
        by_q.setdefault(r["prompt_index"], []).append(r)
    kept: list[dict] = []
    questions = []
    for p in sorted(by_q):
        samples = sorted(by_q[p], key=lambda r: r["sample_index"])
        gold = golds[p] if p < len(golds) else None
        finished = [r for r in samples if r["finish_reason"] == "stop"]
        good = [r for r in finished if gold is not None and verify(r["completion"], gold)]
        chosen, seen = [], set()
        for r in good:  # in sample order, so the first copy of a repeated trace is the one kept
            if not (unique and r["completion"] in seen):
                chosen.append(r)
                seen.add(r["completion"])
        chosen.sort(key=lambda r: (r["completion_tokens"], r["sample_index"]))
        if shortest:
            chosen = chosen[:shortest]
        kept.extend(chosen)
        questions.append({"prompt_index": p, "gold": gold, "generated": len(samples), "finished": len(finished),
                          "verified": len(good), "kept": len(chosen)})
    return Selection(kept=kept, questions=questions)


# -- training examples -----------------------------------------------------------------------------------------------


def split_trace(trace: str, answer: Number) -> tuple[str, str]:
    """(rationale, label) of a verified trace: the text before its last answer marker line, and the canonical answer
    line '#### <answer>'."""
    cut = trace.rfind(ANSWER_MARKER)
    rationale = trace[:cut] if cut >= 0 else trace
    return rationale.rstrip("\n"), f"{ANSWER_MARKER} {answer}"


def _example(prompt: list[int], target: list[int], seq_len: int) -> dict | None:
    ex = {"input_ids": (prompt + target)[:seq_len], "labels": ([IGNORE] * len(prompt) + target)[:seq_len]}
    return ex if any(v != IGNORE for v in ex["labels"][1:]) else None


def _encode(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def with_prefix(prompt: list[int], prefix: list[int], bos: int | None) -> list[int]:
    """The prefix's tokens in front of the prompt's, after its BOS if it starts with one."""
    head = 1 if bos is not None and prompt[:1] == [bos] else 0
    return prompt[:head] + prefix + prompt[head:]


def trace_examples(prompts: list[list[int]], kept: list[dict], tok: Any, seq_len: int, end: list[int]) -> list[dict]:
    """The student's examples: prompt (masked) + trace + end (the student's turn end) as targets."""
    out = []
    for r in kept:
        ex = _example(prompts[r["prompt_index"]], _encode(tok, r["completion"]) + list(end), seq_len)
        if ex is not None:
            out.append(ex)
    return out


def step_by_step_examples(prompts: list[list[int]], kept: list[dict], golds: Sequence[Number | None], tok: Any,
                          seq_len: int, end: list[int], label_prefix: str, rationale_prefix: str) -> list[dict]:
    """Two examples per trace (Hsieh et al. 2023): `label_prefix + prompt -> '#### answer' + end` and
    `rationale_prefix + prompt -> rationale + end`; each carries `task` (0 = label, 1 = rationale)."""
    bos = tok.bos_token_id
    lp, rp = _encode(tok, label_prefix), _encode(tok, rationale_prefix)
    out = []
    for r in kept:
        prompt = prompts[r["prompt_index"]]
        rationale, label = split_trace(r["completion"], golds[r["prompt_index"]])
        for task, prefix, text in ((0, lp, label), (1, rp, rationale)):
            ex = _example(with_prefix(prompt, prefix, bos), _encode(tok, text) + list(end), seq_len)
            if ex is not None:
                out.append({**ex, "task": task})
    return out


def build_step_by_step(task: torch.Tensor, rationale_weight: float, vocab: int) -> Any:
    """loss = (sum of label-task tokens' CE + lambda * sum of rationale-task tokens' CE) / num_items; `task[index]`
    is the task of example `index` (0 = label, 1 = rationale): the examples carry their index, and collate gives
    batch['index']. Metrics: label_ce and rationale_ce (unweighted, over the same num_items)."""

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, labels = shift(s_logits, batch["labels"], vocab)
        ce = hard_ce(s.reshape(-1, s.shape[-1]), labels.reshape(-1)).reshape(labels.shape).sum(1)  # [B], 0 if masked
        rationale = task.to(ce.device)[batch["index"]] == 1
        denom = max(float(num_items), 1.0)
        label_ce, rationale_ce = ce[~rationale].sum() / denom, ce[rationale].sum() / denom
        loss = label_ce + rationale_weight * rationale_ce
        return LossOutput(loss=loss, metrics={"label_ce": label_ce.detach(), "rationale_ce": rationale_ce.detach()},
                          n_tokens=int((labels != IGNORE).sum()))

    return loss_fn


# -- the method ------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    examples: list[dict]
    selection: Selection
    path: Path


def prepare(ctx: Context) -> Corpus:
    """The teacher samples every training question (resumably); rejection sampling keeps the verified traces."""
    from distil.generate import generate
    from distil.generation.params import GenParams

    spec = ctx.recipe.cot
    tok = ctx.student.tokenizer
    prompts = [prompt_ids(e, tok.bos_token_id) for e in ctx.train_examples]
    keep = [i for i, p in enumerate(prompts) if p]
    if not keep:
        raise DistilError(f"data.source: method 'cot' needs questions (prompt/response or messages records whose "
                          f"responses end in an answer), found {ctx.recipe.data.source} with none")
    prompts = [prompts[i] for i in keep]
    golds = [reference_answer(ctx.train_examples[i], tok) for i in keep]
    if all(g is None for g in golds):
        raise DistilError(f"data.source: method 'cot' verifies the teacher's answers against the references' "
                          f"answers ('#### 42', 'The answer is 42'), found no number in any reference of "
                          f"{ctx.recipe.data.source}")
    # one vocabulary: the teacher is handed the prompts as the student's ids (data.py's rendering); across
    # tokenizers it is asked each question as text, through its own tokenizer, template and BOS
    shared = ctx.teacher().tokenizer.get_vocab() == tok.get_vocab()
    questions = [ctx.train_examples[i].get("question") or "" for i in keep]
    if not shared and not all(questions):
        raise DistilError(f"data.source: cot across tokenizers asks the teacher each question as text; expected "
                          f"prompt/response or messages records in {ctx.recipe.data.source}, found examples "
                          f"without one")
    end = _turn_end(ctx, shared)
    params = GenParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                       top_k=spec.top_k, n=spec.n, seed=spec.seed).check()
    out = corpus_path(ctx.recipe)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistilError(f"{out.parent}: cot.dir: cannot create the directory ({exc.strerror or exc})") from None
    if ctx.main:
        if spec.backend == "llamacpp":
            from distil.generation.sources import load_for_backend

            t = ctx.recipe.teacher
            model, ttok = load_for_backend({"source": t.source, "tokenizer": t.tokenizer}, "llamacpp")
        else:
            model, ttok = ctx.teacher().model, ctx.teacher().tokenizer
        result = generate(model, ttok, prompts if shared else questions, params, out=out, batch_size=spec.batch_size,
                          model_name=ctx.recipe.teacher.source)
        ctx.echo(f"cot: {len(result.records)} teacher samples in {out} ({result.kept} kept from an earlier run, "
                 f"{result.generated} generated)")
    ctx.wait()
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    selection = select(records, golds, shortest=spec.shortest, unique=spec.unique)
    s = selection.summary()
    ctx.echo(f"cot: {s['questions']} questions x {spec.n} samples: {s['generated']} generated, {s['finished']} "
             f"finished, {s['verified']} verified, {s['kept']} kept ({s['kept_per_question']:.2f} per question); "
             f"{s['no_correct']:.1%} of the questions have no correct sample")
    if not selection.kept:
        raise DistilError(f"{out}: rejection sampling kept no trace: none of the {s['generated']} samples of "
                          f"{s['questions']} questions verifies ({s['finished']} finished before "
                          f"cot.max_new_tokens); check the teacher on this task, or raise cot.n / cot.temperature")
    seq_len = ctx.recipe.data.seq_len
    if spec.step_by_step:
        examples = step_by_step_examples(prompts, selection.kept, golds, tok, seq_len, end, spec.label_prefix,
                                         spec.rationale_prefix)
        examples = [{**ex, "index": i} for i, ex in enumerate(examples)]
    else:
        examples = trace_examples(prompts, selection.kept, tok, seq_len, end)
    if not examples:
        raise DistilError(f"{out}: the kept traces leave no training target (cut away by data.seq_len={seq_len})")
    return Corpus(examples=examples, selection=selection, path=out)


def _turn_end(ctx: Context, shared: bool = True) -> list[int]:
    """What every learned trace ends with: the student's turn end, after the compatibility pre-flight (`shared`:
    the teacher is handed the student's token ids)."""
    from distil.compat import check_teacher_data

    return check_teacher_data(ctx.teacher().tokenizer, ctx.student.tokenizer, student_model=ctx.student.model,
                              chat=ctx.recipe.data.chat_template, where="cot", ids_cross=shared)


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `cot`, at validation (before any model is loaded)."""
    spec = recipe.cot
    if spec.n > 1 and spec.temperature == 0:
        raise DistilError(f"{where}: cot.n: greedy samples (cot.temperature: 0) are all the same; expected n: 1 or a "
                          f"temperature > 0, found n: {spec.n}")
    if spec.step_by_step:
        if spec.token_kd:
            raise DistilError(f"{where}: cot.token_kd: the teacher never saw the step-by-step task prefixes, so its "
                              f"distributions on them are no target; expected token_kd: false with step_by_step, "
                              f"found true")
        for key in ("label_prefix", "rationale_prefix"):
            if not getattr(spec, key).strip():
                raise DistilError(f"{where}: cot.{key}: expected a non-empty task prefix, found "
                                  f"{getattr(spec, key)!r}")
        if spec.label_prefix == spec.rationale_prefix:
            raise DistilError(f"{where}: cot.rationale_prefix: expected a prefix different from cot.label_prefix, "
                              f"found {spec.rationale_prefix!r} for both")


def stage(ctx: Context) -> Stage:
    spec, corpus = ctx.recipe.cot, ctx.artifact
    if ctx.main:  # provenance: what rejection sampling did, question by question
        write_atomic(ctx.run_dir / "cot.json", json.dumps({
            "teacher": ctx.recipe.teacher.source, "samples": str(corpus.path), "summary": corpus.selection.summary(),
            "options": {k: getattr(spec, k) for k in ("n", "temperature", "top_p", "top_k", "max_new_tokens",
                                                      "seed", "shortest", "unique", "step_by_step")},
            "questions": corpus.selection.questions}, indent=1))
    if spec.step_by_step:
        task = torch.tensor([ex["task"] for ex in corpus.examples])
        loss_fn = build_step_by_step(task, spec.rationale_weight, ctx.vocab)
    else:
        loss_fn = teacher_text_loss(ctx, spec.token_kd)
    return Stage(phases=[Phase(name="cot", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=corpus.examples)])


def _tokenizers(recipe: Any) -> str:
    """without token_kd"""
    return "same" if recipe.cot.token_kd else "any"  # the teacher's traces, as text, cross tokenizers


METHOD = Method(
    name="cot",
    summary="CoT distillation: the teacher writes rationale + answer, n samples per question, those whose answer "
            "verifies are learned (rejection sampling; cot.step_by_step: rationale and answer as two tasks)",
    teacher=lambda recipe: "train" if recipe.cot.token_kd else "prepare",
    tokenizers=_tokenizers,
    prepare=prepare,
    build=stage,
    options=CoTSpec,
    check=check,
)
