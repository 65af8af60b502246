"""On-policy distillation, GKD and the sampled-token estimator: the student learns on text it writes itself.

Off-policy distillation (method `offline`) trains the student on text it would never write, so at inference it
drifts into states it never learned to recover from (exposure bias). Here the data of a step comes from one of
three sources, drawn once per optimizer step (GKD, Agarwal et al. 2024):

    with probability lmbda      the STUDENT samples a completion for every prompt of the step (on-policy)
    otherwise, if seq_kd        the TEACHER samples them (sequence-level KD on fresh teacher samples)
    otherwise                   the dataset's own responses are used (exactly method `offline`)

and the teacher scores every token of the completion. Prompt tokens and anything after the first EOS are masked
(they are not targets), a completion that reaches `max_new_tokens` without an EOS is kept, truncated there, and
counted (`truncated` in metrics.jsonl). The loss is summed over the valid completion tokens and divided by their
count over the GLOBAL batch (all accumulation micro-batches, all processes: the loop's count hook runs after this
method's `before_step`), so it does not depend on how a step is split.

Losses (`onpolicy.loss`):
  - any divergence of distil/losses.py on the full next-token distributions at every completion position,
    at the LOSS temperature `onpolicy.loss_temperature` (both models, times T^2 as everywhere). GKD's JSD(beta) is
    `jsd` with `beta` in TRL's convention: beta=0 is forward KL(p_T||p_S), beta=1 is reverse KL(p_S||p_T). This is
    the same loss function as method `offline` (its `build_offline`), only the data differs: lmbda=0 without
    seq_kd reproduces `offline` exactly.
  - `sampled_reverse_kl`: the sampled-token estimator of the reverse KL. For the sampled token x_t,
        a_t = -(log p_S(x_t) - log p_T(x_t))                       (detached; a one-sample KL estimate per token)
        A_t = a_t + discount * A_{t+1}                              (discount 0: the token's own term only)
        r_t = exp(log p_S(x_t) - log q(x_t))                        (q: the sampling policy, recorded at sampling)
        loss = -sum_t min(r_t A_t, clip(r_t, 1 - clip, 1 + clip) A_t) / num_items        (PPO-style clip)
    On fresh samples from p_S itself (sampling temperature 1, no top-p/top-k) r_t = 1 and the gradient is the
    REINFORCE form -sum_t A_t grad log p_S(x_t) / num_items, whose expectation is the gradient of KL(p_S||p_T) per
    token (tests/test_onpolicy.py checks both). The ratio corrects for a sampling policy q != p_S (another sampling
    temperature, top-p/top-k, or stale samples); it needs only the teacher's log-prob of each sampled token.

Across tokenizers (`sampled_reverse_kl` only: it needs the teacher's log-prob of each sampled token, not its
distribution over the student's vocabulary) the teacher scores the student's text by re-tokenizing it. Each row
(prompt + the student's completion) is decoded (special tokens dropped), the teacher's tokenizer encodes that text
with its own BOS, and the two tokenizations are aligned by character offsets (distil/alignment.py: groups of student
and teacher tokens covering the same characters). The approximation: log p_T of a group's characters is the sum of
the teacher's log-probs of its own tokens of them (its canonical tokenization only, not every tokenization of those
characters), and a group of k student tokens shares the group's log-ratio evenly,
    log p_T(x_t) := log p_S(x_t) + (log p_T(group) - log p_S(group)) / k,
so the advantages of a group's tokens sum to its exact log-ratio; a one-token group (most, for two English
tokenizers) is exact. The student's EOS is scored as the teacher's probability of stopping at the end of the text
(its EOS ids together); any other token without text (a chat marker) or after the last common cut gets advantage 0.

Generation: in `before_step`, all micro-batches of one optimizer step are generated in ONE batch (a generation
buffer spanning the accumulation steps) by `model.generate` with the KV cache, through the transformers backend's
per-row sampler (distil/generation/hf.py: `RowSampler`, each row's own seed): a row's sample depends on its seed
(onpolicy.seed, its position in the global example stream) and on the weights only, never on its batch-mates, so
a resumed run regenerates exactly the samples of the uninterrupted one. `distil.generate.generate` itself is not
called: it returns decoded text (token ids do not survive a decode/encode round trip in general), fingerprints
the weights on every call and writes a corpus; a step needs ids, sampling log-probs and nothing stored.

Student samples can also come from llama.cpp (`student_backend: llamacpp`): the student exported to a GGUF snapshot
every `snapshot_every` steps (distil/generation/snapshot.py; distil's own per-row sampler on llama.cpp's logits, so an
F32 snapshot samples what transformers samples from the same weights); samples are then up to snapshot_every - 1
steps stale (`snapshot_age` in metrics.jsonl), which the divergences do not mind (they score the sampled text with
the current student) and the estimator's importance ratio corrects (log q is the snapshot's).

metrics.jsonl columns of every onpolicy run: length (mean completion tokens per sequence), truncated (fraction cut
at max_new_tokens), student_samples (1 on on-policy steps), generate_s (seconds spent sampling in the step: what
generation costs next to the teacher's scoring and the update), plus the loss's own (kd/ce, or kl, entropy, ratio,
clipped for the estimator).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F

from distil.compat import check_teacher_data
from distil.data import IGNORE
from distil.errors import DistilError
from distil.eval.answers import prompt_part
from distil.heads import shift
from distil.losses import DIVERGENCES, LossOutput, denominator
from distil.methods.contract import Context, Method, Phase, Stage, Trainable, unwrap
from distil.methods.offline import build_offline
from distil.options import option

ESTIMATOR = "sampled_reverse_kl"
LossKind = Literal[(*DIVERGENCES, ESTIMATOR)]  # type: ignore[valid-type]
WARN_TRUNCATED = 0.5  # warn once when at least this fraction of a step's student samples never ended


@dataclass
class OnPolicySpec:
    """On-policy distillation / GKD: the student (or the teacher) writes the completions, the teacher scores them."""

    lmbda: float = option(0.5, "Probability that a step's completions are sampled by the student (on-policy); "
                          "drawn once per optimizer step from onpolicy.seed. 0 = never (seq_kd or the dataset's "
                          "responses), 1 = always. GKD's default 0.5.", ge=0.0, le=1.0)
    seq_kd: bool = option(False, "When a step is not on-policy: the teacher samples the completions (true) or the "
                          "dataset's responses are used (false: exactly method offline).")
    loss: LossKind = option("jsd", "Divergence at every completion position (forward_kl, reverse_kl, jsd, tvd, "
                            "skew_forward_kl, skew_reverse_kl: as distill.loss), or sampled_reverse_kl: the "
                            "sampled-token estimator (policy gradient on the student's own tokens; needs lmbda 1).")
    beta: float = option(0.5, "JSD weight, TRL's convention: M = (1-beta) p_S + beta p_T; 0 = forward KL, "
                         "1 = reverse KL. GKD's default 0.5.", ge=0.0, le=1.0)
    loss_temperature: float = option(1.0, "Temperature of the LOSS: both models' logits are divided by it and the "
                                     "term is scaled by T^2. Unrelated to sampling (sample_temperature).", gt=0.0)
    sample_temperature: float = option(1.0, "Temperature the completions are SAMPLED at (student and teacher); "
                                       "0 = greedy. Unrelated to the loss (loss_temperature).", ge=0.0)
    sample_top_p: float = option(1.0, "Nucleus sampling of the completions (1 = off).", gt=0.0, le=1.0)
    sample_top_k: int = option(0, "Top-k sampling of the completions (0 = off).", ge=0)
    max_new_tokens: int = option(64, "Longest completion, in tokens; one that reaches it without an EOS is "
                                 "truncated there, kept and counted (truncated in metrics.jsonl).", gt=0)
    clip: float = option(0.2, "sampled_reverse_kl: the importance ratio is clipped to [1 - clip, 1 + clip] "
                         "(PPO-style).", gt=0.0, lt=1.0)
    discount: float = option(0.0, "sampled_reverse_kl: a token's advantage adds the discounted advantages of the "
                             "tokens after it (0 = its own only).", ge=0.0, le=1.0)
    seed: int = option(0, "Seed of the per-step lmbda draw and of every sample (per row: see before_step).", ge=0,
                       lt=2**32)
    student_backend: Literal["hf", "llamacpp"] = option(
        "hf", "Who runs the STUDENT's sampling: transformers, or llama.cpp on a GGUF snapshot of the student "
        "re-exported every snapshot_every steps (faster on CPU; samples up to snapshot_every-1 steps stale, "
        "snapshot_age in metrics.jsonl; distil's own sampler, so the F32 snapshot samples what transformers would).")
    snapshot_every: int = option(8, "student_backend llamacpp: export the student to GGUF every this many steps.",
                                 ge=1)
    snapshot_quant: Literal["F32", "F16"] = option("F32", "student_backend llamacpp: the snapshot's precision.")


# ----------------------------------------------------------------------------------------------------------------
# Sampling: ids and their sampling log-probs, one batch per step


@dataclass
class Samples:
    completions: list[list[int]]  # each row's tokens up to and including its first EOS (or max_new_tokens of them)
    logq: list[list[float]]  # log q(x_t) of each of those tokens under the sampling policy (0 when greedy)
    truncated: list[bool]  # reached max_new_tokens without an EOS


class _Recorder:
    """Logits processor: the transformers backend's per-row sampler, plus each chosen token's log-probability under
    the sampling distribution (temperature, top-k, top-p applied), recorded step by step."""

    def __init__(self, params: Any, seeds: list[int]):
        from distil.generation.hf import RowSampler

        self.params = params
        self.sampler = None if params.greedy else RowSampler(params, seeds)
        self.logq: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        from distil.generation.hf import filter_logits

        if self.sampler is None:  # greedy: a deterministic policy, log q = 0 for the token it picks
            self.logq.append(torch.zeros(scores.shape[0]))
            return scores
        out = self.sampler(input_ids, scores)
        chosen = out.argmax(-1)  # the one finite entry of each row
        logq = filter_logits(scores, self.params).log_softmax(-1).gather(-1, chosen[:, None])[:, 0]
        self.logq.append(logq.double().cpu())
        return out


def sample(model: Any, prompts: list[list[int]], params: Any, seeds: list[int], eos: list[int],
           pad_id: int) -> Samples:
    """One left-padded batch through `model.generate` (KV cache), each row sampled from its own seed."""
    from transformers import GenerationConfig, LogitsProcessorList

    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=eos or None, pad_token_id=pad_id, use_cache=True)
    recorder = _Recorder(params, seeds)
    saved, was_training = model.generation_config, model.training
    model.generation_config = GenerationConfig()  # only what GenParams says changes the samples (as hf.py does)
    model.eval()  # no dropout while sampling
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                                 logits_processor=LogitsProcessorList([recorder]))
    finally:
        model.generation_config = saved
        model.train(was_training)
    logq = torch.stack(recorder.logq, 1).tolist() if recorder.logq else [[] for _ in prompts]
    completions, logqs, truncated = [], [], []
    for row, lq in zip(out[:, width:].cpu().tolist(), logq):
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        n = len(row) if cut is None else cut + 1  # the EOS is a target: the student learns where to stop
        completions.append(row[:n])
        logqs.append(lq[:n])
        truncated.append(cut is None)
    return Samples(completions, logqs, truncated)


def _uniform(seed: int, step: int) -> float:
    """The per-step draw of lmbda: a function of (seed, step) only, the same on every process and after resume."""
    return float(np.random.default_rng(np.random.SeedSequence([seed, 0x6C6D6264, step])).random())


def _row_seed(seed: int, position: int) -> int:
    """A row's sampling seed from its position in the global example stream (hence independent of how the step is
    split into micro-batches and processes)."""
    return int(np.random.SeedSequence([seed, 0x73616D70, position]).generate_state(1, np.uint32)[0])


def _world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _prompts_of(batch: dict) -> list[list[int]]:
    """The prompt part of every row of a collated (right-padded) batch: its tokens before the first target."""
    out = []
    for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                 batch["attention_mask"].tolist()):
        n = sum(mask)
        out.append(prompt_part({"input_ids": ids[:n], "labels": labels[:n]}))
    return out


def completion_batch(prompts: list[list[int]], samples: Samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + completion rows, right-padded; labels (and the sampling log-probs `logq`) on the completion only."""
    rows = [p + c for p, c in zip(prompts, samples.completions)]
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    logq = torch.zeros((len(rows), n), dtype=torch.float64)
    for i, (p, c, lq) in enumerate(zip(prompts, samples.completions, samples.logq)):
        k = len(p) + len(c)
        ids[i, :k] = torch.tensor(p + c)
        labels[i, len(p):k] = torch.tensor(c, dtype=torch.long)
        logq[i, len(p):k] = torch.tensor(lq, dtype=torch.float64)
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "logq": logq,
            "completion_tokens": torch.tensor([float(len(c)) for c in samples.completions]),
            "truncated": torch.tensor([float(t) for t in samples.truncated])}


def _with_stats(batch: dict, source: float, n_global: int, seconds: float = 0.0) -> dict:
    """Per-row statistics every loss call turns into metrics (the same names on every step and process);
    `seconds` (generation time / process count, on a step's first micro-batch only) sums to the mean over ranks."""
    out = dict(batch)
    if "completion_tokens" not in out:  # the dataset's responses: their target tokens, never truncated
        targets = (batch["labels"] != IGNORE).sum(-1).double()
        out["completion_tokens"] = targets
        out["truncated"] = torch.zeros_like(targets)
    device = batch["input_ids"].device
    out["completion_tokens"] = out["completion_tokens"].to(device)
    out["truncated"] = out["truncated"].to(device)
    out["seqs"] = torch.tensor(float(n_global), device=device)  # sequences of the global batch
    out["student_samples"] = torch.tensor(float(source), device=device)
    out["generate_s"] = torch.tensor(float(seconds), device=device)
    return out


def make_before_step(spec: OnPolicySpec, teacher: Any, eos: list[int], pad_id: int,
                     echo: Callable[[str], None], main: bool = True, snapshot: Any = None,
                     wait: Callable[[], None] | None = None) -> Callable[[Any, list[dict], int], list[dict]]:
    """The phase's per-step hook: draw the step's source, generate every micro-batch's completions in one batch
    (the student's through `snapshot`, a generation.snapshot.GGUFSnapshot, when one is given)."""
    from distil.generation.params import GenParams

    params = GenParams(max_new_tokens=spec.max_new_tokens, temperature=spec.sample_temperature,
                       top_p=spec.sample_top_p, top_k=spec.sample_top_k).check()
    warned = {"done": False}

    def before_step(module: Any, batches: list[dict], step: int) -> list[dict]:
        rank, world = _world()
        sizes = [len(b["input_ids"]) for b in batches]
        n_global = sum(sizes) * world
        on_policy = _uniform(spec.seed, step) < spec.lmbda
        if not on_policy and not spec.seq_kd:
            out = [_with_stats(b, 0.0, n_global) for b in batches]
            if snapshot is not None:  # every step logs the same metric names
                for b in out:
                    b["snapshot_age"] = torch.zeros((), device=b["input_ids"].device)
            return out
        model = unwrap(module) if on_policy else teacher
        prompts, seeds = [], []
        for m, b in enumerate(batches):
            prompts += _prompts_of(b)
            # the row's position in the global stream: micro-batch (step * accum + m) of `world` shares of B rows
            seeds += [_row_seed(spec.seed, ((step * len(batches) + m) * world + rank) * sizes[m] + i)
                      for i in range(sizes[m])]
        if any(not p for p in prompts):
            raise DistilError("onpolicy: a training example has no prompt (text records): expected prompt/response "
                              "or messages records, whose prompts the student answers")
        start = time.perf_counter()
        age = 0.0
        if on_policy and snapshot is not None:  # llama.cpp on the block's GGUF snapshot of the student
            age = float(step - snapshot.ensure(model, step, main=main, wait=wait))
            samples = Samples(*snapshot.sample(prompts, params, seeds, eos))
        else:
            samples = sample(model, prompts, params, seeds, eos, pad_id)
        seconds = (time.perf_counter() - start) / world
        cut = sum(samples.truncated) / len(prompts)
        if on_policy and cut >= WARN_TRUNCATED and not warned["done"] and main:
            warned["done"] = True
            echo(f"onpolicy: step {step + 1}: {cut:.0%} of the student's completions reached onpolicy.max_new_tokens="
                 f"{spec.max_new_tokens} without an EOS; they are truncated there, masked after and counted "
                 f"(metrics.jsonl: truncated). Warned once.")
        out, at = [], 0
        device = batches[0]["input_ids"].device
        for n in sizes:
            part = Samples(samples.completions[at:at + n], samples.logq[at:at + n], samples.truncated[at:at + n])
            b = {k: v.to(device) for k, v in completion_batch(prompts[at:at + n], part, pad_id).items()}
            b = _with_stats(b, 1.0 if on_policy else 0.0, n_global, seconds if at == 0 else 0.0)
            if snapshot is not None:  # steps since the snapshot the samples came from (0 when not on-policy)
                b["snapshot_age"] = torch.tensor(age / world if at == 0 else 0.0, device=device)
            out.append(b)
            at += n
        return out

    return before_step


# ----------------------------------------------------------------------------------------------------------------
# Losses


def _discounted(a: torch.Tensor, valid: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = a_t + gamma * A_{t+1} along each row, over valid positions only ([B, S])."""
    if gamma == 0:
        return a
    out = torch.zeros_like(a)
    running = torch.zeros_like(a[:, 0])
    for t in range(a.shape[1] - 1, -1, -1):
        running = torch.where(valid[:, t], a[:, t] + gamma * running, torch.zeros_like(running))
        out[:, t] = running
    return out


def sampled_reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                       logq: torch.Tensor, *, clip: float = 0.2, discount: float = 0.0,
                       num_items: float | None = None, teacher_logp: torch.Tensor | None = None) -> LossOutput:
    """The sampled-token estimator of KL(p_S || p_T) (module docstring), aligned logits [B, S, V], labels [B, S]
    (the sampled tokens; -100 masked), logq [B, S] (their log-probs under the sampling policy).

    Metrics (each a sum over tokens / num_items): kl (the mean of log p_S(x) - log p_T(x), an unbiased per-token
    reverse-KL estimate on fresh samples), entropy (of p_S, full vocabulary), ratio (mean importance ratio) and
    clipped (the fraction of tokens whose ratio left [1 - clip, 1 + clip]). `teacher_logp` [B, S] instead of
    teacher_logits: the teacher's log-prob of each sampled token, computed elsewhere (across tokenizers)."""
    valid = labels != IGNORE
    n = int(valid.sum())
    denom = denominator(num_items, n)
    y = labels[valid]
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 at least (bf16 logits are upcast)
    ls = F.log_softmax(student_logits[valid].to(dtype), dim=-1)  # [n, V]
    lp_s = ls.gather(-1, y[:, None])[:, 0]
    with torch.no_grad():
        if teacher_logp is not None:
            lp_t = teacher_logp[valid].to(dtype)
        else:
            lp_t = F.log_softmax(teacher_logits[valid].to(dtype), dim=-1).gather(-1, y[:, None])[:, 0]
        log_ratio = lp_s.detach() - lp_t  # log p_S(x) - log p_T(x)
        a = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
        a[valid] = -log_ratio
        adv = _discounted(a, valid, discount)[valid]
        entropy = -(ls.exp() * ls).sum(-1)
    ratio = torch.exp(lp_s - logq[valid].to(lp_s.dtype))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
    loss = -surrogate.sum() / denom
    with torch.no_grad():
        metrics = {"kl": log_ratio.sum() / denom, "entropy": entropy.sum() / denom,
                   "ratio": ratio.detach().sum() / denom,
                   "clipped": ((ratio.detach() - 1).abs() > clip).float().sum() / denom}
    return LossOutput(loss=loss, metrics=metrics, n_tokens=n)


def cross_teacher_logp(batch: dict, student_lp: torch.Tensor, student_tok: Any, teacher: Any, teacher_tok: Any,
                       teacher_stops: list[int]) -> torch.Tensor:
    """log p_T of every sampled student token [B, S-1] (shifted like the labels), the student's text re-tokenized
    by the teacher (module docstring: groups aligned by characters, a group's log-ratio shared evenly by its
    student tokens, the EOS as the teacher's stop probability). `student_lp`: the student's own log-probs of the
    same tokens (detached); entries the teacher cannot score keep them (advantage 0)."""
    from distil.alignment import ZERO, align, decoded_ends, offset_ends
    from distil.methods.crosstok import teacher_logits_at, teacher_tokens

    out = student_lp.detach().clone()
    labels = batch["labels"]
    lengths = batch["attention_mask"].sum(-1).tolist()
    limit = getattr(teacher.config, "max_position_embeddings", None)
    rows_ids, plans = [], []
    for r, n in enumerate(lengths):
        ids, lab = batch["input_ids"][r, :n].tolist(), labels[r, :n].tolist()
        text, s_ends = decoded_ends(student_tok, ids)
        t_ids, offsets = teacher_tokens(text, teacher_tok, limit)
        rows_ids.append(t_ids)
        groups = [g for g in align(s_ends, offset_ends(offsets)) if g.b[0] >= 1
                  and any(lab[p] != IGNORE for p in range(*g.a))]
        stop = [p for p in range(1, n) if lab[p] != IGNORE and s_ends[p] == ZERO and p == n - 1]
        plans.append((groups, stop, lab))
    width = max(1, max(map(len, rows_ids)))
    pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    t_ids = torch.full((len(rows_ids), width), pad, dtype=torch.long)
    t_mask = torch.zeros_like(t_ids)
    for r, ids in enumerate(rows_ids):
        t_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        t_mask[r, :len(ids)] = 1
    rows, pos = [], []  # teacher positions whose next-token log-probs are needed
    for r, (groups, stop, _) in enumerate(plans):
        for g in groups:
            for j in range(*g.b):
                rows.append(r), pos.append(j - 1)
        if stop:
            rows.append(r), pos.append(len(rows_ids[r]) - 1)
    if not rows:
        return out
    z = teacher_logits_at(teacher, t_ids, t_mask, torch.tensor(rows), torch.tensor(pos), len(teacher_tok))
    logp = F.log_softmax(z.double(), -1)
    at = {(r, p): i for i, (r, p) in enumerate(zip(rows, pos))}
    for r, (groups, stop, lab) in enumerate(plans):
        for g in groups:
            lp_t = sum(float(logp[at[(r, j - 1)], rows_ids[r][j]]) for j in range(*g.b))
            targets = [p for p in range(*g.a) if lab[p] != IGNORE and p >= 1]
            if not targets:
                continue
            lp_s = sum(float(out[r, p - 1]) for p in targets)
            share = (lp_t - lp_s) / len(targets)  # the group's log-ratio, shared evenly by its tokens
            for p in targets:
                out[r, p - 1] = out[r, p - 1] + share
        for p in stop:  # the student's EOS: the teacher's probability of stopping here (any of its stop ids)
            i = at[(r, len(rows_ids[r]) - 1)]
            out[r, p - 1] = float(torch.logsumexp(logp[i, teacher_stops], 0)) if teacher_stops else out[r, p - 1]
    return out


def build_onpolicy_loss(teacher: Any, spec: OnPolicySpec, distill: Any, vocab: int,
                        echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                        across: tuple[Any, Any] | None = None) -> Callable:
    """The phase's loss: `offline`'s loss function (any divergence) or the sampled-token estimator, plus the
    sequence metrics (length, truncated, student_samples) of the rows. `across` = (student tokenizer, teacher
    tokenizer) when they differ: the estimator's teacher log-probs come from re-tokenizing (module docstring)."""
    if spec.loss == ESTIMATOR and across is not None:
        from distil.compat import stop_ids

        student_tok, teacher_tok = across
        stops = [i for i in stop_ids(teacher_tok, teacher) if i < len(teacher_tok)]

        def core(student: Any, batch: dict, num_items: float) -> LossOutput:
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, labels = shift(s_logits, batch["labels"], vocab)
            with torch.no_grad():
                lp_s = F.log_softmax(s.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
            lp_t = cross_teacher_logp(batch, lp_s, student_tok, teacher, teacher_tok, stops)
            return sampled_reverse_kl(s, None, labels, batch["logq"][:, 1:], clip=spec.clip, discount=spec.discount,
                                      num_items=num_items, teacher_logp=lp_t)
    elif spec.loss == ESTIMATOR:
        def core(student: Any, batch: dict, num_items: float) -> LossOutput:
            with torch.no_grad():
                t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            s, labels = shift(s_logits, batch["labels"], vocab)
            t, _ = shift(t_logits, batch["labels"], vocab)
            return sampled_reverse_kl(s, t, labels, batch["logq"][:, 1:], clip=spec.clip, discount=spec.discount,
                                      num_items=num_items)
    else:
        # the distill section's machinery (fused heads, chunk size) with this section's divergence; no hard labels
        core = build_offline(teacher, dataclasses.replace(distill, loss=spec.loss, beta=spec.beta,
                                                          temperature=spec.loss_temperature, alpha=1.0),
                             vocab, echo=echo)

    def loss_fn(student: Any, batch: dict, num_items: float) -> LossOutput:
        out = core(student, batch, num_items)
        seqs = batch["seqs"]
        rows = float(len(batch["input_ids"]))
        out.metrics.update({"length": batch["completion_tokens"].sum().float() / seqs,
                            "truncated": batch["truncated"].sum().float() / seqs,
                            "student_samples": batch["student_samples"] * rows / seqs,
                            "generate_s": batch["generate_s"]})  # seconds spent sampling this step
        if "snapshot_age" in batch:  # student_backend llamacpp: steps since the GGUF snapshot that sampled
            out.metrics["snapshot_age"] = batch["snapshot_age"]
        return out

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The method


def _generates(spec: OnPolicySpec) -> bool:
    return spec.lmbda > 0 or spec.seq_kd


def prepare(ctx: Context) -> list[int] | None:
    """Checks before anything is written: prompts to answer, the compatibility pre-flight (one vocabulary, a chat
    format the student has, a student that stops where its answers end), prompt + max_new_tokens within context.
    Returns the EOS ids completions end at (None when no step ever generates: then this is method offline)."""
    from distil.generation.hf import eos_ids

    spec = ctx.recipe.onpolicy
    if not _generates(spec):
        return None
    bos = ctx.student.tokenizer.bos_token_id
    prompts = [prompt_part(e, bos) for e in ctx.train_examples]
    if not prompts or not all(prompts):
        raise DistilError(f"data.source: method 'onpolicy' needs prompts (prompt/response or messages records: the "
                          f"student answers the prompts), found {ctx.recipe.data.source} with "
                          f"{sum(map(bool, prompts))} of {len(prompts)} examples having one")
    # one vocabulary: the teacher scores the student's own ids (one BOS convention); across tokenizers it scores the
    # student's text re-tokenized (the estimator only: the method's `tokenizers`)
    shared = ctx.teacher().tokenizer.get_vocab() == ctx.student.tokenizer.get_vocab()
    check_teacher_data(ctx.teacher().tokenizer, ctx.student.tokenizer, student_model=ctx.student.model,
                       chat=ctx.recipe.data.chat_template, where="onpolicy", ids_cross=shared)
    longest = max(map(len, prompts))
    for role, model in (("student", ctx.student.model), ("teacher", ctx.teacher().model)):
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and longest + spec.max_new_tokens > limit:
            raise DistilError(f"onpolicy.max_new_tokens: the longest prompt ({longest} tokens) + {spec.max_new_tokens} "
                              f"exceed the {role}'s context of {limit} positions; expected at most "
                              f"{limit - longest}")
    return eos_ids(ctx.student.model, ctx.student.tokenizer)


def check(recipe: Any, where: str) -> None:
    """Cross-key checks, at validation (before any model is loaded)."""
    spec = recipe.onpolicy
    if spec.student_backend == "llamacpp" and spec.lmbda > 0:
        from distil.generation.llamacpp import INSTALL, available

        if not available():  # refused before anything is loaded or written, not at the first on-policy step
            raise DistilError(f"{where}: onpolicy.student_backend: llamacpp: {INSTALL}")
    if spec.loss == ESTIMATOR:
        if spec.lmbda != 1:
            raise DistilError(f"{where}: onpolicy.lmbda: the sampled_reverse_kl estimator learns from the student's "
                              f"own samples (their sampling log-probs); expected lmbda: 1, found {spec.lmbda}")
        if spec.sample_temperature == 0:
            raise DistilError(f"{where}: onpolicy.sample_temperature: the sampled_reverse_kl estimator needs "
                              f"sampled completions (a policy gradient); expected a temperature > 0, found 0")
        if spec.loss_temperature != 1:
            raise DistilError(f"{where}: onpolicy.loss_temperature: the sampled_reverse_kl estimator scores the "
                              f"sampled tokens under the models themselves; expected 1, found {spec.loss_temperature}")


def stage(ctx: Context) -> Stage:
    spec, teacher = ctx.recipe.onpolicy, ctx.teacher().model
    t_tok, s_tok = ctx.teacher().tokenizer, ctx.student.tokenizer
    across = None if t_tok is s_tok or t_tok.get_vocab() == s_tok.get_vocab() else (s_tok, t_tok)
    loss_fn = build_onpolicy_loss(teacher, spec, ctx.recipe.distill, ctx.vocab, echo=ctx.echo, across=across)
    eos = ctx.artifact if ctx.artifact is not None else []
    snapshot = None
    if spec.student_backend == "llamacpp" and spec.lmbda > 0:
        from distil.generation.snapshot import GGUFSnapshot

        snapshot = GGUFSnapshot(ctx.run_dir / "snapshots", spec.snapshot_every, ctx.student.tokenizer,
                                quant=spec.snapshot_quant, threads=ctx.recipe.train.threads or None)
    before = make_before_step(spec, teacher, eos, ctx.pad_id, ctx.echo, ctx.main, snapshot=snapshot, wait=ctx.wait)
    return Stage(phases=[Phase(name="onpolicy", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=ctx.train_examples, before_step=before)])


def _tokenizers(recipe: Any) -> str:
    """with onpolicy.loss: sampled_reverse_kl"""
    return "any" if recipe.onpolicy.loss == ESTIMATOR else "same"  # the estimator re-tokenizes the student's text


METHOD = Method(
    name="onpolicy",
    summary="on-policy distillation / GKD: with probability onpolicy.lmbda the student writes the completions, "
            "the teacher scores every token (any divergence, or the sampled-token estimator)",
    teacher="train",
    tokenizers=_tokenizers,
    prepare=prepare,
    build=stage,
    options=OnPolicySpec,
    check=check,
    loss_key="onpolicy.loss",
)
