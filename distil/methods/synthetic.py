"""Synthetic-data distillation: the teacher writes a training corpus, the corpus is filtered and saved, the student
learns it (hard labels on the teacher's text, or `synthetic.token_kd`: KD on it with the `distill` section's loss).

Seed prompts, one source per recipe:
  - `synthetic.prompts`: a .jsonl ({"prompt": str} or {"messages": [...]}) or .txt (one per line) file; malformed
    lines are skipped and counted, a file with no usable line is refused (distil/generation/prompts.py);
  - `synthetic.topics` (self-instruct, Wang et al. 2023): the teacher first WRITES the questions, one per
    (topic, template, sample) from `TEMPLATES`, then answers them. Topics: `builtin:pydoc` (the topics of
    Python's documentation), `builtin:builtins` (public built-in names), `builtin:stdlib` (standard-library module
    names), comma-separated, or a .txt file of one topic per line; all offline. A topic named in a held-out prompt
    is dropped (counted) so the eval asks about nothing the corpus was written about;
  - `synthetic.task`: a verifiable task's training questions (distil/eval/tasks.py); answers that do not verify
    are filtered out and the task's eval questions join the decontamination set;
  - none of those: the prompts of the recipe's training records (like seqkd), held-out prompts excluded.

Filters (distil/generation/filters.py), in this order, counted in provenance.json: truncated answers (cut at
max_new_tokens; only with `keep_truncated: false`, else they are kept and trained without their end of turn),
empty/degenerate, length bounds (student
tokens), repetition, the task verifier, exact duplicates, near duplicates (word n-gram Jaccard), decontamination
(word n-grams shared with the held-out prompts and references, and the teacher's answers to the held-out
prompts, which are the eval's targets). The self-instruct questions go through degenerate, length (characters),
exact/near duplicates and decontamination first.

Artifact directory `<output.dir>/<name>-synthetic/` (or `synthetic.dir`), beside the run directory:
  questions.jsonl  the teacher's questions (self-instruct)           } written by distil.generate.generate:
  teacher.jsonl    the teacher's answers to the seed prompts         } identity sidecars, resumed after kill -9,
  heldout.jsonl    its answers to the held-out prompts (eval)        } refused when teacher/params/prompts change
  corpus/          the kept samples as a `datasets` directory (save_to_disk; temp dir, then rename)
  messages.jsonl   one {"messages": [user, assistant]} line per kept sample
  provenance.json  teacher, backend, sampling parameters, seeds, templates, counts removed by each filter, date
Evaluation: every row is scored on the teacher's answers to the held-out prompts (`Stage.eval_examples`), so the
table's KL(T||S) is the student's KL to the teacher on the teacher's own answers.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from distil.atomic import write_atomic
from distil.compat import check_teacher_data
from distil.data import IGNORE, encode_supervised, record_kind
from distil.errors import DistilError
from distil.eval.tasks import PROMPTS, TaskName, get_task, verify
from distil.generation import filters as F
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.methods.seqkd import prompt_ids, teacher_examples, teacher_text_loss
from distil.options import option

# Self-instruct templates: the teacher writes one question per (topic, template, sample).
TEMPLATES = (
    "Write one question a beginner might ask about the Python topic '{topic}'. Reply with the question only.",
    "Write one short, practical question about using '{topic}' in Python code. Reply with the question only.",
    "Write one question that asks how '{topic}' works in Python and when to use it. Reply with the question only.",
)
TOPIC_SOURCES = ("pydoc", "builtins", "stdlib")


@dataclass
class SyntheticSpec:
    """Synthetic-data distillation: the teacher writes a corpus (prompts or topics); it is filtered, saved, learned."""

    prompts: str = option("", "Seed prompts file (.jsonl with 'prompt' or 'messages', or .txt one per line); empty = "
                          "the topics, the task, or else the prompts of the recipe's training data.")
    topics: str = option("", "Self-instruct: the teacher writes the questions about these topics first: "
                         "'builtin:pydoc' (Python documentation topics), 'builtin:builtins', 'builtin:stdlib' "
                         "(comma-separated), or a .txt file with one topic per line.")
    templates: int = option(3, "Self-instruct: how many of the built-in question templates to use per topic.",
                            ge=1, le=len(TEMPLATES))
    questions_per_template: int = option(1, "Self-instruct: questions the teacher writes per topic and template.",
                                         gt=0)
    question_temperature: float = option(0.0, "Self-instruct: sampling temperature of the questions (0 = greedy: the "
                                         "most coherent questions of a small teacher; > 0 for several per template).",
                                         ge=0.0)
    question_max_tokens: int = option(48, "Self-instruct: longest question, in tokens.", gt=0)
    task: Optional[TaskName] = option(None, "A verifiable task (distil/eval/tasks.py): its training questions are "
                                      "the prompts, answers that do not verify are dropped, its eval questions "
                                      "join the decontamination set.")
    task_questions: Literal["task", "teacher"] = option(
        "task", "With synthetic.task: 'task' = the task's own training questions; 'teacher' = the teacher WRITES "
        "the questions (sampled from its start of sequence at question_temperature, cut at the task's prompt end, "
        "kept when they parse as questions of the task, which then computes their gold answers; eval-side "
        "questions of the hash split are dropped). Needs a teacher trained on whole task texts "
        "(data.source: builtin:<task>_text) with a BOS token.")
    max_prompts: int = option(0, "Use at most this many seed prompts (0 = all; a task makes 256 by default; with "
                              "task_questions: teacher, the number of questions the teacher writes).", ge=0)
    max_new_tokens: int = option(128, "Longest teacher answer, in tokens.", gt=0)
    temperature: float = option(0.0, "Answers: 0 = greedy; > 0 samples.", ge=0.0)
    top_p: float = option(1.0, "Answers: nucleus sampling (1 = off).", gt=0.0, le=1.0)
    top_k: int = option(0, "Answers: top-k sampling (0 = off).", ge=0)
    n: int = option(1, "Answers per prompt (> 1 needs temperature > 0).", gt=0)
    seed: int = option(0, "Seed of the teacher's sampling (questions and answers).", ge=0, lt=2**32)
    batch_size: int = option(8, "Prompts per generation batch (transformers backend).", gt=0)
    backend: Literal["hf", "llamacpp"] = option("hf", "Who runs the teacher's generation: transformers, or llama.cpp "
                                                "(the teacher's GGUF; much faster on CPU).")
    token_kd: bool = option(False, "KD on the corpus with the distill section's loss (keeps the teacher in memory "
                            "while training); off = plain fine-tuning on the teacher's text.")
    keep_truncated: bool = option(True, "Keep answers cut at max_new_tokens (trained without the end of turn: the "
                                  "teacher did not stop there); off: filtered out.")
    min_tokens: int = option(4, "Shortest kept answer, in student tokens.", ge=0)
    max_tokens: int = option(0, "Longest kept answer, in student tokens (0 = no bound).", ge=0)
    max_repetition: float = option(0.3, "Drop answers whose fraction of repeated word 3-grams exceeds this.",
                                   ge=0.0, le=1.0)
    near_dup_threshold: float = option(0.7, "Drop a sample whose word 3-gram Jaccard with a kept one is >= this "
                                       "(exact pairwise up to 5,000 samples, MinHash beyond; 1 = exact copies only).",
                                       gt=0.0, le=1.0)
    decontam_n: int = option(13, "Drop samples sharing a word n-gram of this length with the held-out prompts, "
                             "references and teacher answers (13: GPT-3; 8: Llama 2); 0 = off.", ge=0)
    dir: str = option("", "Where the generations and the corpus go; empty = <output.dir>/<name>-synthetic.")


def artifact_dir(recipe: Any) -> Path:
    spec = recipe.synthetic
    return Path(spec.dir) if spec.dir else Path(recipe.output.dir) / f"{recipe.name}-synthetic"


# -- seed prompts --------------------------------------------------------------------------------------------------


def builtin_topics(name: str) -> list[str]:
    """Offline topic lists: Python's documentation topics, public built-in names, standard-library modules."""
    if name == "pydoc":
        from pydoc_data.topics import topics

        return [k.replace("-", " ") for k in sorted(topics)]
    if name == "builtins":
        import builtins

        return sorted(n for n in dir(builtins) if not n.startswith("_"))
    if name == "stdlib":
        return sorted(n for n in sys.stdlib_module_names if not n.startswith("_"))
    raise DistilError(f"synthetic.topics: expected one of {', '.join('builtin:' + s for s in TOPIC_SOURCES)} or a "
                      f".txt file, found builtin:{name}")


def read_topics(spec: str) -> list[str]:
    """Topics from 'builtin:NAME' parts and .txt files (one topic per line), in order, duplicates dropped."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part.startswith("builtin:"):
            out += builtin_topics(part.split(":", 1)[1])
            continue
        path = Path(part)
        if path.suffix != ".txt" or not path.is_file():
            raise DistilError(f"{part}: synthetic.topics: expected builtin:pydoc/builtins/stdlib or an existing .txt "
                              f"file (one topic per line), found {'no such file' if not path.exists() else part}")
        try:
            out += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except UnicodeDecodeError:
            raise DistilError(f"{path}: synthetic.topics: expected UTF-8 text") from None
    return list(dict.fromkeys(out))


# A question: from a capital letter to the first '?', without a sentence end, colon or line break in between
# ('.' inside code such as `a.b()` is not a sentence end).
_QUESTION = re.compile(r"[A-Z](?:[^!?:.\n]|\.(?!\s))*\?")


def clean_question(text: str) -> str:
    """The first question in a teacher's reply ('Question: How does X work?' -> 'How does X work?'); '' when the
    reply asks nothing (small teachers often answer the instruction instead of writing a question)."""
    m = _QUESTION.search(text)
    return m.group(0).strip() if m else ""


def named_in(topic: str, texts_words: list[list[str]]) -> bool:
    """Whether the topic's words occur, contiguously, in one of the texts (word lists)."""
    w = F.words(topic)
    return bool(w) and any(tuple(w) in F.ngrams(t, len(w)) for t in texts_words)


def _prompt_text(prompt: Any) -> str:
    """The text a filter judges of a prompt: the string, or the last user message."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), prompt[-1]["content"])


def _record_prompt(record: dict) -> Any:
    """A record's prompt: 'prompt', or its messages before the last assistant turn; None when it has none."""
    if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return record["prompt"]
    messages = record.get("messages")
    if isinstance(messages, list):
        last = max((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"),
                   default=None)
        head = messages[:last] if last else None
        return [{"role": m["role"], "content": m["content"]} for m in head] if head else None
    return None


def recipe_prompts(ctx: Context, held: list[list[int]]) -> list[Any]:
    """The prompts of the recipe's training records (str or messages), without the held-out ones (same rendered
    prompt ids as an eval example)."""
    from distil.readers import read_records

    spec, tok = ctx.recipe.data, ctx.student.tokenizer
    records = read_records(spec.source, spec.max_records)
    held_set = {tuple(p) for p in held}
    out = []
    for i, r in enumerate(records):
        prompt = _record_prompt(r)
        if prompt is None:
            continue
        try:
            ex = encode_supervised(tok, r, record_kind(r, f"{spec.source}: record {i}"), spec.chat_template,
                                   f"{spec.source}: record {i}")
        except DistilError:
            continue  # data.py refuses it for training too
        if tuple(prompt_ids({k: v[:spec.seq_len] for k, v in ex.items()}, tok.bos_token_id)) not in held_set:
            out.append(prompt)
    return out


# -- generation ----------------------------------------------------------------------------------------------------


def _params(recipe: Any, questions: bool = False) -> Any:
    """Generation parameters; prompts are rendered with the chat template exactly when the training examples are
    (data.chat_template), so a teacher trained on bare prompts is asked bare prompts."""
    from distil.generation.params import GenParams

    spec, chat = recipe.synthetic, (None if recipe.data.chat_template else False)
    if questions:
        return GenParams(max_new_tokens=spec.question_max_tokens, temperature=spec.question_temperature,
                         n=spec.questions_per_template, seed=spec.seed, chat=chat).check()
    return GenParams(max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
                     top_k=spec.top_k, n=spec.n, seed=spec.seed, chat=chat).check()


class _Teacher:
    """The teacher for generation: its GGUF in llama.cpp, or the loaded transformers model; opened once."""

    def __init__(self, ctx: Context):
        self.ctx, self.model, self.tok = ctx, None, None

    def generate(self, prompts: list[Any], params: Any, out: Path, what: str) -> list[dict]:
        from distil.generate import generate

        ctx, spec = self.ctx, self.ctx.recipe.synthetic
        if self.model is None:
            if spec.backend == "llamacpp":
                from distil.generation.sources import load_for_backend

                t = ctx.recipe.teacher
                self.model, self.tok = load_for_backend({"source": t.source, "tokenizer": t.tokenizer}, "llamacpp")
            else:
                self.model, self.tok = ctx.teacher().model, ctx.teacher().tokenizer
        result = generate(self.model, self.tok, prompts, params, out=out, batch_size=spec.batch_size,
                          model_name=ctx.recipe.teacher.source)
        ctx.echo(f"synthetic: {len(result.records)} {what} in {out} ({result.kept} kept from an earlier run, "
                 f"{result.generated} generated)")
        return result.records


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- the corpus ----------------------------------------------------------------------------------------------------


def filter_answers(samples: list[dict], spec: Any, count_tokens: Any, references: F.Contamination | None,
                   golds: list[Any] | None = None) -> tuple[list[dict], F.FilterReport]:
    """The answer filters, in order; samples are generate() records (+ 'text': the prompt's text)."""
    answer = lambda s: s["completion"]  # noqa: E731
    whole = lambda s: s["text"] + "\n" + s["completion"]  # noqa: E731
    report = F.FilterReport(len(samples))
    kept = samples
    if not spec.keep_truncated:
        kept = report.apply("truncated", kept, F.verified, lambda s: s["finish_reason"] != "length")
    kept = report.apply("degenerate", kept, F.degenerate, answer)
    kept = report.apply("length", kept, F.length_filter, answer, min_len=spec.min_tokens,
                        max_len=spec.max_tokens or None, measure=count_tokens)
    kept = report.apply("repetition", kept, F.repetition, answer, n=3, max_fraction=spec.max_repetition)
    if golds is not None:
        kept = report.apply("verifier", kept, F.verified, lambda s: verify(s["completion"], golds[s["prompt_index"]]))
    kept = report.apply("exact duplicates", kept, F.exact_dedup, whole)
    kept = report.apply("near duplicates", kept, F.near_dedup, whole, n=3, threshold=spec.near_dup_threshold)
    if references is not None:
        kept = report.apply("contaminated", kept, F.decontaminate, references, whole)
    return kept, report


def filter_questions(questions: list[str], spec: Any, references: F.Contamination | None
                     ) -> tuple[list[str], F.FilterReport]:
    report = F.FilterReport(len(questions))
    kept = report.apply("no question", questions, F.verified, bool)
    kept = report.apply("degenerate", kept, F.degenerate)
    kept = report.apply("length", kept, F.length_filter, min_len=10, max_len=300)
    kept = report.apply("exact duplicates", kept, F.exact_dedup)
    kept = report.apply("near duplicates", kept, F.near_dedup, n=3, threshold=spec.near_dup_threshold)
    if references is not None:
        kept = report.apply("contaminated", kept, F.decontaminate, references)
    return kept, report


def _messages(prompt: Any, completion: str) -> list[dict]:
    user = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return user + [{"role": "assistant", "content": completion}]


def save_corpus(base: Path, kept: list[dict], provenance: dict) -> None:
    """corpus/ (datasets save_to_disk), messages.jsonl and provenance.json, each written atomically."""
    import datasets

    rows = [{"messages": _messages(s["prompt"], s["completion"]), "prompt_index": s["prompt_index"],
             "sample_index": s["sample_index"], "seed": s["seed"], "finish_reason": s["finish_reason"]} for s in kept]
    write_atomic(base / "messages.jsonl",
                 "".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in rows))
    target, tmp, old = base / "corpus", base / ".tmp-corpus", base / ".old-corpus"
    shutil.rmtree(tmp, ignore_errors=True)
    quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one line per stage is the run's output, not a bar per shard
    try:
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    finally:
        if not quiet:
            datasets.enable_progress_bars()
    if target.exists():  # rename away first: a kill here leaves the previous corpus under one of two names
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    path = base / "provenance.json"
    try:  # keep the first date when nothing else changed (a rerun that reused every generation)
        before = json.loads(path.read_text())
        if {k: v for k, v in before.items() if k != "date"} == provenance:
            provenance = {**provenance, "date": before["date"]}
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    provenance.setdefault("date", dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    write_atomic(path, json.dumps(provenance, indent=2, ensure_ascii=False) + "\n")


def without_end_of_turn(example: dict, tok: Any, completion: str) -> dict | None:
    """An answer cut at max_new_tokens: the same example with only the answer's own tokens as targets (not the
    end of turn / EOS the render adds after it: the teacher did not stop there). None when the answer's tokens are
    not the first targets (the render tokenizes it differently)."""
    answer = list(tok(completion, add_special_tokens=False)["input_ids"])
    targets = [t for t, v in enumerate(example["labels"]) if v != IGNORE]
    if [example["input_ids"][t] for t in targets[:len(answer)]] != answer:
        return None
    labels = list(example["labels"])
    for t in targets[len(answer):]:
        labels[t] = IGNORE
    return {"input_ids": example["input_ids"], "labels": labels}


def build_corpus_examples(kept: list[dict], tok: Any, data_spec: Any, source: str) -> tuple[list[dict], int]:
    """Training examples the way distil/data.py builds prompt/response and messages records (prompt masked, the
    answer and its end of turn / EOS as targets; a truncated answer without them), cut at data.seq_len.
    Returns (examples, samples dropped: no target left, or a truncated answer that could not be located)."""
    shape = "prompt_response" if all(isinstance(s["prompt"], str) for s in kept) else "messages"
    out, dropped = [], 0
    for i, s in enumerate(kept):
        record = ({"prompt": s["prompt"], "response": s["completion"]} if shape == "prompt_response"
                  else {"messages": _messages(s["prompt"], s["completion"])})
        ex = encode_supervised(tok, record, shape, data_spec.chat_template, f"{source}: line {i + 1}")
        if s["finish_reason"] == "length":
            ex = without_end_of_turn(ex, tok, s["completion"])
        if ex is not None:
            ex = {k: v[:data_spec.seq_len] for k, v in ex.items()}
        if ex is None or not any(v != IGNORE for v in ex["labels"][1:]):
            dropped += 1
            continue
        out.append(ex)
    return out, dropped


# -- teacher-written questions of a task ---------------------------------------------------------------------------


def write_task_questions(ctx: Context, teacher: "_Teacher", task: Any, base: Path) -> tuple[list[str], list, dict]:
    """Self-instruct for a verifiable task: the teacher writes the questions.

    A model trained on whole task texts (`builtin:<task>_text`: 'question=rationale #### answer', every token a
    target) has learned the distribution of the task's questions as well as their answers. Sampled from its start
    of sequence (BOS) at `question_temperature` and stopped at the end of the task's prompt ('=' for bare prompts),
    it writes a question; the task parses it (`Arithmetic.parse_prompt`: its own format, canonical, operands in
    range) and computes the gold answer that later verifies the teacher's answer to it. Dropped, and counted: text
    that is not a question of the task; questions on the EVAL side of the task's hash split (a teacher can write a
    held-out question: decontamination by construction, as for the task's own training questions); duplicates.
    """
    spec = ctx.recipe.synthetic
    ttok = ctx.teacher().tokenizer
    bos = ttok.bos_token_id
    ids = ttok("0")["input_ids"]
    if bos is None or not ids or ids[0] != bos:
        raise DistilError(f"synthetic.task_questions: teacher: the teacher writes questions from its start of "
                          f"sequence, but its tokenizer ({ctx.recipe.teacher.source}) adds no BOS token; expected a "
                          f"teacher whose tokenizer starts every text with BOS (config:tiny-llama-char does), found "
                          f"bos_token_id={bos}")
    head, _, tail = PROMPTS[task.prompt_style].partition("{q}")
    n = spec.max_prompts or 256
    from distil.generation.params import GenParams

    params = GenParams(max_new_tokens=spec.question_max_tokens, temperature=spec.question_temperature, n=n,
                       seed=spec.seed, chat=False, stop=(tail[-1:],) if tail else ()).check()
    q_path = base / "questions.jsonl"
    if ctx.main:
        teacher.generate([[bos]], params, q_path, "questions written")
    ctx.wait()
    texts = [r["completion"] + (tail[-1:] if r["finish_reason"] == "stop" else "") for r in _read_jsonl(q_path)]
    report = F.FilterReport(len(texts))
    parsed = [(t, task.parse_prompt(t)) for t in texts]
    kept = report.apply("not a question of the task", parsed, F.verified, lambda p: p[1] is not None)
    kept = report.apply("eval side of the split", kept, F.verified, lambda p: not task.is_eval(p[1].question))
    kept = report.apply("exact duplicates", kept, F.exact_dedup, lambda p: p[0])
    ctx.echo(f"synthetic: questions: {report.line()}")
    if not kept:
        raise DistilError(f"{q_path}: synthetic: no question the teacher wrote is usable ({report.line()}); the "
                          f"teacher must be trained on whole task texts (data.source: builtin:{task.name}_text)")
    examples = [ex for _, ex in kept]
    return [e.prompt for e in examples], [e.answer for e in examples], {
        "questions": {"written_by": "teacher", **params.record()}, "question_filters": report.record()}


# -- prepare -------------------------------------------------------------------------------------------------------


def prepare(ctx: Context) -> dict:
    """Generate (resumably), filter and save the corpus; returns {'train': examples, 'eval': examples or None}."""
    recipe, spec, tok = ctx.recipe, ctx.recipe.synthetic, ctx.student.tokenizer
    base = artifact_dir(recipe)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DistilError(f"{base}: synthetic.dir: cannot create the directory ({exc.strerror or exc})") from None
    # the pre-flight: a chat format the student has, a student that stops where answers end, and with one vocabulary
    # (the teacher is then handed the held-out prompts as the student's ids) one BOS convention; across tokenizers
    # every prompt reaches the teacher as text, through its own tokenizer, template and BOS
    shared = ctx.teacher().tokenizer.get_vocab() == tok.get_vocab()
    end = check_teacher_data(ctx.teacher().tokenizer, tok, student_model=ctx.student.model,
                             chat=recipe.data.chat_template, where="synthetic", ids_cross=shared)
    bos = tok.bos_token_id
    held_ex = [(p, e) for p, e in ((prompt_ids(e, bos), e) for e in ctx.eval_examples) if p]
    held = [p for p, _ in held_ex]
    if not shared and any(not e.get("question") for _, e in held_ex):
        raise DistilError(f"data.source: synthetic across tokenizers asks the teacher the held-out prompts as text; "
                          f"expected prompt/response or messages records in {recipe.data.source}, found held-out "
                          f"examples without one")
    held_asked = held if shared else [e["question"] for _, e in held_ex]
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    references = [decode(e["input_ids"]) for e in ctx.eval_examples]  # held-out prompts + references
    held_words = [F.words(decode(p)) for p in held]

    # seed prompts (cheap, on every rank: every rank rebuilds the same corpus from the files)
    golds, source, skipped = None, "", 0
    if spec.prompts:
        from distil.generation.prompts import read_prompts

        pf = read_prompts(spec.prompts)
        prompts, source, skipped = pf.prompts, spec.prompts, pf.skipped
        if pf.skipped:
            ctx.echo(f"synthetic: {pf.report()}")
    elif spec.task:
        task = get_task(spec.task)
        train, task_eval = task.split(spec.max_prompts or 256, 64, recipe.seed)
        prompts, golds, source = [e.prompt for e in train], [e.answer for e in train], f"task:{spec.task}"
        references += [e.prompt + "\n" + e.response() for e in task_eval]
        if spec.task_questions == "teacher":
            prompts, golds, source = [], [], f"task:{spec.task}, questions written by the teacher"
    elif not spec.topics:
        prompts, source = recipe_prompts(ctx, held), recipe.data.source
        if not prompts:
            raise DistilError(f"data.source: method 'synthetic' needs seed prompts: set synthetic.prompts or "
                              f"synthetic.topics, or use prompt/response or messages records, found "
                              f"{recipe.data.source} with none outside the held-out split")
    if spec.max_prompts and not spec.topics and not (spec.task and spec.task_questions == "teacher"):
        prompts = prompts[:spec.max_prompts]
        golds = golds[:spec.max_prompts] if golds is not None else None

    teacher = _Teacher(ctx)
    answer_params = _params(recipe)
    provenance: dict = {"method": "synthetic", "teacher": recipe.teacher.source, "backend": spec.backend,
                        "answers": answer_params.record(), "seed": spec.seed}
    # the held-out prompts: the teacher answers them too; their answers are the eval's targets and decontaminate
    held_path = base / "heldout.jsonl"
    if held and ctx.main:
        teacher.generate(held_asked, answer_params, held_path, "answers to held-out prompts")
    ctx.wait()
    held_records = _read_jsonl(held_path) if held else []
    references += [r["completion"] for r in held_records]
    contamination = F.Contamination(references, spec.decontam_n) if spec.decontam_n else None

    if spec.topics:  # self-instruct: the teacher writes the questions first
        topics = read_topics(spec.topics)
        usable = [t for t in topics if not named_in(t, held_words)]
        asks = [TEMPLATES[k].replace("{topic}", t) for t in usable for k in range(spec.templates)]
        if not asks:
            raise DistilError(f"{spec.topics}: synthetic.topics: no topic left ({len(topics)} read, "
                              f"{len(topics) - len(usable)} named in a held-out prompt)")
        q_params = _params(recipe, questions=True)
        q_path = base / "questions.jsonl"
        if ctx.main:
            teacher.generate(asks, q_params, q_path, "questions written")
        ctx.wait()
        questions, q_report = filter_questions([clean_question(r["completion"]) for r in _read_jsonl(q_path)],
                                               spec, contamination)
        ctx.echo(f"synthetic: questions: {q_report.line()}")
        if not questions:
            raise DistilError(f"{q_path}: synthetic: every question the teacher wrote was filtered out "
                              f"({q_report.line()})")
        prompts, source = questions[:spec.max_prompts or None], spec.topics
        provenance.update({"topics": {"source": spec.topics, "read": len(topics),
                                      "named_in_held_out": len(topics) - len(usable), "used": len(usable)},
                           "templates": list(TEMPLATES[:spec.templates]), "questions": q_params.record(),
                           "question_filters": q_report.record()})

    if spec.task and spec.task_questions == "teacher":
        prompts, golds, q_prov = write_task_questions(ctx, teacher, get_task(spec.task), base)
        provenance.update(q_prov)

    # the answers
    out = base / "teacher.jsonl"
    if ctx.main:
        teacher.generate(prompts, answer_params, out, "teacher answers")
        if teacher.model is not None and hasattr(teacher.model, "close"):
            teacher.model.close()
    ctx.wait()
    samples = [{**r, "text": _prompt_text(r["prompt"])} for r in _read_jsonl(out)]
    count = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    kept, report = filter_answers(samples, spec, count, contamination, golds)
    ctx.echo(f"synthetic: answers: {report.line()}")
    if not kept:
        raise DistilError(f"{out}: synthetic: every sample was filtered out ({report.line()}); loosen the filters "
                          f"(synthetic.min_tokens, keep_truncated, max_repetition, near_dup_threshold, decontam_n) "
                          f"or raise synthetic.max_new_tokens")
    provenance.update({"prompts": {"source": source, "count": len(prompts), "malformed_lines_skipped": skipped},
                       "held_out_prompts": len(held), "filters": report.record(),
                       "near_dup": {"ngram": 3, "threshold": spec.near_dup_threshold,
                                    "method": "exact pairwise Jaccard" if len(samples) <= F.EXACT_LIMIT
                                    else "MinHash 128 permutations, seed 0, LSH bands of 4"},
                       "decontamination": {"ngram": spec.decontam_n, "references": len(references)}})
    if ctx.main:
        save_corpus(base, kept, provenance)
    ctx.wait()
    train, dropped = build_corpus_examples(kept, tok, recipe.data, str(base / "messages.jsonl"))
    if dropped:
        ctx.echo(f"synthetic: {dropped} kept sample(s) left no training target (data.seq_len={recipe.data.seq_len}, "
                 f"or a cut answer the render tokenizes differently)")
    if not train:
        raise DistilError(f"{base / 'messages.jsonl'}: synthetic: no training example: every kept answer is cut "
                          f"away by data.seq_len={recipe.data.seq_len}")
    held_eval = None
    if held_records:
        held_eval = teacher_examples(held, held_records, tok, recipe.data.seq_len, end) or None
    return {"train": train, "eval": held_eval}


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `synthetic`, at validation (before any model is loaded)."""
    spec = recipe.synthetic
    given = [k for k in ("prompts", "topics", "task") if getattr(spec, k)]
    if len(given) > 1:
        raise DistilError(f"{where}: synthetic.{given[1]}: one seed-prompt source per recipe; expected either "
                          f"synthetic.{given[0]} or synthetic.{given[1]}, found both")
    if spec.n > 1 and spec.temperature == 0:
        raise DistilError(f"{where}: synthetic.n: greedy answers (synthetic.temperature: 0) are all the same; "
                          f"expected n: 1 or a temperature > 0, found n: {spec.n}")
    if spec.topics and spec.questions_per_template > 1 and spec.question_temperature == 0:
        raise DistilError(f"{where}: synthetic.questions_per_template: greedy questions (question_temperature: 0) "
                          f"are all the same; expected 1 or a temperature > 0, found {spec.questions_per_template}")
    if spec.task_questions == "teacher" and not spec.task:
        raise DistilError(f"{where}: synthetic.task_questions: 'teacher' writes questions of a verifiable task; "
                          f"expected synthetic.task to name one, found none")
    if spec.task and spec.task_questions == "teacher" and spec.question_temperature == 0:
        raise DistilError(f"{where}: synthetic.question_temperature: greedy questions written from the start of "
                          f"sequence are all the same; expected a temperature > 0 (e.g. 1.0), found 0")
    if spec.max_tokens and spec.min_tokens > spec.max_tokens:
        raise DistilError(f"{where}: synthetic.min_tokens: expected <= synthetic.max_tokens ({spec.max_tokens}), "
                          f"found {spec.min_tokens}")
    for part in (p.strip() for p in spec.topics.split(",") if spec.topics):
        if part.startswith("builtin:") and part.split(":", 1)[1] not in TOPIC_SOURCES:
            raise DistilError(f"{where}: synthetic.topics: expected one of "
                              f"{', '.join('builtin:' + s for s in TOPIC_SOURCES)} or a .txt file, found {part!r}")


def stage(ctx: Context) -> Stage:
    loss_fn = teacher_text_loss(ctx, ctx.recipe.synthetic.token_kd)
    return Stage(phases=[Phase(name="synthetic", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=ctx.artifact["train"])], eval_examples=ctx.artifact["eval"])


def _tokenizers(recipe: Any) -> str:
    """without token_kd"""
    return "same" if recipe.synthetic.token_kd else "any"  # the teacher's text alone crosses tokenizers


METHOD = Method(
    name="synthetic",
    summary="synthetic-data distillation: the teacher writes a corpus from seed prompts or topics (self-instruct), "
            "filtered (duplicates, length, degenerate, repetition, verifier, decontamination) and learned",
    teacher=lambda recipe: "train" if recipe.synthetic.token_kd else "prepare",
    tokenizers=_tokenizers,
    prepare=prepare,
    build=stage,
    options=SyntheticSpec,
    check=check,
)
