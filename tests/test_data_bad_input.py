"""Bad data inputs: each gives DistilError with one line naming the file (and record / key), never
another exception. Every case is generated into a temporary directory."""

import json
import random
from types import SimpleNamespace

import pytest

from distil.data import load_examples
from distil.errors import DistilError
from distil.testing import char_tokenizer

PR = {"prompt": "p", "response": "r"}


def jsonl(*records):
    return "".join(json.dumps(r) + "\n" for r in records)


def garbage(n=256):
    # Seeded bytes that are neither valid UTF-8 nor any file format (0xff never occurs in UTF-8).
    rnd = random.Random(0)
    return b"\xff\xfe" + bytes(rnd.randrange(256) for _ in range(n))


def corrupt_saved_dataset(d):
    import datasets

    datasets.Dataset.from_list([{"text": "a b c"}] * 4).save_to_disk(str(d))
    for f in d.glob("*.arrow"):
        f.write_bytes(garbage())


# name -> (file name, content (str / bytes / callable on the path), extra spec keys, fragments of the message)
CASES = {
    "jsonl_broken_line": ("d.jsonl", '{"text": "a"}\n{"text": \n', {}, ["line 2", "could not parse as json"]),
    "jsonl_arrays": ("d.jsonl", "[1, 2]\n", {}, ["line 1", "expected a JSON object", "found an array"]),
    "jsonl_numbers": ("d.jsonl", "{\"text\": \"a\"}\n7\n", {}, ["line 2", "found a number"]),
    "jsonl_not_utf8": ("d.jsonl", garbage(), {}, ["expected UTF-8"]),
    "mixed_kinds": ("d.jsonl", jsonl({"text": "a"}, PR), {}, ["record 1", "same fields as record 0 (text)"]),
    "text_not_string": ("d.jsonl", jsonl({"text": 3}), {}, ["record 0", "'text': expected a string, found a number"]),
    "messages_not_list": ("d.jsonl", jsonl({"messages": "hi"}), {}, ["record 0", "'messages'", "found a string"]),
    "messages_empty": ("d.jsonl", jsonl({"messages": []}), {}, ["record 0", "found an empty list"]),
    "message_not_object": ("d.jsonl", jsonl({"messages": ["hi"]}), {}, ["record 0", "messages[0]", "found a string"]),
    "message_without_content": ("d.jsonl", jsonl({"messages": [{"role": "user", "content": "u"},
                                                              {"role": "assistant"}]}), {},
                                ["record 0", "messages[1].content: expected a string, found null"]),
    "content_not_string": ("d.jsonl", jsonl({"messages": [{"role": "user", "content": 5}]}), {},
                           ["record 0", "messages[0].content: expected a string, found a number"]),
    "role_unknown": ("d.jsonl", jsonl({"messages": [{"role": "bot", "content": "x"}]}), {},
                     ["record 0", "messages[0].role: expected one of", "found 'bot'"]),
    "no_assistant_turn": ("d.jsonl", jsonl({"messages": [{"role": "user", "content": "x"}]}), {},
                          ["record 0", "no assistant turn"]),
    "prompt_without_response": ("d.jsonl", jsonl({"prompt": "p"}), {},
                                ["record 0", "found 'prompt' without 'response'"]),
    "response_not_string": ("d.jsonl", jsonl({"prompt": "p", "response": ["r"]}), {},
                            ["record 0", "'response': expected a string, found an array"]),
    "empty_file": ("d.jsonl", "", {}, ["empty"]),
    "whitespace_jsonl": ("d.jsonl", " \n\n\t\n", {}, ["empty"]),
    "whitespace_txt": ("d.txt", "  \n\n  \n", {}, ["empty"]),
    "txt_not_utf8": ("d.txt", garbage(), {}, ["expected UTF-8 text"]),
    "csv_without_text_column": ("d.csv", "a,b\n1,2\n", {}, ["record 0", "found keys ['a', 'b']"]),
    "csv_not_utf8": ("d.csv", garbage(), {}, ["expected UTF-8 text"]),
    "parquet_random_bytes": ("d.parquet", garbage(), {}, ["could not parse as parquet"]),
    "json_single_object": ("d.json", json.dumps({"data": [{"text": "a"}]}), {}, ["record 0", "found keys ['data']"]),
    "json_array_of_strings": ("d.json", json.dumps([{"text": "a"}, "b"]), {}, ["record 1", "found a string"]),
    "json_a_number": ("d.json", "3", {}, ["expected a JSON array of record objects, found a number"]),
    "json_broken_array": ("d.json", '[\n{"text": "a"},\n{"text": }\n]', {}, ["line 3", "could not parse as json"]),
    "dir_without_dataset_info": ("d", lambda d: d.mkdir(), {}, ["directory without dataset_info.json"]),
    "saved_dataset_corrupt_arrow": ("d", corrupt_saved_dataset, {}, ["could not read the saved dataset"]),
    "unsupported_extension": ("d.xml", "<a/>", {}, ["unsupported data file type '.xml'"]),
    "missing_file": ("nope.jsonl", None, {}, ["data file not found"]),
    "responses_truncated_away": ("d.jsonl", jsonl({"prompt": "p" * 40, "response": "r"}), {"seq_len": 16},
                                 ["no training examples", "seq_len=16", "truncated away"]),
    "text_shorter_than_a_block": ("d.jsonl", jsonl({"text": "ab"}), {}, ["no training examples", "one block"]),
    "seq_len_below_chat_prompt": ("d.jsonl", jsonl({"messages": [{"role": "user", "content": "question"},
                                                                 {"role": "assistant", "content": "a"}]}),
                                  {"seq_len": 8}, ["no training examples", "seq_len=8", "truncated away"]),
}


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def spec(source, **kw):
    return SimpleNamespace(**{"source": source, "seq_len": 64, "pack": True, "chat_template": True,
                              "max_records": None, "eval_size": 0, **kw})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_input_is_one_line_naming_the_file(case, tok, tmp_path):
    name, content, extra, fragments = CASES[case]
    path = tmp_path / name
    if callable(content):
        content(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DistilError) as info:
        load_examples(spec(str(path), **extra), tok, seed=0)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(str(path)), msg
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)


def test_unknown_builtin_corpus_names_the_key(tok):
    with pytest.raises(DistilError) as info:
        load_examples(spec("builtin:nothing"), tok, seed=0)
    from distil.readers import BUILTIN

    assert {"pydoc", "pydoc_qa", "python_qa"} <= set(BUILTIN)
    assert str(info.value) == ("data.source: unknown built-in corpus 'nothing'; available: "
                               + ", ".join(f"builtin:{name}" for name in BUILTIN))
