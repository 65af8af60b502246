"""Logit distillation across tokenizers: the Universal Logit Distillation loss (ULD, Boizard et al. 2024) and a
GOLD-style hybrid (TRL's GOLD trainer: exact-match vocabulary pieces compared directly, the rest by ULD).

Teacher and student read THE SAME TEXT, each through its own tokenizer and its own BOS convention. The student's
training examples are data.py's, unchanged (packing, prompt masks, chat rendering); in every loss call each row's
student ids are decoded to text (special tokens dropped: they are structure, not text), the teacher's tokenizer
encodes that text as it would any text (its BOS when it adds one: Gemma scores absurdly without it), and the two
tokenizations are aligned by character offsets (distil/alignment.py). Why per batch, not in `prepare`: the teacher
side is then a function of exactly the ids the student trains on, so packing, masks, resume and data parallelism
need nothing new (the loop's collate stays the plain one), and tokenizing + aligning a micro-batch costs
milliseconds next to the teacher's forward.

Alignment groups (alignment.py): a run of student tokens and a run of teacher tokens covering the same characters.
At a group's first token both models predict what follows exactly the same text, so p_S = softmax(z_S / T) at the
student position before the group and p_T = softmax(z_T / T) at the teacher position before it are two
distributions over two vocabularies for one event. A group counts when its first student token is a training
target (label != -100) and both models have a position before it (a student without BOS cannot predict its first
token). Tokens inside a multi-token group are learned by cross-entropy only: unlike GOLD, which multiplies the
conditional probabilities of a group's tokens into one merged distribution, the comparison here is at the group's
start only, where both distributions are exact.

Losses (`crosstok.loss`), per aligned group g:
  uld   D_g = W1(p_S, p_T) = sum_i | sort(p_S)_i - sort(p_T)_i |, both sorted in descending order and the shorter
        padded with zeros (the closed form Boizard et al. use for the Wasserstein-1 distance between the two
        distributions with their tokens ranked by probability: no token identity is needed, so no shared vocabulary).
  gold  the pieces that are the same string in both vocabularies (alignment.shared_pieces: ' the', 'def', '(' ...)
        get a direct divergence: KL(q_T || q_S) of the two distributions restricted to those pieces and
        renormalised (a log_softmax over the matched logits); the remaining mass, not renormalised, gets ULD:
        D_g = matched_weight * KL(q_T || q_S) + W1(p_S[unmatched], p_T[unmatched]).
  loss = (sum over student target tokens of -log p_S(y)  +  uld_weight * T^2 * sum_g D_g) / num_items
with num_items the student target tokens of the global batch (so accumulation and process count do not change it)
and T^2 keeping the soft term's gradient scale independent of T (the house convention, Hinton et al.).
metrics.jsonl: ce, uld (the sum of D_g / num_items), matched (gold: the KL part), aligned (groups / target tokens).

The teacher's logits are computed for the group positions only (its last hidden states at those positions times its
head; soft-capped when the model soft-caps), so a 262k-token teacher never materialises [tokens x vocab] for a
whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from distil.alignment import align, decoded_ends, offset_ends, shared_pieces
from distil.data import IGNORE
from distil.errors import DistilError
from distil.heads import final_hidden, shift
from distil.losses import LossOutput, denominator, hard_ce
from distil.methods.contract import Context, Method, Phase, Stage, Trainable
from distil.options import option


@dataclass
class CrossTokSpec:
    """Logit distillation across tokenizers: ULD, or GOLD-style exact-match pieces + ULD."""

    loss: Literal["uld", "gold"] = option("gold", "uld: cross-entropy + the Wasserstein distance between the sorted "
                                          "probability vectors (Boizard et al. 2024); gold: pieces that are the same "
                                          "string in both vocabularies compared directly (KL), the rest by ULD.")
    uld_weight: float = option(1.0, "lambda: weight of the distillation term beside the student's cross-entropy.",
                               ge=0.0)
    temperature: float = option(1.0, "Divides both models' logits in the distillation term (scaled by T^2).", gt=0.0)
    matched_weight: float = option(1.0, "gold: weight of the KL on the exact-match pieces (the ULD on the rest "
                                   "weighs 1).", ge=0.0)
    top_k: int = option(0, "Sort only the k most likely tokens of each side (ranks beyond k count as the difference "
                        "of the two remaining masses: a lower bound of the exact ULD term); 0 = the full sort, "
                        "exact, seconds per hundred positions for a 262k vocabulary on a CPU.", ge=0)
    chunk_size: int = option(64, "Aligned positions whose [positions x vocab] probabilities are sorted at a time.",
                             gt=0)


# ----------------------------------------------------------------------------------------------------------------
# The distances (pure functions of probabilities / logits)


def sorted_w1(p: torch.Tensor, q: torch.Tensor, top_k: int = 0) -> torch.Tensor:
    """sum_i |sort(p)_i - sort(q)_i| per row, both sorted descending, the shorter padded with zeros: p [..., Vp],
    q [..., Vq] -> [...]. Differentiable in both (through the sorted values).

    `top_k` > 0: only the k largest probabilities of each side are sorted (a full sort of a 262k vocabulary costs
    seconds per hundred positions on a CPU); the ranks beyond k count as |tail(p) - tail(q)|, the difference of the
    two masses left beyond rank k. That is a lower bound of their exact term (sum_{i>k} |p_i - q_i|), short of it
    by at most 2 min(tail(p), tail(q)), and exact when one tail is empty."""
    if top_k:
        ps = p.topk(min(top_k, p.shape[-1]), dim=-1).values
        qs = q.topk(min(top_k, q.shape[-1]), dim=-1).values
        tail = ((p.sum(-1) - ps.sum(-1)) - (q.sum(-1) - qs.sum(-1))).abs()
    else:
        ps = p.sort(dim=-1, descending=True).values
        qs = q.sort(dim=-1, descending=True).values
        tail = 0.0
    n = min(ps.shape[-1], qs.shape[-1])
    d = (ps[..., :n] - qs[..., :n]).abs().sum(-1)
    return d + ps[..., n:].sum(-1) + qs[..., n:].sum(-1) + tail  # beyond the shorter: |p_i - 0|


def uld_distance(zs: torch.Tensor, zt: torch.Tensor, temperature: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """ULD per row: W1 of softmax(zs / T) and softmax(zt / T) over their own vocabularies (fp32)."""
    return sorted_w1(F.softmax(zs.float() / temperature, -1), F.softmax(zt.float() / temperature, -1), top_k)


def gold_distance(zs: torch.Tensor, zt: torch.Tensor, matched: tuple[torch.Tensor, torch.Tensor],
                  unmatched: tuple[torch.Tensor, torch.Tensor], temperature: float = 1.0,
                  matched_weight: float = 1.0, top_k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """GOLD-style per row: (matched_weight * KL(q_T || q_S) + W1 on the unmatched mass, KL(q_T || q_S)).
    `matched` = (student ids, teacher ids) of the exact-match pieces, pairwise; `unmatched` = every other id of each
    vocabulary. q = the distribution restricted to the matched pieces and renormalised."""
    zs, zt = zs.float() / temperature, zt.float() / temperature
    ms, mt = matched
    if len(ms):
        ls, lt = F.log_softmax(zs[:, ms], -1), F.log_softmax(zt[:, mt], -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
    else:
        kl = zs.new_zeros(zs.shape[0])
    us, ut = unmatched
    w1 = sorted_w1(F.softmax(zs, -1)[:, us], F.softmax(zt, -1)[:, ut], top_k)
    return matched_weight * kl + w1, kl


# ----------------------------------------------------------------------------------------------------------------
# The teacher's side of a batch


@dataclass
class Paired:
    """The teacher's tokens of a student batch and the aligned positions: logits at (s_rows, s_pos) of the student
    and (t_rows, t_pos) of the teacher predict the first token of the same group."""

    t_ids: torch.Tensor
    t_mask: torch.Tensor
    s_rows: torch.Tensor
    s_pos: torch.Tensor
    t_rows: torch.Tensor
    t_pos: torch.Tensor


def teacher_tokens(text: str, tok: Any, limit: int | None = None) -> tuple[list[int], list]:
    """The teacher's own tokens of a text (its BOS convention: what `tok(text)` adds) and their offsets."""
    if not getattr(tok, "is_fast", False):
        raise DistilError(f"crosstok: the teacher's tokenizer {getattr(tok, 'name_or_path', '')!r} is not a fast "
                          f"tokenizer; expected one with character offsets (tokenizer.json)")
    enc = tok(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    return (ids[:limit], offsets[:limit]) if limit else (ids, offsets)


def pair_batch(batch: dict, student_tok: Any, teacher_tok: Any, teacher_pad: int,
               limit: int | None = None) -> Paired:
    """Decode each student row, tokenize it for the teacher, align, keep the groups whose first student token is a
    target and that both models can predict (a position before it)."""
    rows_ids, s_rows, s_pos, t_rows, t_pos = [], [], [], [], []
    lengths = batch["attention_mask"].sum(-1).tolist()
    for r, (ids, labels) in enumerate(zip(batch["input_ids"].tolist(), batch["labels"].tolist())):
        ids, labels = ids[:lengths[r]], labels[:lengths[r]]
        text, s_ends = decoded_ends(student_tok, ids)
        t_ids, offsets = teacher_tokens(text, teacher_tok, limit)
        rows_ids.append(t_ids)
        for g in align(s_ends, offset_ends(offsets)):
            a0, b0 = g.a[0], g.b[0]
            if a0 >= 1 and b0 >= 1 and labels[a0] != IGNORE:
                s_rows.append(r), s_pos.append(a0 - 1), t_rows.append(r), t_pos.append(b0 - 1)
    width = max(1, max(map(len, rows_ids)))
    t_ids = torch.full((len(rows_ids), width), teacher_pad, dtype=torch.long)
    t_mask = torch.zeros((len(rows_ids), width), dtype=torch.long)
    for r, ids in enumerate(rows_ids):
        t_ids[r, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        t_mask[r, :len(ids)] = 1
    as_t = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return Paired(t_ids, t_mask, as_t(s_rows), as_t(s_pos), as_t(t_rows), as_t(t_pos))


def teacher_logits_at(teacher: Any, t_ids: torch.Tensor, t_mask: torch.Tensor, rows: torch.Tensor,
                      pos: torch.Tensor, vocab: int) -> torch.Tensor:
    """The teacher's logits [G, vocab] at (rows, pos) only: last hidden states there times the head (soft-capped
    as the model does), never [B x T x V]."""
    device = next(teacher.parameters()).device
    with torch.no_grad():
        h = final_hidden(teacher, {"input_ids": t_ids.to(device), "attention_mask": t_mask.to(device)})
        h = h[rows.to(device), pos.to(device)]
        head = teacher.get_output_embeddings()
        z = F.linear(h, head.weight[:vocab], head.bias[:vocab] if getattr(head, "bias", None) is not None else None)
        cap = getattr(teacher.config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
    return z


def build_crosstok(teacher: Any, teacher_tok: Any, student_tok: Any, spec: CrossTokSpec, vocab: int,
                   echo: Any = None) -> Any:
    """The loss function (module docstring). `vocab`: the student's tokenizer length (its logits are sliced to it)."""
    t_vocab = len(teacher_tok)
    t_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else (teacher_tok.eos_token_id or 0)
    limit = getattr(teacher.config, "max_position_embeddings", None)
    if spec.loss == "gold":
        ms, mt = shared_pieces(student_tok, teacher_tok)
        ms_t, mt_t = torch.tensor(ms, dtype=torch.long), torch.tensor(mt, dtype=torch.long)
        keep_s, keep_t = torch.ones(vocab, dtype=torch.bool), torch.ones(t_vocab, dtype=torch.bool)
        keep_s[ms_t[ms_t < vocab]] = False
        keep_t[mt_t[mt_t < t_vocab]] = False
        unmatched = (keep_s.nonzero().squeeze(1), keep_t.nonzero().squeeze(1))
        if echo is not None:
            echo(f"crosstok: {len(ms)} vocabulary pieces are the same string in both tokenizers (compared "
                 f"directly); the rest of the mass by ULD")

    def loss_fn(module: Any, batch: dict, num_items: float) -> LossOutput:
        paired = pair_batch(batch, student_tok, teacher_tok, t_pad, limit)
        s_logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        s, labels = shift(s_logits, batch["labels"], vocab)
        n_tokens = int((labels != IGNORE).sum())
        denom = denominator(num_items, n_tokens)
        ce = hard_ce(s.reshape(-1, s.shape[-1]), labels.reshape(-1)).sum()
        device = s_logits.device
        d_sum = s_logits.new_zeros((), dtype=torch.float32)
        m_sum = torch.zeros((), device=device)
        n_groups = len(paired.s_rows)
        if n_groups:
            zt_all = teacher_logits_at(teacher, paired.t_ids, paired.t_mask, paired.t_rows, paired.t_pos, t_vocab)
            for at in range(0, n_groups, spec.chunk_size):
                sl = slice(at, at + spec.chunk_size)
                zs = s_logits[paired.s_rows[sl].to(device), paired.s_pos[sl].to(device), :vocab]
                zt = zt_all[sl].to(device)
                if spec.loss == "uld":
                    d = uld_distance(zs, zt, spec.temperature, spec.top_k)
                else:
                    d, kl = gold_distance(zs, zt, (ms_t.to(device), mt_t.to(device)),
                                          (unmatched[0].to(device), unmatched[1].to(device)), spec.temperature,
                                          spec.matched_weight, spec.top_k)
                    m_sum = m_sum + kl.detach().sum()
                d_sum = d_sum + d.sum()
        soft = spec.uld_weight * spec.temperature ** 2 * d_sum
        loss = (ce + soft) / denom
        metrics = {"ce": ce.detach() / denom, "uld": d_sum.detach() / denom,
                   "aligned": torch.tensor(n_groups / denom, device=device)}
        if spec.loss == "gold":
            metrics["matched"] = m_sum / denom
        return LossOutput(loss=loss, metrics=metrics, n_tokens=n_tokens)

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------
# The method


def stage(ctx: Context) -> Stage:
    teacher = ctx.teacher()
    loss_fn = build_crosstok(teacher.model, teacher.tokenizer, ctx.student.tokenizer, ctx.recipe.crosstok, ctx.vocab,
                             echo=ctx.echo if ctx.main else None)
    return Stage(phases=[Phase(name="crosstok", module=Trainable(ctx.student.model), loss_fn=loss_fn,
                               examples=ctx.train_examples)])


METHOD = Method(
    name="crosstok",
    summary="logit distillation across tokenizers: each model reads the text through its own tokenizer, aligned by "
            "character offsets; ULD (sorted-probability Wasserstein) or GOLD-style (exact-match pieces + ULD)",
    teacher="train",
    tokenizers="any",
    build=stage,
    options=CrossTokSpec,
    loss_key="crosstok.loss",
)
