"""Sequence-level knowledge distillation (SeqKD, Kim & Rush 2016): the teacher's own output sequences replace the
references. The teacher answers every training prompt (greedy by default: the mode of its sequence distribution,
which Kim & Rush approximate with beam search), and the student learns those answers with plain cross-entropy;
with `seqkd.token_kd` it also matches the teacher's token distributions on them ("word + sequence" KD, the
`distill` section's loss and alpha), which keeps the teacher in memory while training.

The prompts are the prompt parts of the training examples (their tokens before the first target), so prompt
rendering, chat templates, BOS and the train/eval split are exactly `distil/data.py`'s; text-only data has no
prompts and is refused. Across tokenizers (a teacher of another family; `token_kd` off, it compares token
distributions) the teacher is asked each record's question as text through its own chat template, and the
student's examples are built from (question, answer) in the student's own format (multi-turn context is not
carried over: the question is the last user message before the first answer). The teacher's answers are an artifact: `<output.dir>/<name>-seqkd/teacher.jsonl`, written
by `distil.generate.generate` sample by sample with an identity sidecar (teacher weights, parameters, prompt ids),
so an interrupted run resumes without duplicates and a corpus made by another teacher or with other parameters is
refused, never reused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from distil.compat import check_teacher_data
from distil.data import IGNORE, _eos, encode_supervised
from distil.errors import DistilError
from distil.eval.answers import prompt_part
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.hard_labels import build_hard_labels
from distil.methods.offline import build_offline
from distil.options import option


@dataclass
class SeqKDSpec:
    """Sequence-level KD: the teacher's answers to the training prompts replace the references."""

    max_new_tokens: int = option(128, "Longest teacher answer, in tokens (answers cut there are kept, without EOS, "
                                 "and counted).", gt=0)
    temperature: float = option(0.0, "0 = greedy (the teacher's most likely answer, SeqKD's choice); > 0 samples.",
                                ge=0.0)
    top_p: float = option(1.0, "Nucleus sampling (1 = off); with temperature > 0.", gt=0.0, le=1.0)
    top_k: int = option(0, "Top-k sampling (0 = off); with temperature > 0.", ge=0)
    num_beams: int = option(1, "Beam search width (1 = off; greedy only, transformers backend): the approximate "
                            "mode of the teacher's sequence distribution that Kim & Rush train on.", ge=1)
    n: int = option(1, "Answers per prompt (> 1 needs temperature > 0); each becomes a training example.", gt=0)
    stop: list[str] = option(help="Stop strings: the teacher's answer ends before the first one (counted as a "
                             "finished answer, so the student learns to end there); e.g. ['\\n\\n'] keeps the first "
                             "paragraph.", factory=list)
    seed: int = option(0, "Seed of the teacher's sampling (per answer: see distil/generation/params.py).", ge=0,
                       lt=2**32)
    batch_size: int = option(8, "Prompts per teacher generation batch (transformers backend).", gt=0)
    backend: Literal["hf", "llamacpp"] = option("hf", "Who runs the teacher's generation: transformers, or "
                                                "llama.cpp (the teacher exported once to F16; much faster on CPU).")
    token_kd: bool = option(False, "Also match the teacher's token distributions on its answers (word + sequence "
                            "KD, with the distill section's loss, temperature and alpha); keeps the teacher in "
                            "memory while training.")
    dir: str = option("", "Where the teacher's answers go; empty = <output.dir>/<name>-seqkd (beside the run "
                      "directory, so `--overwrite` keeps them).")


def corpus_path(recipe: Any) -> Path:
    base = Path(recipe.seqkd.dir) if recipe.seqkd.dir else Path(recipe.output.dir) / f"{recipe.name}-seqkd"
    return base / "teacher.jsonl"


prompt_ids = prompt_part  # the prompt part of an example (its masked tokens before the first target)


def teacher_examples(prompts: list[list[int]], records: list[dict], tok: Any, seq_len: int,
                     end: list[int] | None = None) -> list[dict]:
    """Training examples from the teacher's answers: prompt ids + answer ids (+ `end`, the student's turn end,
    when the teacher stopped: `<|im_end|>\n` in ChatML, else EOS, as `distil.compat.turn_end` finds it), only the
    answer (and its end) as targets, cut at seq_len."""
    end = list(end) if end is not None else [_eos(tok)]
    out = []
    for r in records:
        ids = prompts[r["prompt_index"]]
        answer = list(tok(r["completion"], add_special_tokens=False)["input_ids"])
        if r["finish_reason"] == "stop":
            answer += end  # the student learns to stop where the teacher stopped, the way its own format ends
        ex = {"input_ids": (ids + answer)[:seq_len], "labels": ([IGNORE] * len(ids) + answer)[:seq_len]}
        if any(v != IGNORE for v in ex["labels"][1:]):
            out.append(ex)
    return out


def text_examples(questions: list[str], records: list[dict], tok: Any, seq_len: int, chat: bool,
                  end: list[int]) -> list[dict]:
    """Across tokenizers: the teacher answered each question as text; the student's examples are built from
    (question, answer) by data.py in the student's own format, exactly as a prompt/response record would be; an
    answer cut at max_new_tokens loses the turn end the format appends (the student must not learn to stop there)."""
    out = []
    for r in records:
        record = {"prompt": questions[r["prompt_index"]], "response": r["completion"]}
        ex = encode_supervised(tok, record, "prompt_response", chat, f"seqkd: answer {r['prompt_index']}")
        if r["finish_reason"] != "stop" and end and ex["input_ids"][-len(end):] == end:
            ex = {k: v[: len(v) - len(end)] for k, v in ex.items()}
        ex = {k: v[:seq_len] for k, v in ex.items()}
        if any(v != IGNORE for v in ex["labels"][1:]):
            out.append(ex)
    return out


def prepare(ctx: Context) -> list[dict]:
    """The teacher answers every training prompt (resumably); returns the training examples made of its answers."""
    from distil.generation.params import GenParams
    from distil.generate import generate

    spec = ctx.recipe.seqkd
    bos = ctx.student.tokenizer.bos_token_id
    prompts = [prompt_ids(e, bos) for e in ctx.train_examples]
    if not any(prompts):
        raise DistilError(f"data.source: method 'seqkd' needs prompts (prompt/response or messages records: the "
                          f"teacher answers the prompts), found {ctx.recipe.data.source} with none")
    # one vocabulary: the teacher is handed the prompts as the student's token ids (data.py's rendering, exactly);
    # across tokenizers it is asked each record's question as text, through its own chat template
    shared = ctx.teacher().tokenizer.get_vocab() == ctx.student.tokenizer.get_vocab()
    end = check_teacher_data(ctx.teacher().tokenizer, ctx.student.tokenizer, student_model=ctx.student.model,
                             chat=ctx.recipe.data.chat_template, where="seqkd", ids_cross=shared)
    keep = [i for i, p in enumerate(prompts) if p]
    prompts = [prompts[i] for i in keep]
    questions = [ctx.train_examples[i].get("question") or "" for i in keep]
    if not shared and not all(questions):
        raise DistilError(f"data.source: seqkd across tokenizers asks the teacher each record's question as text; "
                          f"expected prompt/response or messages records in {ctx.recipe.data.source}, found "
                          f"examples without one")
    params = GenParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                       top_k=spec.top_k, n=spec.n, seed=spec.seed, num_beams=spec.num_beams, stop=tuple(spec.stop)).check()
    out = corpus_path(ctx.recipe)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistilError(f"{out.parent}: seqkd.dir: cannot create the directory ({exc.strerror or exc})") from None
    if ctx.main:
        if spec.backend == "llamacpp":  # the teacher's GGUF (embedded or .gguf as is; an HF dir exported to F16)
            from distil.generation.sources import load_for_backend

            t = ctx.recipe.teacher
            model, tok = load_for_backend({"source": t.source, "tokenizer": t.tokenizer}, "llamacpp")
        else:
            model, tok = ctx.teacher().model, ctx.teacher().tokenizer
        result = generate(model, tok, prompts if shared else questions, params, out=out, batch_size=spec.batch_size,
                          model_name=ctx.recipe.teacher.source,
                          remedy=f"delete {out.parent} to make them again, or set seqkd.dir to keep both")
        cut = sum(r["finish_reason"] == "length" for r in result.records)
        ctx.echo(f"seqkd: {len(result.records)} teacher answers in {out} ({result.kept} kept from an earlier run, "
                 f"{result.generated} generated, {cut} cut at seqkd.max_new_tokens)")
    ctx.wait()
    records = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    if shared:
        examples = teacher_examples(prompts, records, ctx.student.tokenizer, ctx.recipe.data.seq_len, end)
    else:
        examples = text_examples(questions, records, ctx.student.tokenizer, ctx.recipe.data.seq_len,
                                 ctx.recipe.data.chat_template, end)
    if not examples:
        raise DistilError(f"{out}: the teacher's answers leave no training target (every answer is empty or cut "
                          f"away by data.seq_len={ctx.recipe.data.seq_len})")
    return examples


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `seqkd`, at validation (before any model is loaded)."""
    spec = recipe.seqkd
    if spec.n > 1 and spec.temperature == 0:
        raise DistilError(f"{where}: seqkd.n: greedy answers (seqkd.temperature: 0) are all the same; expected n: 1 "
                          f"or a temperature > 0, found n: {spec.n}")
    if any(not isinstance(x, str) or not x for x in spec.stop):
        raise DistilError(f"{where}: seqkd.stop: expected non-empty strings, found {spec.stop!r}")
    if spec.num_beams > 1 and (spec.temperature > 0 or spec.backend != "hf"):
        raise DistilError(f"{where}: seqkd.num_beams: beam search needs seqkd.temperature: 0 and seqkd.backend: hf; "
                          f"found temperature {spec.temperature}, backend {spec.backend}")


def teacher_text_loss(ctx: Context, token_kd: bool):
    """The loss of the methods that learn the teacher's text: cross-entropy on it, or with `token_kd` also the
    teacher's token distributions on the same tokens (the `distill` section's loss, temperature and alpha)."""
    if token_kd:
        return build_offline(ctx.teacher().model, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    return build_hard_labels(vocab=ctx.vocab)


def stage(ctx: Context) -> Stage:
    return Stage(phases=[Phase(name="seqkd", module=Trainable(ctx.student.model),
                               loss_fn=teacher_text_loss(ctx, ctx.recipe.seqkd.token_kd), examples=ctx.artifact)])


METHOD = Method(
    name="seqkd",
    summary="sequence-level KD: the teacher's own answers to the training prompts replace the references "
            "(seqkd.token_kd adds token-level KD on them)",
    teacher=lambda recipe: "train" if recipe.seqkd.token_kd else "prepare",
    tokenizers=lambda recipe: "same" if recipe.seqkd.token_kd else "any",  # text alone crosses tokenizers
    prepare=prepare,
    build=stage,
    options=SeqKDSpec,
    check=check,
)
