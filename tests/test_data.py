"""Data: readers for every format, record shapes and their loss masks, packing, batching."""

import json

import pytest

from distil.data import (IGNORE, build_examples, collate, micro_batch, read_records, split)
from distil.errors import DistilError
from distil.testing import char_tokenizer


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_builtin_corpus_needs_no_download():
    recs = read_records("builtin:pydoc")
    assert len(recs) > 50 and sum(len(r["text"]) for r in recs) > 300_000


def test_readers_every_format(tmp_path):
    import datasets

    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("prompt,response\na,b\nc,d\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name in ("d.jsonl", "d.json", "d.csv", "d.parquet", "saved"):
        assert read_records(str(tmp_path / name)) == rows, name
    (tmp_path / "d.txt").write_text("first doc\nline two\n\nsecond doc\n")
    assert read_records(str(tmp_path / "d.txt")) == [{"text": "first doc\nline two"}, {"text": "second doc"}]


def test_bad_sources(tmp_path):
    with pytest.raises(DistilError, match="data file not found"):
        read_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DistilError, match="empty"):
        read_records(str(tmp_path / "empty.jsonl"))
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DistilError, match="unsupported data file type"):
        read_records(str(tmp_path / "x.xml"))
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DistilError, match="could not parse as json"):
        read_records(str(tmp_path / "broken.jsonl"))
    with pytest.raises(DistilError, match="unknown built-in corpus"):
        read_records("builtin:nothing")


def test_record_without_expected_fields(tok):
    with pytest.raises(DistilError) as info:
        build_examples([{"text": "ok"}, {"question": "q"}], tok, 16, source="d.jsonl")
    assert str(info.value) == ("d.jsonl: record 1: expected a 'text' field, or 'prompt' and 'response', or "
                               "'messages' (strings / a list), found keys ['question']")


def test_packing_blocks_of_exact_length(tok):
    ex = build_examples([{"text": "abcdefghij"}, {"text": "klmnopqrst"}], tok, seq_len=8)
    # 10 + EOS + 10 + EOS = 22 tokens -> two full blocks of 8, the remainder dropped
    assert [len(e["input_ids"]) for e in ex] == [8, 8]
    assert ex[1]["input_ids"][2] == tok.eos_token_id  # position 10 of the stream
    assert all(e["labels"] == e["input_ids"] for e in ex)


def test_prompt_response_masks_the_prompt(tok):
    (ex,) = build_examples([{"prompt": "hi", "response": "yo"}], tok, 64)
    ids, labels = ex["input_ids"], ex["labels"]
    text_targets = tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert text_targets == "yo<|im_end|>\n"
    prompt_len = len(tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                             tokenize=True)["input_ids"])
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    (plain,) = build_examples([{"prompt": "hi", "response": "yo"}], tok, 64, chat_template=False)
    assert plain["labels"] == [IGNORE, IGNORE] + plain["input_ids"][2:] and tok.decode(plain["input_ids"][2:4]) == "yo"


def test_messages_mask_everything_but_assistant_turns(tok):
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "A2"}]
    (ex,) = build_examples([{"messages": msgs}], tok, 256)
    kept = tok.decode([t if lab != IGNORE else tok.pad_token_id for t, lab in zip(ex["input_ids"], ex["labels"])],
                      skip_special_tokens=False)
    targets = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]
    assert tok.decode(targets) == "A1<|im_end|>\nA2<|im_end|>\n"
    assert "u1" not in kept.replace("<pad>", "")


def test_split_is_seeded_and_disjoint():
    ex = [{"input_ids": [i], "labels": [i]} for i in range(20)]
    a, b = split(ex, 5, seed=0)
    a2, b2 = split(ex, 5, seed=0)
    assert (a, b) == (a2, b2) and len(b) == 5 and len(a) == 15
    assert not {e["input_ids"][0] for e in a} & {e["input_ids"][0] for e in b}
    with pytest.raises(DistilError, match="data.eval_size"):
        split(ex, 20, seed=0)


def test_micro_batches_cover_epochs_and_shard_across_processes():
    ex = [{"input_ids": [i], "labels": [i]} for i in range(8)]
    seen = [e["input_ids"][0] for i in range(4) for e in micro_batch(ex, i, 2, seed=1)]
    assert sorted(seen) == list(range(8))  # one epoch: every example once
    two = [e["input_ids"][0] for i in range(2) for r in range(2) for e in micro_batch(ex, i, 2, 1, rank=r, world=2)]
    assert two == seen  # two processes see exactly the single process's global batches


def test_collate_pads_and_masks(tok):
    b = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
