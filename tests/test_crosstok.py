"""Logit distillation across tokenizers (distil/alignment.py, distil/methods/crosstok.py): golden values from the
formulas (float64 hand computations), hand-made tokenizations aligned against hand-listed spans, exact-match pieces
found by hand, and the method end to end on two tiny models whose tokenizers cut the same text differently."""

import json

import numpy as np
import pytest
import torch
import yaml

from distil.alignment import ZERO, Group, align, decoded_ends, offset_ends, shared_pieces
from distil.methods.crosstok import (CrossTokSpec, build_crosstok, gold_distance, pair_batch, sorted_w1,
                                     teacher_logits_at, uld_distance)
from distil.testing import SPECIALS, char_tokenizer, save_tiny_model


def word_tokenizer(pieces: list[str], bos: bool = False, template: bool = True):
    """A tokenizer whose pieces are the given strings (longest first wins) plus every printable character; with
    `bos`, it adds BOS to every text as Gemma's does; `template`: the ChatML chat template (none: a base model's)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for p in list(pieces) + sorted(string.printable):
        vocab.setdefault(p, len(vocab))
    alternatives = "|".join(__import__("re").escape(p) for p in sorted(pieces, key=len, reverse=True))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(f"{alternatives}|[\\s\\S]" if pieces else r"[\s\S]"),
                                            behavior="isolated")
    tk.decoder = decoders.Fuse()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS[4:])
    from distil.testing import CHATML

    tok.chat_template = CHATML if template else None
    return tok


BIGRAMS = ["th", "he", "the", "an", "in", "er", "  ", "at", "on"]


# ----------------------------------------------------------------------------------------------------------------
# The distances


def _w1_by_hand(p, q):
    p, q = sorted(map(float, p), reverse=True), sorted(map(float, q), reverse=True)
    n = max(len(p), len(q))
    p, q = p + [0.0] * (n - len(p)), q + [0.0] * (n - len(q))
    return sum(abs(a - b) for a, b in zip(p, q))


def test_sorted_w1_against_a_float64_hand_computation():
    p = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    # sorted: p 0.5 0.3 0.2 0 ; q 0.6 0.2 0.1 0.1 -> 0.1 + 0.1 + 0.1 + 0.1
    assert float(sorted_w1(p, q)[0]) == pytest.approx(0.4, rel=1e-12)
    assert float(sorted_w1(q, p)[0]) == pytest.approx(0.4, rel=1e-12)  # symmetric, padding either side
    rng = np.random.default_rng(0)
    a, b = rng.dirichlet(np.ones(50), size=3), rng.dirichlet(np.ones(80), size=3)
    got = sorted_w1(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32))
    want = [_w1_by_hand(x, y) for x, y in zip(a, b)]
    assert got.double().numpy() == pytest.approx(want, rel=1e-5)


def test_sorted_w1_top_k_counts_the_ranks_beyond_k_as_the_difference_of_the_tails():
    p = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]], dtype=torch.float64)
    # k = 2: |0.5 - 0.6| + |0.3 - 0.2| + |(0.2) - (0.1 + 0.1)| = 0.2 (the exact 0.4 minus at most 2 min(tails))
    assert float(sorted_w1(p, q, top_k=2)[0]) == pytest.approx(0.2, rel=1e-12)
    # k = 3: p whole, q's ranks 1..3 and its tail 0.1: |.5-.6| + |.3-.2| + |.2-.1| + |0 - 0.1| = exact
    assert float(sorted_w1(p, q, top_k=3)[0]) == pytest.approx(0.4, rel=1e-12)
    rng = np.random.default_rng(1)
    a, b = torch.tensor(rng.dirichlet(np.ones(40), size=2)), torch.tensor(rng.dirichlet(np.ones(60), size=2))
    assert torch.allclose(sorted_w1(a, b, top_k=60), sorted_w1(a, b))
    assert bool((sorted_w1(a, b, top_k=5) <= sorted_w1(a, b) + 1e-12).all())


def test_identical_or_permuted_distributions_give_zero():
    z = torch.randn(4, 30)
    assert torch.allclose(uld_distance(z, z), torch.zeros(4), atol=1e-7)
    perm = torch.randperm(30)
    # ULD ignores token identity: a permuted vocabulary is the same sorted distribution
    assert torch.allclose(uld_distance(z, z[:, perm]), torch.zeros(4), atol=1e-6)
    assert float(uld_distance(z, z + torch.randn(4, 30)).min()) > 0


def test_uld_temperature_and_gradient_reach_the_student():
    zs = torch.randn(2, 7, requires_grad=True)
    zt = torch.randn(2, 11)
    t = 2.0
    want = [_w1_by_hand(torch.softmax(zs[i].detach().double() / t, -1), torch.softmax(zt[i].double() / t, -1))
            for i in range(2)]
    d = uld_distance(zs, zt, temperature=t)
    assert d.detach().double().numpy() == pytest.approx(want, rel=1e-5)
    d.sum().backward()
    assert zs.grad is not None and float(zs.grad.abs().sum()) > 0


def test_gold_distance_matched_kl_renormalised_and_uld_on_the_rest_by_hand():
    zs = torch.tensor([[1.0, 0.0, 2.0, -1.0]])  # student ids 0..3
    zt = torch.tensor([[0.5, 1.5, -0.5, 0.0, 1.0]])  # teacher ids 0..4
    matched = (torch.tensor([2, 0]), torch.tensor([1, 4]))  # student 2 == teacher 1, student 0 == teacher 4
    unmatched = (torch.tensor([1, 3]), torch.tensor([0, 2, 3]))
    total, kl = gold_distance(zs, zt, matched, unmatched, temperature=1.0, matched_weight=0.5)
    ps = np.exp(zs[0].double().numpy()); ps /= ps.sum()
    pt = np.exp(zt[0].double().numpy()); pt /= pt.sum()
    qs = ps[[2, 0]] / ps[[2, 0]].sum()
    qt = pt[[1, 4]] / pt[[1, 4]].sum()
    kl_hand = float((qt * np.log(qt / qs)).sum())
    w1_hand = _w1_by_hand(ps[[1, 3]], pt[[0, 2, 3]])  # the remaining mass, not renormalised
    assert float(kl[0]) == pytest.approx(kl_hand, rel=1e-5)
    assert float(total[0]) == pytest.approx(0.5 * kl_hand + w1_hand, rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Alignment


def test_align_hand_made_tokenizations_against_hand_listed_spans():
    # "the cat sat": A = the|_|cat|_sat ; B = <bos>|th|e_|c|at|_s|at (BOS has zero width)
    a = [3, 4, 7, 11]
    b = [ZERO, 2, 4, 5, 7, 9, 11]
    assert align(a, b) == [Group(a=(0, 2), b=(1, 3), chars=(0, 4)), Group(a=(2, 3), b=(3, 5), chars=(4, 7)),
                           Group(a=(3, 4), b=(5, 7), chars=(7, 11))]
    # a token that ends inside a character (None) joins the next one; a trailing token past the last common cut
    # (a text one tokenizer normalises differently at its end) is in no group
    assert align([1, None, 3, 5], [1, 3, 6]) == [Group(a=(0, 1), b=(0, 1), chars=(0, 1)),
                                                  Group(a=(1, 3), b=(1, 2), chars=(1, 3))]


def test_decoded_and_offset_ends_of_two_tokenizers_on_one_text():
    text = "the cat in the hat"
    char, bi = char_tokenizer(), word_tokenizer(BIGRAMS, bos=True)
    ids = char(text, add_special_tokens=False)["input_ids"]
    decoded, ends = decoded_ends(char, [char.convert_tokens_to_ids("<|im_start|>")] + ids)
    assert decoded == text and ends == [ZERO] + list(range(1, len(text) + 1))
    enc = bi(text, return_offsets_mapping=True)
    assert bi.convert_ids_to_tokens(enc["input_ids"]) == ["<s>", "the", " ", "c", "at", " ", "in", " ", "the", " ",
                                                          "h", "at"]
    t_ends = offset_ends(enc["offset_mapping"])
    assert t_ends == [ZERO, 3, 4, 5, 7, 8, 10, 11, 14, 15, 16, 18]
    groups = align(ends[1:], t_ends)
    # by hand: every teacher piece is one group; "the" covers char tokens 0..2, "at" 4..5, "in" 8..9 ...
    assert [(g.chars, g.a, g.b) for g in groups[:4]] == [((0, 3), (0, 3), (1, 2)), ((3, 4), (3, 4), (2, 3)),
                                                         ((4, 5), (4, 5), (3, 4)), ((5, 7), (5, 7), (4, 5))]
    assert len(groups) == len(t_ends) - 1


def test_offset_ends_pieces_of_one_character_give_no_cut():
    # two byte pieces of 'é' share its offsets (4, 5): the first ends inside the character
    assert offset_ends([(0, 0), (0, 4), (4, 5), (4, 5), (5, 6)]) == [ZERO, 4, None, 5, 6]


def test_shared_pieces_found_by_hand():
    a = word_tokenizer(["ab", "abc", "zz"])
    b = word_tokenizer(["ab", "bc", "zz", "q q"])
    ma, mb = shared_pieces(a, b)
    strings = [a.convert_ids_to_tokens(i) for i in ma]
    import string

    # both have every printable character, 'ab' and 'zz'; 'abc', 'bc', 'q q' only one of them; specials never
    want = sorted(set(string.printable) | {"ab", "zz"})
    assert strings == want
    assert [b.convert_ids_to_tokens(i) for i in mb] == want
    assert not set(ma) & set(a.all_special_ids)


# ----------------------------------------------------------------------------------------------------------------
# The teacher's side and the loss


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("crosstok")
    teacher = save_tiny_model(root / "teacher", seed=1, tokenizer=word_tokenizer(BIGRAMS, bos=True),
                              num_hidden_layers=2, initializer_range=0.2)
    student = save_tiny_model(root / "student", seed=2, num_hidden_layers=2)
    return teacher, student


def _batch(tok, texts):
    from distil.data import collate

    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return collate([{"input_ids": r, "labels": r} for r in rows], tok.pad_token_id)


def test_pair_batch_gives_the_teacher_its_own_bos_and_the_aligned_positions(pair):
    from distil.models import load_model

    t, s = load_model(str(pair[0])), load_model(str(pair[1]))
    batch = _batch(s.tokenizer, ["the cat", "in the hat on"])
    batch["labels"][1, :3] = -100  # a prompt: its groups are not targets
    p = pair_batch(batch, s.tokenizer, t.tokenizer, t.tokenizer.pad_token_id)
    bos = t.tokenizer.bos_token_id
    assert p.t_ids[0, 0] == bos and p.t_ids[1, 0] == bos  # the teacher reads every text with its BOS
    assert t.tokenizer.convert_ids_to_tokens(p.t_ids[0, :int(p.t_mask[0].sum())].tolist()) == \
        ["<s>", "the", " ", "c", "at"]
    # row 0: student 't','h','e',' ','c','a','t'; the group 'the' starts at student 0 (no position before it:
    # skipped); ' ' at student 3 <- teacher 2, 'c' 4 <- 3, 'at' 5 <- 4: positions before them
    rows0 = [(int(a), int(b)) for r, a, b in zip(p.s_rows, p.s_pos, p.t_pos) if r == 0]
    assert rows0 == [(2, 1), (3, 2), (4, 3)]
    rows1 = [int(a) + 1 for r, a in zip(p.s_rows, p.s_pos) if r == 1]
    assert min(rows1) >= 3  # the masked prompt's groups are left out


def test_teacher_logits_at_positions_equal_the_full_forward(pair):
    from distil.models import load_model

    t = load_model(str(pair[0]))
    ids = torch.tensor([[1, 10, 11, 12, 13], [1, 20, 21, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    rows, pos = torch.tensor([0, 0, 1]), torch.tensor([1, 4, 2])
    got = teacher_logits_at(t.model, ids, mask, rows, pos, len(t.tokenizer))
    with torch.no_grad():
        full = t.model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(got, full[rows, pos, :len(t.tokenizer)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_the_loss_is_ce_plus_lambda_t2_times_the_distances_of_the_aligned_groups(pair, loss):
    from distil.heads import shift
    from distil.losses import hard_ce
    from distil.models import load_model

    t, s = load_model(str(pair[0])), load_model(str(pair[1]))
    batch = _batch(s.tokenizer, ["the cat sat on the mat", "an ant in the hat"])
    vocab = len(s.tokenizer)
    spec = CrossTokSpec(loss=loss, uld_weight=0.7, temperature=2.0, chunk_size=3)
    out = build_crosstok(t.model, t.tokenizer, s.tokenizer, spec, vocab)(s.model, batch, 40)
    # by hand: the same pairs, every group at once, float64 sums
    p = pair_batch(batch, s.tokenizer, t.tokenizer, t.tokenizer.pad_token_id)
    with torch.no_grad():
        zs_full = s.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        zt_full = t.model(input_ids=p.t_ids, attention_mask=p.t_mask).logits
    zs, zt = zs_full[p.s_rows, p.s_pos, :vocab], zt_full[p.t_rows, p.t_pos, :len(t.tokenizer)]
    if loss == "uld":
        d = uld_distance(zs, zt, 2.0)
    else:
        ms, mt = shared_pieces(s.tokenizer, t.tokenizer)
        us = torch.tensor([i for i in range(vocab) if i not in set(ms)])
        ut = torch.tensor([i for i in range(len(t.tokenizer)) if i not in set(mt)])
        d, _ = gold_distance(zs, zt, (torch.tensor(ms), torch.tensor(mt)), (us, ut), 2.0)
    sl, labels = shift(zs_full, batch["labels"], vocab)
    ce = hard_ce(sl.reshape(-1, vocab), labels.reshape(-1)).double().sum()
    want = (ce + 0.7 * 4.0 * d.double().sum()) / 40
    assert len(p.s_rows) > 10
    assert float(out.loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert float(out.metrics["aligned"]) == pytest.approx(len(p.s_rows) / 40)
    out.loss.backward()
    assert all(q.grad is not None for q in s.model.parameters() if q.requires_grad)


def _recipe(tmp_path, pair, **crosstok):
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(f"the cat {i} sat in the hat and then on the mat." for i in range(12)))
    recipe = {"name": "x", "teacher": {"source": str(pair[0])}, "student": {"source": str(pair[1])},
              "data": {"source": str(data), "seq_len": 32, "eval_size": 2},
              "distill": {"method": "crosstok"}, "crosstok": crosstok,
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
              "eval": {"batch_size": 2}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("loss", ["uld", "gold"])
def test_crosstok_runs_end_to_end_across_two_tokenizers(tmp_path, pair, loss):
    from distil.cli import main

    assert main(["run", str(_recipe(tmp_path, pair, loss=loss))]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(r["aligned"] > 0.5 and r["uld"] > 0 for r in steps)
    assert ("matched" in steps[0]) == (loss == "gold")
    record = json.loads((tmp_path / "runs" / "x" / "eval.json").read_text())
    assert all("kl" not in row for row in record["results"].values())  # no KL across vocabularies


@pytest.mark.slow
def test_alignment_of_gemma3_and_smollm2_tokenizers_on_multibyte_text():
    """The real pair (tokenizers only): byte-level pieces of one character join the next token, Gemma's BOS is in
    no group, and every group is the same characters for both."""
    from distil.models import embedded_path, load_tokenizer

    g = load_tokenizer(embedded_path("gemma-3-270m"))
    s = load_tokenizer(embedded_path("smollm2-135m-instruct"))
    text = "H\u00e9llo  w\u00f6rld \u2014 \u65e5\u672c\u8a9e def f(x):\n    return x+1  # ok"
    ids = s(text)["input_ids"]
    decoded, s_ends = decoded_ends(s, ids)
    assert decoded == text and None in s_ends  # the UTF-8 bytes of a CJK character come in several pieces
    enc = g(text, return_offsets_mapping=True)
    assert enc["input_ids"][0] == g.bos_token_id
    t_ends = offset_ends(enc["offset_mapping"])
    groups = align(s_ends, t_ends)
    spans = [text[a:b] for a, b in (gr.chars for gr in groups)]
    assert "".join(spans) == text  # the groups tile the text
    assert "\n    return" in spans and " \u65e5\u672c" in spans  # where the two tokenizers cut differently
    for gr in groups:
        assert g.decode(enc["input_ids"][gr.b[0]:gr.b[1]]) == s.decode(ids[gr.a[0]:gr.a[1]]) == text[slice(*gr.chars)]
