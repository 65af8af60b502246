"""BOS at the start of every example when the tokenizer adds one (packed blocks included)."""

import math
import sys
from pathlib import Path

import pytest

from distil.data import IGNORE, build_examples, ensure_bos
from distil.eval.metrics import evaluate
from distil.testing import char_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from helpers_data import CHATML_BOS, BosGated, bos_char_tokenizer  # noqa: E402

DOCS = [{"text": "abcdefg"}] * 6  # each document is 9 stream tokens: BOS a b c d e f g EOS


@pytest.fixture(scope="module")
def btok():
    return bos_char_tokenizer()


def enc(tok, s):
    """'B' is BOS and 'E' is EOS; every other character is its own token."""
    return [tok.bos_token_id if c == "B" else tok.eos_token_id if c == "E" else tok.convert_tokens_to_ids(c)
            for c in s]


def test_packed_blocks_all_start_with_bos_and_lose_nothing(btok):
    # Stream: doc k at [9k, 9k+9). Walking it with blocks of 8: a block at a document start uses that
    # document's BOS (8 stream tokens), any other gets one inserted before the next 7 stream tokens.
    # Positions 0, 8, 15, 22, 29, 36 (a start), 44; at 51 only 3 tokens are left and are dropped.
    ex = build_examples(DOCS, btok, seq_len=8)
    want = ["Babcdefg", "BEBabcde", "BfgEBabc", "BdefgEBa", "BbcdefgE", "Babcdefg", "BEBabcde"]
    assert [e["input_ids"] for e in ex] == [enc(btok, s) for s in want]
    # BOS is never a target, whether inserted or a document's own; everything else is.
    assert [e["labels"] for e in ex] == [[IGNORE if c == "B" else t for c, t in zip(s, enc(btok, s))] for s in want]


def test_tokenizer_without_bos_packs_exactly_as_before():
    tok = char_tokenizer()
    stream = enc(tok, "abcdefgE" * 6)  # no BOS anywhere: 48 tokens, 6 blocks of 8, nothing inserted
    ex = build_examples(DOCS, tok, seq_len=8)
    assert [e["input_ids"] for e in ex] == [stream[i: i + 8] for i in range(0, 48, 8)]
    assert all(e["labels"] == e["input_ids"] for e in ex)
    (one,) = build_examples(DOCS[:1], tok, seq_len=64, pack=False)
    assert one == {"input_ids": enc(tok, "abcdefgE"), "labels": enc(tok, "abcdefgE")}


def test_bos_gated_model_gets_its_good_perplexity_on_every_block(btok):
    # seq_len 10: the first block is stream[0:10] = B a..g E B; every later one starts mid-document
    # ('a' after its document's BOS), gets a BOS inserted, and is again B a..g E B: 5 blocks in 54 tokens.
    ex = build_examples(DOCS, btok, seq_len=10)
    assert [e["input_ids"] for e in ex] == [enc(btok, "BabcdefgEB")] * 5
    vocab, strength = len(btok), 5.0
    table = dict(zip(enc(btok, "abcdefg"), enc(btok, "bcdefgE")))
    model = BosGated(table, vocab, btok.bos_token_id, strength)
    out = evaluate(None, {"s": model}, ex, batch_size=2, pad_id=0, vocab=vocab)["s"]
    # Per block 8 targets (the trailing BOS is not one): 'a' follows BOS, which the table cannot
    # predict (uniform: log V); b..g and EOS follow their predecessor: -log softmax = log(1 + (V-1) e^-L).
    good = math.log(1 + (vocab - 1) * math.exp(-strength))
    ce = (5 * math.log(vocab) + 35 * good) / 40
    assert out["tokens"] == 40
    assert out["ce"] == pytest.approx(ce, rel=1e-5)
    # A block without BOS would be uniform: log V on all its targets (the silent failure this guards).
    assert ce < 0.5 * math.log(vocab)


def test_unpacked_text_starts_with_bos(btok):
    (ex,) = build_examples(DOCS[:1], btok, seq_len=64, pack=False)
    assert ex["input_ids"] == enc(btok, "BabcdefgE")
    assert ex["labels"] == [IGNORE] + enc(btok, "abcdefgE")


@pytest.mark.parametrize("template", ["chatml", "chatml_bos"])
def test_chat_records_start_with_exactly_one_bos(template):
    from distil.testing import CHATML

    tok = bos_char_tokenizer(CHATML if template == "chatml" else CHATML_BOS)
    bos = tok.bos_token_id
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    for record in ({"prompt": "hi", "response": "yo"}, {"messages": msgs}):
        (ex,) = build_examples([record], tok, 64)
        # The template without BOS gets one; the one that renders BOS itself is not given a second.
        assert ex["input_ids"][0] == bos and ex["input_ids"][1] != bos, (template, record)
        assert ex["labels"][0] == IGNORE
        assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "yo<|im_end|>\n"
    (plain,) = build_examples([{"prompt": "hi", "response": "yo"}], tok, 64, chat_template=False)
    assert plain["input_ids"] == enc(tok, "BhiyoE") and plain["labels"] == [IGNORE] * 3 + enc(tok, "yoE")


def test_ensure_bos_adds_one_only_where_the_tokenizer_would(btok):
    ids = enc(btok, "ab")
    assert ensure_bos(btok, ids) == enc(btok, "Bab")
    assert ensure_bos(btok, enc(btok, "Bab")) == enc(btok, "Bab")  # never doubled
    assert ensure_bos(char_tokenizer(), ids) == ids  # a tokenizer that adds no BOS gets none


def test_seq_len_below_two_is_refused(btok):
    from distil.errors import DistilError

    with pytest.raises(DistilError, match=r"data.seq_len: expected at least 2 .* found 1"):
        build_examples(DOCS, btok, seq_len=1)
