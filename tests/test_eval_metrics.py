"""distil/eval/metrics.py against hand-computed float64 values: perplexity, top-1 agreement and KL(teacher || student)
from fake models with fixed logits, with masked prompts, padding, padded vocabulary rows and uneven batches."""

import math
from types import SimpleNamespace

import pytest
import torch

from distil.eval.metrics import evaluate, format_table

VOCAB = 7  # the tokenizer's vocabulary; the models' heads have 2 padding rows more, which are never scored
ROWS = VOCAB + 2
PAD = 0
# Token ids with their labels (-100: not a target). Labels are aligned to input_ids: position t predicts labels[t+1].
EXAMPLES = [
    {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, 4, 5]},  # a masked prompt
    {"input_ids": [2, 6, 1], "labels": [2, 6, 1]},
    {"input_ids": [3, 3, 6, 3, 3, 2, 4], "labels": [3, 3, 6, 3, 3, 2, 4]},  # the longest: the others get padded
    {"input_ids": [5, 1], "labels": [-100, 1]},
    {"input_ids": [4, 2, 6, 5], "labels": [-100, -100, -100, -100]},  # no target at all
    {"input_ids": [6, 5, 4], "labels": [-100, 5, -100]},  # a masked target between the others
]


class TableLM(torch.nn.Module):
    """A fake causal LM with fixed logits: at position t, table[input_ids[t]] (a bigram table [ROWS, ROWS]).

    Padded positions (attention_mask 0) get a huge logit on token 1, so scoring padding shows in every metric.
    """

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table.float())
        self.calls: list[dict] = []

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, **kwargs})
        logits = self.table[input_ids].clone()
        if attention_mask is not None:
            logits[..., 1] += 1e3 * (1 - attention_mask).float()
        return SimpleNamespace(logits=logits)


def table(seed: int, scale: float, pad_rows_logit: float = 30.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(ROWS, ROWS, generator=g) * scale
    t[:, VOCAB:] = pad_rows_logit  # padded head rows: the largest logits, so scoring them shows
    return t


def targets(examples):
    """(input token, target token) for every scored position, in order."""
    out = []
    for e in examples:
        for t in range(len(e["input_ids"]) - 1):
            if e["labels"][t + 1] != -100:
                out.append((e["input_ids"][t], e["labels"][t + 1]))
    return out


def reference(teacher_table, student_table, examples):
    """The metrics straight from their definitions, in float64 (VOCAB columns only)."""
    pairs = targets(examples)
    nll = kl = rkl = agree = scale = 0.0
    for x, y in pairs:
        ls = torch.log_softmax(student_table[x, :VOCAB].double(), -1)
        lt = torch.log_softmax(teacher_table[x, :VOCAB].double(), -1)
        nll -= float(ls[y])
        kl += float((lt.exp() * (lt - ls)).sum())  # KL(p_T || p_S)
        rkl += float((ls.exp() * (ls - lt)).sum())  # KL(p_S || p_T): the direction the evaluator must NOT use
        agree += float(ls.argmax() == lt.argmax())
        scale += float((lt.exp() * (lt.abs() + ls.abs())).sum()) - float(ls[y])  # the summands' size
    n = len(pairs)
    return SimpleNamespace(ce=nll / n, kl=kl / n, reverse_kl=rkl / n, agreement=agree / n, tokens=n, scale=scale / n)


TEACHER = table(0, 4.0)  # peaked
STUDENT = 0.15 * TEACHER + table(1, 0.7)  # flatter, and partly agreeing with the teacher
STUDENT[:, VOCAB:] = 30.0
OTHER = table(2, 2.0)


def run(rows, examples=EXAMPLES, teacher=TEACHER, batch_size=2, chunk_size=1024):
    t = TableLM(teacher) if teacher is not None else None
    return evaluate(t, {name: TableLM(tab) for name, tab in rows.items()}, examples, batch_size=batch_size,
                    pad_id=PAD, vocab=VOCAB, chunk_size=chunk_size)


def check_row(fp32, got, ref, with_teacher=True):
    tol = dict(terms=ref.tokens * VOCAB, scale=ref.scale)
    assert got["tokens"] == ref.tokens
    assert got["ce"] == fp32.approx(ref.ce, **tol)
    assert math.log(got["ppl"]) == fp32.approx(ref.ce, **tol)  # ppl = exp(mean NLL): compared through its log
    if with_teacher:
        assert got["kl"] == fp32.approx(ref.kl, **tol)
        assert got["agreement"] == ref.agreement  # a count of exact argmax matches over the same tokens


def test_the_reference_examples_are_not_degenerate():
    pairs = targets(EXAMPLES)
    assert len(pairs) == 13
    ref = reference(TEACHER, STUDENT, EXAMPLES)
    assert 0.2 < ref.agreement < 0.8  # some argmax matches and some mismatches
    assert abs(ref.kl - ref.reverse_kl) > 0.5  # forward and reverse KL tell each other apart clearly
    # the padded rows and the padding logits would win every argmax if they were scored
    assert all(int(TEACHER[x].argmax()) >= VOCAB for x, _ in pairs)


def test_values_match_the_definitions(fp32):
    out = run({"student": STUDENT, "other": OTHER})
    assert {"teacher", "student", "other"} <= set(out)
    check_row(fp32, out["student"], reference(TEACHER, STUDENT, EXAMPLES))
    check_row(fp32, out["other"], reference(TEACHER, OTHER, EXAMPLES))
    # the teacher's own row: its perplexity, no divergence from itself, full agreement
    ref = reference(TEACHER, TEACHER, EXAMPLES)
    check_row(fp32, out["teacher"], ref)
    assert ref.kl == 0 and out["teacher"]["agreement"] == 1.0
    assert out["teacher"]["kl"] == fp32.approx(0.0, terms=ref.tokens * VOCAB, scale=ref.scale)


def test_kl_is_teacher_to_student_not_the_reverse(fp32):
    """KL(p_T || p_S) (mode-covering, as the design's forward_kl), with values where the directions differ."""
    # one scored position; teacher sure of token 2, student spread out: KL(T||S) = 1.22, KL(S||T) = 3.82
    t_tab = torch.zeros(ROWS, ROWS)
    t_tab[1, :VOCAB] = torch.tensor([0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0])
    s_tab = torch.zeros(ROWS, ROWS)
    s_tab[1, :VOCAB] = torch.tensor([0.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0])
    examples = [{"input_ids": [1, 2], "labels": [-100, 2]}]
    p_t = torch.softmax(t_tab[1, :VOCAB].double(), -1)
    p_s = torch.softmax(s_tab[1, :VOCAB].double(), -1)
    forward = float((p_t * (p_t / p_s).log()).sum())
    reverse = float((p_s * (p_s / p_t).log()).sum())
    assert reverse - forward > 2.0
    got = run({"s": s_tab}, examples, teacher=t_tab)["s"]
    assert got["kl"] == fp32.approx(forward, terms=VOCAB, scale=10.0)
    assert got["ce"] == fp32.approx(-math.log(float(p_s[2])), terms=VOCAB, scale=10.0)
    assert got["agreement"] == 1.0  # both put their largest probability on token 2


@pytest.mark.parametrize("batch_size", [1, 2, 4, 5, 100])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_uneven_batches_and_chunks_give_the_per_token_mean(fp32, batch_size, chunk_size):
    """Means over all target tokens (not means of batch means), whatever the batch and chunk sizes: batches of
    different lengths and token counts, a last partial batch, and a batch with no target at all (batch_size 1)."""
    out = run({"student": STUDENT}, batch_size=batch_size, chunk_size=chunk_size)
    check_row(fp32, out["student"], reference(TEACHER, STUDENT, EXAMPLES))
    check_row(fp32, out["teacher"], reference(TEACHER, TEACHER, EXAMPLES))


def test_padding_and_masked_positions_are_not_scored(fp32):
    """Padding positions carry garbage logits (see TableLM); masked labels have ordinary ones. Neither counts: the
    same examples without their masked tails, padded or not, give the same numbers."""
    student = TableLM(STUDENT)
    out = evaluate(TableLM(TEACHER), {"student": student}, EXAMPLES, batch_size=len(EXAMPLES), pad_id=PAD,
                   vocab=VOCAB)
    mask = student.calls[0]["attention_mask"]  # the evaluator passes the attention mask: padding is marked
    assert mask is not None and mask.shape == (len(EXAMPLES), 7) and int(mask.sum()) == sum(
        len(e["input_ids"]) for e in EXAMPLES)
    alone = [run({"student": STUDENT}, [e], batch_size=1) for e in EXAMPLES if targets([e])]
    n = sum(r["student"]["tokens"] for r in alone)
    assert n == out["student"]["tokens"] == 13
    ref = reference(TEACHER, STUDENT, EXAMPLES)
    for key in ("ce", "kl"):
        pooled = sum(r["student"][key] * r["student"]["tokens"] for r in alone) / n
        assert pooled == fp32.approx(out["student"][key], terms=n * VOCAB, scale=ref.scale)


def test_without_a_teacher_only_perplexity(fp32):
    out = run({"student": STUDENT}, teacher=None)
    assert set(out) == {"student"}
    assert "kl" not in out["student"] and "agreement" not in out["student"]
    check_row(fp32, out["student"], reference(TEACHER, STUDENT, EXAMPLES), with_teacher=False)


def test_training_mode_is_restored_and_no_gradients_are_kept():
    t, s = TableLM(TEACHER).eval(), TableLM(STUDENT).train()
    evaluate(t, {"s": s}, EXAMPLES, batch_size=3, pad_id=PAD, vocab=VOCAB)
    assert not t.training and s.training
    assert all(not c["input_ids"].requires_grad for c in s.calls)


def test_format_table():
    results = {
        "teacher": {"ppl": 12.3456, "kl": 0.0, "agreement": 1.0, "ce": math.log(12.3456), "tokens": 40},
        "student (offline)": {"ppl": 20.0, "kl": 0.56789, "agreement": 0.4321, "ce": math.log(20.0), "tokens": 40},
        "no teacher": {"ppl": 7.0, "ce": math.log(7.0), "tokens": 40},
    }
    lines = format_table(results, {"student (offline)": 1_500_000}).splitlines()
    assert "ppl" in lines[0] and "KL(T||S)" in lines[0] and "top-1 agree" in lines[0]
    assert set(lines[1]) == {"-"}
    assert len(lines) == 5
    assert lines[2].split() == ["teacher", "12.35", "0.0000", "100.0%"]
    assert lines[3].split() == ["student", "(offline)", "1.5M", "20.00", "0.5679", "43.2%"]
    assert lines[4].split() == ["no", "teacher", "7.00", "-", "-"]
