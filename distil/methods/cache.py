"""Method `cache`: distil from the teacher's top-k log-probabilities stored on disk, with no teacher in memory
(DistillKit-style offline top-k logits). `distil cache RECIPE` builds the cache; `distil run` with
`distill.method: cache` builds or finishes it if needed (only then loading the teacher), checks that it was made
for this recipe's teacher, tokenizer, data, k and temperature, and trains with the sparse forward KL of
distil/sparse.py (`cache.tail`: tail_term or renorm). The on-disk format and its guarantees (atomic shards,
resumable builds, identity checks) are in methods/cache_store.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from distil.errors import DistilError
from distil.heads import choose_fused, final_hidden, head_weights, shift, stderr_note
from distil.losses import LossOutput
from distil.methods.cache_store import (  # noqa: F401 (re-exported: the cache's public API lives here too)
    MANIFEST,
    CacheInfo,
    TeacherCache,
    build,
    cache_identity,
    data_fingerprint,
    info,
    plan_shards,
    read_manifest,
    rows_per_example,
    teacher_fingerprint,
    tokenizer_fingerprint,
)
from distil.methods.cache_store import _mismatch
from distil.methods.contract import Context, Method, Phase, Stage, Trainable, unwrap
from distil.options import option
from distil.sparse import fused_sparse_kd_loss, sparse_kd_loss

LossFn = Callable[[Any, dict, float], LossOutput]


@dataclass
class CacheSpec:
    """Teacher-logit cache (method `cache`, `distil cache`): the teacher's top-k per target token, on disk."""

    dir: str = option("", "Cache directory; empty = <output.dir>/<name>-cache (beside the run directory, so that "
                      "`distil run --overwrite` keeps it). A cache made for another teacher, tokenizer, data, k or "
                      "temperature is refused, never reused.")
    k: int = option(64, "Teacher token ids and log-probabilities kept per target token (260 bytes/token at k=64 "
                    "with a vocabulary under 65,536).", gt=0)
    tail: Literal["renorm", "tail_term"] = option(
        "tail_term", "The teacher mass outside the top-k: renorm = renormalise the top-k into a distribution; "
        "tail_term = add the term (1-P_T) log((1-P_T)/(1-P_S)) over the rest of the vocabulary.")
    temperature: float = option(1.0, "Temperature of the stored log-probabilities. distill.temperature may differ "
                                "with tail: renorm (exact re-tempering of the renormalised top-k), not with "
                                "tail_term.", gt=0.0)
    shard_tokens: int = option(65536, "Target tokens per shard file (whole examples per shard); an interrupted "
                               "build resumes after the last complete shard.", gt=0)
    batch_size: int = option(8, "Examples per teacher forward while building.", gt=0)


def default_dir(recipe: Any) -> Path:
    """`cache.dir`, or `<output.dir>/<name>-cache`: beside the run directory, so `--overwrite` keeps it."""
    return Path(recipe.cache.dir) if recipe.cache.dir else Path(recipe.output.dir) / f"{recipe.name}-cache"


# ----------------------------------------------------------------------------------------------
# Recipe-level entry points


def _check_foreign(cdir: Path) -> None:
    """Refuse to write into a directory that holds things other than a cache (or into a file)."""
    if cdir.exists() and not cdir.is_dir():
        raise DistilError(f"{cdir}: cache.dir: expected a directory, found a file")
    if cdir.is_dir() and not (cdir / MANIFEST).exists():
        other = [p.name for p in cdir.iterdir() if not (p.name.startswith("shard-") or p.name.startswith(".tmp-"))]
        if other:
            raise DistilError(f"cache {cdir}: the directory exists and is not a distil teacher cache (found "
                              f"{', '.join(sorted(other)[:3])}); set cache.dir to a new or empty directory")


def ensure_cache(recipe: Any, examples: list[dict], tokenizer: Any, *, teacher: Any = None, device: Any = "cpu",
                 echo: Callable = print, main: bool = True, wait: Callable | None = None,
                 on_shard: Callable[[int], None] | None = None, verify: bool = False) -> TeacherCache:
    """Open the recipe's cache, building or finishing it first if needed (only then is the teacher loaded:
    `teacher` is a `Loaded`, or a function returning one, or None to load it from the recipe). A cache made for
    another teacher/tokenizer/data/k/T is refused."""
    cdir = default_dir(recipe)
    identity = cache_identity(recipe, examples, tokenizer)
    vocab = identity["tokenizer"]["vocab_size"]
    if recipe.cache.k > vocab:
        raise DistilError(f"cache.k: expected at most the vocabulary size ({vocab}), found {recipe.cache.k}")
    if main:
        manifest = read_manifest(cdir)
        if manifest is not None:
            problem = _mismatch(cdir, manifest, identity)
            if problem:
                raise DistilError(problem)
        else:
            _check_foreign(cdir)
        if manifest is None or not manifest.get("complete"):
            loaded = teacher() if callable(teacher) else teacher
            if loaded is None:
                from distil.models import load_teacher

                loaded = load_teacher(recipe, device)
            tv = loaded.tokenizer
            if tv is not tokenizer and tv.get_vocab() != tokenizer.get_vocab():
                raise DistilError(f"cache: the teacher's tokenizer ({len(tv)} tokens) differs from the data's "
                                  f"({len(tokenizer)} tokens); logit caching needs one vocabulary")
            rows_out = loaded.model.get_output_embeddings().weight.shape[0]
            if rows_out < vocab:
                raise DistilError(f"cache: the teacher has {rows_out} output rows but the tokenizer has {vocab} tokens")
            from distil.data import pad_id

            build(cdir, examples, loaded.model, identity=identity, shard_tokens=recipe.cache.shard_tokens,
                  batch_size=recipe.cache.batch_size, pad_id=pad_id(tokenizer), device=device, echo=echo,
                  on_shard=on_shard)
            del loaded
    if wait is not None:
        wait()
    return TeacherCache(cdir, tail_mode=recipe.cache.tail, expect=identity, verify=verify)


def _own_tokenizer(spec: Any) -> Any | None:
    """The tokenizer a model spec brings by itself, loaded without its weights; None when it has none."""
    from distil.models import _has_tokenizer, embedded_path, load_tokenizer

    if spec.tokenizer:
        return load_tokenizer(spec.tokenizer, spec.trust_remote_code)
    src = spec.source
    if src.startswith("embedded:"):
        return load_tokenizer(embedded_path(src.split(":", 1)[1]))
    if src.startswith("config:"):
        ref = Path(src.split(":", 1)[1])
        folder = ref if ref.is_dir() else ref.parent
        return load_tokenizer(folder, spec.trust_remote_code) if src != "config:teacher" and _has_tokenizer(folder) \
            else None
    if src.endswith(".gguf"):
        from transformers import AutoTokenizer

        path = Path(src)
        try:
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except Exception:
            return None  # load_model reports the problem with the file
    return load_tokenizer(src, spec.trust_remote_code) if _has_tokenizer(Path(src)) else None


def data_tokenizer(recipe: Any) -> Any:
    """The tokenizer `distil run` tokenizes the data with (the student's, which is the teacher's when the student
    comes from it or has none of its own), loaded without model weights whenever the files allow."""
    tok = None if recipe.student.source == "teacher" else _own_tokenizer(recipe.student)
    if tok is None:
        tok = _own_tokenizer(recipe.teacher)
    if tok is None:
        from distil.models import load_teacher

        tok = load_teacher(recipe).tokenizer
    return tok


def cache_for_recipe(recipe: Any, *, echo: Callable = print, on_shard: Callable[[int], None] | None = None,
                     verify: bool = True) -> TeacherCache:
    """`distil cache RECIPE`: tokenize the recipe's training data and build (or finish, or verify) its cache."""
    from distil.data import load_examples

    tok = data_tokenizer(recipe)
    train_ex, _ = load_examples(recipe.data, tok, recipe.seed)
    return ensure_cache(recipe, train_ex, tok, echo=echo, on_shard=on_shard, verify=verify)


def with_index(examples: list[dict]) -> list[dict]:
    """Examples tagged with their position in the cache (`collate` turns the tags into batch['index'])."""
    return [{**e, "index": i} for i, e in enumerate(examples)]


# ----------------------------------------------------------------------------------------------
# The method


def _shifted_logits(student: Any, batch: dict, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`shift(student(...).logits, labels)`, but with the head applied to positions 0..S-2 only when the model
    supports `logits_to_keep` (most HF causal LMs): the logits come out contiguous, so the loss walks them as
    plain row slices instead of gathering rows out of a strided [:, :-1] view (~0.25 s a step at V = 49k)."""
    n = batch["input_ids"].shape[1]
    keep = torch.arange(max(n - 1, 0), device=batch["input_ids"].device)
    try:
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         logits_to_keep=keep).logits
    except TypeError:
        logits = None
    if logits is None or logits.shape[1] != n - 1:  # the model does not know logits_to_keep
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return shift(logits, batch["labels"], vocab)
    return (logits if logits.shape[-1] == vocab else logits[..., :vocab]), batch["labels"][:, 1:]


def build_cache(cache: TeacherCache, spec: Any, vocab: int, echo: Callable[[str], None] = stderr_note) -> LossFn:
    """The loss function of method `cache`: forward KL from the cached top-k (distil/sparse.py); no teacher in
    memory. `spec` is the recipe's `distill` section. With `spec.fused`, the student's [tokens x V] logits never
    exist when its head reproduces its logits (checked once, on the first batch; else one note and full logits)."""
    if not isinstance(cache, TeacherCache):
        raise DistilError("method 'cache': expected an opened teacher cache (see distil.methods.cache.ensure_cache)")
    if cache.vocab_size != vocab:
        raise DistilError(f"cache {cache.dir}: made for a {cache.vocab_size}-token vocabulary, the student's "
                          f"tokenizer has {vocab}")
    fused = {"ok": None}

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        if "index" not in batch:
            raise DistilError("method 'cache': the batch has no 'index' (tag the examples with with_index())")
        ids, lp, tail = cache.rows(batch["index"].tolist())
        labels = batch["labels"][:, 1:]
        n_valid = int((labels != -100).sum())
        if n_valid != ids.shape[0]:
            raise DistilError(f"cache {cache.dir}: the batch has {n_valid} target tokens but the cache has "
                              f"{ids.shape[0]} rows for its examples (the data changed since the cache was made)")
        kw = dict(tail=cache.tail_mode, temperature=spec.temperature, cache_temperature=cache.temperature,
                  alpha=spec.alpha, num_items=num_items, chunk_size=spec.chunk_size)
        if fused["ok"] is None:
            fused["ok"] = choose_fused(spec.fused, batch, {"student": unwrap(student)}, echo)
        if fused["ok"]:
            # the student's [tokens x V] logits never exist: its last hidden states go through the head chunk by
            # chunk inside the loss (distil/fused.py), with the same sparse per-chunk math
            weight, bias = head_weights(unwrap(student), vocab)
            h = final_hidden(student, batch)[:, :-1]
            return fused_sparse_kd_loss(h, weight, ids, lp, tail, labels, lm_head_bias=bias, **kw)
        s, labels = _shifted_logits(student, batch, vocab)
        return sparse_kd_loss(s, ids, lp, tail, labels, **kw)

    return loss_fn


def check(recipe: Any, where: str) -> None:
    """Cross-key checks of method `cache` (run by `distil validate` and every verb that reads a recipe)."""
    if recipe.distill.loss != "forward_kl":
        raise DistilError(f"{where}: distill.loss: method 'cache' trains with the sparse forward KL over the cached "
                          f"top-k; expected 'forward_kl', found {recipe.distill.loss!r}")
    if recipe.cache.tail == "tail_term" and recipe.distill.temperature != recipe.cache.temperature:
        raise DistilError(f"{where}: cache.temperature: tail 'tail_term' needs the cached log-probs at the training "
                          f"temperature (distill.temperature={recipe.distill.temperature:g}), found "
                          f"{recipe.cache.temperature:g}; set them equal, or use cache.tail: renorm (re-tempered "
                          f"exactly)")


def prepare(ctx: Context) -> TeacherCache:
    """Open the cache, building or finishing it first (the teacher is loaded only then)."""
    return ensure_cache(ctx.recipe, ctx.train_examples, ctx.student.tokenizer, teacher=ctx.teacher,
                        device=ctx.device, echo=ctx.echo, main=ctx.main, wait=ctx.wait)


def stage(ctx: Context) -> Stage:
    loss_fn = build_cache(ctx.artifact, ctx.recipe.distill, ctx.vocab, echo=ctx.echo)
    return Stage(phases=[Phase(name="cache", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=with_index(ctx.train_examples))])


METHOD = Method(
    name="cache",
    summary="the teacher's top-k log-probabilities, computed once and stored on disk, are the soft targets; "
            "no teacher in memory while training (forward_kl only)",
    teacher="prepare",
    prepare=prepare,
    build=stage,
    options=CacheSpec,
    check=check,
)
