"""Teacher and student with different tokenizers: the logit-level methods are refused in one line naming both
tokenizers and the methods that work across them; SeqKD (text only) asks the teacher in its own format and teaches
the student in the student's; the evaluation has perplexities but no KL (the teacher cannot score other tokens)."""

import json

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE, encode_supervised
from distil.testing import char_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher = save_tiny_model(root / "teacher", seed=1, tokenizer=char_tokenizer(extra_chars="\u00e9\u00e8"),
                              num_hidden_layers=2, tie_word_embeddings=False, initializer_range=0.2)
    student = save_tiny_model(root / "student", seed=2, num_hidden_layers=2)
    return teacher, student


def _recipe(tmp_path, pair, method="seqkd", **extra):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "an answer."}) + "\n"
                            for i in range(8)))
    recipe = {"name": "x", "teacher": {"source": str(pair[0])},
              "student": {"source": str(pair[1]), "eos_token": "<|im_end|>"},
              "data": {"source": str(data), "seq_len": 96, "eval_size": 2},
              "distill": {"method": method}, "seqkd": {"max_new_tokens": 6},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
              "eval": {"batch_size": 2, "answers": 1, "max_new_tokens": 4}, "output": {"dir": str(tmp_path / "runs")}}
    for key, value in extra.items():
        section, leaf = key.split("__")
        recipe.setdefault(section, {})[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("method, extra", [("offline", {}), ("hard_labels", {}), ("seqkd", {"seqkd__token_kd": True})])
def test_logit_level_methods_are_refused_naming_both_tokenizers(tmp_path, pair, capsys, method, extra):
    path = _recipe(tmp_path, pair, method, **extra)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"teacher tokenizer '{pair[0]}' (108 tokens) and student tokenizer '{pair[1]}' (106 tokens) differ" in err
    assert f"method '{method}' compares token distributions" in err
    assert "methods that work across tokenizers: seqkd (without token-level KD)" in err
    assert not (tmp_path / "runs" / "x").exists()


def test_seqkd_across_tokenizers_asks_in_text_and_teaches_in_the_students_format(tmp_path, pair, capsys):
    from distil.models import load_model

    path = _recipe(tmp_path, pair)
    assert main(["run", str(path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "x-seqkd" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(isinstance(r["prompt"], str) for r in records)  # the question text
    teacher, student = load_model(str(pair[0])), load_model(str(pair[1]))
    # the teacher was asked through its own chat template: its greedy answer by hand
    r = records[0]
    ids = teacher.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    out = []
    with torch.no_grad():
        for _ in range(6):
            t = int(teacher.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == teacher.tokenizer.eos_token_id:
                break
            out.append(t)
    assert r["completion"] == teacher.tokenizer.decode(out, skip_special_tokens=True)
    assert r["prompt_tokens"] == len(ids)
    # no KL across vocabularies: perplexities of the student rows only; the teacher still answers (in text)
    record = json.loads((tmp_path / "runs" / "x" / "eval.json").read_text())
    assert set(record["results"]) == {"student (before)", "student (seqkd)"}
    assert all("kl" not in row and row["ppl"] > 0 for row in record["results"].values())
    assert set(record["generation"]["answers"]) == {"teacher", "student (before)", "student (seqkd)"}
    # `distil eval` takes the same path
    assert main(["eval", str(tmp_path / "runs" / "x")]) == 0


def test_text_examples_are_the_students_own_rendering_and_cut_answers_do_not_end():
    from distil.compat import turn_end
    from distil.methods.seqkd import text_examples

    tok = char_tokenizer()
    tok.eos_token = "<|im_end|>"
    end = turn_end(tok, chat=True)
    records = [{"prompt_index": 0, "completion": "yes", "finish_reason": "stop"},
               {"prompt_index": 1, "completion": "long", "finish_reason": "length"}]
    done, cut = text_examples(["q0", "q1"], records, tok, 256, True, end)
    assert done == {k: v for k, v in encode_supervised(tok, {"prompt": "q0", "response": "yes"}, "prompt_response",
                                                        True, "t").items()}
    targets = [v for v in done["labels"] if v != IGNORE]
    assert tok.decode(targets) == "yes<|im_end|>\n"
    assert tok.decode([v for v in cut["labels"] if v != IGNORE]) == "long"  # no turn end: it did not finish
    assert cut["input_ids"][-1] == tok.convert_tokens_to_ids("g")
