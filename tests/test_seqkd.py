"""Method `seqkd` (Kim & Rush 2016): the teacher's answers to the training prompts replace the references."""

import json

import torch
import yaml

from distil.cli import main
from distil.data import IGNORE


def _recipe(tmp_path, tiny_teacher, **seqkd):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "a reference answer"}) + "\n"
                            for i in range(8)))
    recipe = {"name": "s", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher", "layers": [0, 3]},
              "data": {"source": str(data), "seq_len": 64, "eval_size": 2, "chat_template": False},
              "distill": {"method": "seqkd"}, "seqkd": {"max_new_tokens": 6, **seqkd},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _greedy(model, ids, steps):
    """The teacher's greedy answer, by hand: argmax of the full forward, one token at a time (no KV cache)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == 2:  # the char tokenizer's EOS
                break
            out.append(nxt)
            ids.append(nxt)
    return out


def test_the_student_learns_the_teachers_greedy_answers(tmp_path, tiny_teacher, capsys):
    from distil.methods import seqkd
    from distil.models import load_model

    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path)]) == 0
    corpus = tmp_path / "runs" / "s-seqkd" / "teacher.jsonl"
    records = [json.loads(x) for x in corpus.read_text().splitlines()]
    assert len(records) == 6 and all(r["finish_reason"] in ("stop", "length") for r in records)  # 8 - 2 eval
    assert "6 generated" in capsys.readouterr().out
    teacher = load_model(str(tiny_teacher))
    r = records[0]
    answer = _greedy(teacher.model, r["prompt"], 6)
    assert teacher.tokenizer(r["completion"], add_special_tokens=False)["input_ids"] == answer
    # the examples the student trains on: prompt masked, the teacher's answer (+ EOS if it stopped) as targets
    examples = seqkd.teacher_examples([r["prompt"]], [{**r, "prompt_index": 0}], teacher.tokenizer, 64)
    ex = examples[0]
    n = len(r["prompt"])
    assert ex["input_ids"][:n] == r["prompt"] and all(v == IGNORE for v in ex["labels"][:n])
    assert ex["labels"][n:] == answer + ([2] if r["finish_reason"] == "stop" else [])


def test_a_rerun_reuses_the_answers_and_other_parameters_are_refused(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path)]) == 0
    corpus = tmp_path / "runs" / "s-seqkd" / "teacher.jsonl"
    before = corpus.read_bytes()
    capsys.readouterr()
    assert main(["run", str(path), "--overwrite"]) == 0  # the run dir is replaced, the answers are kept
    assert "6 kept from an earlier run, 0 generated" in capsys.readouterr().out
    assert corpus.read_bytes() == before
    assert main(["run", str(path), "--overwrite", "seqkd.max_new_tokens=7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_new_tokens" in err and "or set seqkd.dir to keep both" in err
    assert corpus.read_bytes() == before


def test_stop_strings_reach_the_teachers_generation(tmp_path, tiny_teacher):
    path = _recipe(tmp_path, tiny_teacher, stop=["zz", "\n\n"])
    assert main(["run", str(path)]) == 0
    corpus = tmp_path / "runs" / "s-seqkd" / "teacher.jsonl"
    records = [json.loads(x) for x in corpus.read_text().splitlines()]
    assert records and all(r["params"]["stop"] == ["zz", "\n\n"] for r in records)
    assert not any("zz" in r["completion"] or "\n\n" in r["completion"] for r in records)


def test_text_data_has_no_prompts_and_is_refused(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    data = yaml.safe_load(path.read_text())
    data["data"] = {"source": "builtin:pydoc", "max_records": 6, "seq_len": 32, "eval_size": 2}
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    assert "method 'seqkd' needs prompts" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "s").exists()


def test_word_and_sequence_kd_trains_on_the_teachers_logits_too(tmp_path, tiny_teacher):
    path = _recipe(tmp_path, tiny_teacher, token_kd=True)
    assert main(["run", str(path), "distill.alpha=0.5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["kd"] > 0 and r["ce"] > 0 for r in rows)


def test_bad_options_are_one_line(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    for override, needle in (("seqkd.n=0", "seqkd.n: expected a value > 0"),
                             ("seqkd.backend=vllm", "seqkd.backend: expected one of 'hf', 'llamacpp'"),
                             ("seqkd.temperature=-1", "seqkd.temperature: expected a value >= 0"),
                             ("seqkd.n=2", "seqkd.n: greedy answers (seqkd.temperature: 0) are all the same"),
                             ("seqkd.num_beams=4 seqkd.backend=llamacpp", "seqkd.num_beams: beam search needs"),
                             ("seqkd.stop=['']", "seqkd.stop: expected non-empty strings")):
        assert main(["validate", str(path), *override.split()]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert main(["validate", str(path), "seqkd.n=2", "seqkd.temperature=0.7"]) == 0
    assert main(["validate", str(path), "seqkd.num_beams=4"]) == 0


def test_builtin_pydoc_qa_is_prompts_with_prose_references():
    from distil.readers import read_records

    records = read_records("builtin:pydoc_qa")
    assert len(records) > 50 and len({r["prompt"] for r in records}) == len(records)
    for r in records:
        assert r["prompt"].startswith("Explain the Python topic '") and 80 <= len(r["response"]) <= 600
        assert "***" not in r["response"] and "===" not in r["response"]  # prose, not an underlined title


def test_builtin_python_qa_adds_builtins_and_methods_answered_by_their_docstrings():
    from distil.readers import read_records

    qa, topics = read_records("builtin:python_qa"), read_records("builtin:pydoc_qa")
    assert qa[: len(topics)] == topics and len(qa) > len(topics) + 100
    assert len({r["prompt"] for r in qa}) == len(qa)  # no question twice
    by_prompt = {r["prompt"]: r["response"] for r in qa}
    # the answer is the docstring's first prose paragraph, not its signature line
    assert by_prompt["What does the Python built-in function `abs` do?"] == "Return the absolute value of the argument."
    assert by_prompt["What does the Python set method `clear` do?"] == "Remove all elements from this set."
    assert all(30 <= len(r["response"]) <= 600 for r in qa[len(topics):])
