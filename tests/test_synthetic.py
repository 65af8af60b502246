"""Method `synthetic`: the teacher writes a corpus (prompts file, topics, recipe prompts or a task), it is filtered,
saved (datasets dir + messages.jsonl + provenance.json) and learned; the eval scores the teacher's held-out answers."""

import json
from types import SimpleNamespace

import pytest
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.models import load_tokenizer

FILTERS = ["degenerate", "length", "repetition", "exact duplicates", "near duplicates", "contaminated"]


def _recipe(tmp_path, tiny_teacher, eval_enabled=False, **synthetic):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "a reference answer"}) + "\n"
                            for i in range(6)))
    recipe = {"name": "s", "teacher": {"source": str(tiny_teacher)},
              "student": {"source": "teacher", "layers": [0, 3], "eos_token": "<|im_end|>"},
              "data": {"source": str(data), "seq_len": 96, "eval_size": 2},
              "distill": {"method": "synthetic"},
              # a random teacher: sampled answers are random characters (greedy ones are newlines, see below)
              "synthetic": {"max_new_tokens": 8, "temperature": 1.0, "min_tokens": 1, **synthetic},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": eval_enabled}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _prompts(tmp_path, n=8, bad=("not json", json.dumps({"text": "no prompt"}))):
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": f"Tell me about thing number {i}."}) for i in range(n)]
    path.write_text("\n".join(lines[:3] + list(bad) + lines[3:]) + "\n")
    return path


def _jsonl(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_the_corpus_is_saved_reloadable_with_its_provenance(tmp_path, tiny_teacher, capsys):
    import datasets

    path = _recipe(tmp_path, tiny_teacher, eval_enabled=True, prompts=str(_prompts(tmp_path)))
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "prompts.jsonl: skipped 2 malformed line(s) (first: line 4, 5)" in out
    base = tmp_path / "runs" / "s-synthetic"
    prov = json.loads((base / "provenance.json").read_text())
    assert prov["prompts"] == {"source": str(tmp_path / "prompts.jsonl"), "count": 8, "malformed_lines_skipped": 2}
    assert prov["teacher"] == str(tiny_teacher) and prov["answers"]["temperature"] == 1.0 and prov["seed"] == 0
    assert list(prov["filters"]["removed"]) == FILTERS  # every filter ran, in order, keep_truncated is on
    assert prov["filters"]["total"] == 8
    kept = prov["filters"]["kept"]
    assert kept == 8 - sum(prov["filters"]["removed"].values()) and kept > 0
    corpus = datasets.load_from_disk(str(base / "corpus"))
    messages = [r["messages"] for r in _jsonl(base / "messages.jsonl")]
    assert len(corpus) == len(messages) == kept and corpus["messages"] == messages
    answers = {r["prompt_index"]: r for r in _jsonl(base / "teacher.jsonl")}
    for row, m in zip(corpus, messages):
        r = answers[row["prompt_index"]]
        assert m == [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
    # the eval scores every row on the teacher's answers to the 2 held-out prompts: their targets are the answer
    # tokens (one per character) and, where the teacher stopped, the turn end '<|im_end|>' '\n'
    held = _jsonl(base / "heldout.jsonl")
    assert len(held) == 2
    tokens = sum(len(r["completion"]) + 2 * (r["finish_reason"] == "stop") for r in held)
    results = json.loads((tmp_path / "runs" / "s" / "eval.json").read_text())["results"]
    assert set(results) == {"teacher", "student (before)", "student (synthetic)"}
    assert results["teacher"]["tokens"] == tokens != 2 * (len("a reference answer") + 2)


def test_training_examples_mask_the_prompt_and_end_a_cut_answer_without_its_turn_end():
    from distil.methods.synthetic import build_corpus_examples
    from distil.testing import char_tokenizer

    tok = char_tokenizer()
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    kept = [{"prompt": "Why?", "completion": "Because.", "finish_reason": "stop"},
            {"prompt": "How?", "completion": "Like th", "finish_reason": "length"}]
    for chat, end in ((True, [im_end] + ids("\n")), (False, [tok.eos_token_id])):
        spec = SimpleNamespace(seq_len=64, chat_template=chat)
        (stopped, cut), dropped = build_corpus_examples(kept, tok, spec, "corpus")
        assert dropped == 0
        for ex, answer, tail in ((stopped, "Because.", end), (cut, "Like th", [])):
            targets = [t for t in ex["labels"] if t != IGNORE]
            assert targets == ids(answer) + tail
            first = next(i for i, t in enumerate(ex["labels"]) if t != IGNORE)
            assert ex["input_ids"][first:first + len(answer)] == ids(answer)  # everything before it is the prompt
    spec = SimpleNamespace(seq_len=8, chat_template=True)  # the prompt fills seq_len: no target left
    assert build_corpus_examples(kept, tok, spec, "corpus") == ([], 2)


def test_an_interrupted_generation_resumes_without_duplicates(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, prompts=str(_prompts(tmp_path, bad=())))
    assert main(["run", str(path)]) == 0
    answers = tmp_path / "runs" / "s-synthetic" / "teacher.jsonl"
    whole = answers.read_bytes()
    lines = whole.splitlines(keepends=True)
    answers.write_bytes(b"".join(lines[:3]) + lines[3][:20])  # what kill -9 leaves: 3 lines and half of one
    capsys.readouterr()
    assert main(["run", str(path), "--overwrite"]) == 0
    assert "(3 kept from an earlier run, 5 generated)" in capsys.readouterr().out
    assert answers.read_bytes() == whole
    assert main(["run", str(path), "--overwrite", "synthetic.max_new_tokens=9"]) == 2  # another run's file
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "max_new_tokens" in err and answers.read_bytes() == whole


def test_a_corpus_filtered_to_nothing_is_one_line_with_the_counts(tmp_path, tiny_teacher, capsys):
    # greedy, the random teacher writes only newlines: every answer is degenerate
    path = _recipe(tmp_path, tiny_teacher, prompts=str(_prompts(tmp_path, bad=())), temperature=0.0)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "teacher.jsonl: synthetic: every sample was filtered out (8 samples: degenerate -8, length -0" in err
    assert "-> 0 kept)" in err
    assert not (tmp_path / "runs" / "s").exists()


def test_a_prompts_file_without_a_usable_line_is_one_line(tmp_path, tiny_teacher, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\nnot json\n')
    path = _recipe(tmp_path, tiny_teacher, prompts=str(bad))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.jsonl: no usable prompt" in err and "2 malformed line(s)" in err


def test_self_instruct_the_teacher_writes_the_questions_it_answers(tmp_path, tiny_teacher, capsys, monkeypatch):
    from distil.methods import synthetic

    topics = tmp_path / "topics.txt"
    topics.write_text("alpha\nbeta\nalpha\nquestion\n")  # 'question' is named in the held-out 'question N?'
    real = synthetic._Teacher.generate

    def fake_questions(self, prompts, params, out, what):
        if what != "questions written":
            return real(self, prompts, params, out, what)
        # what a good teacher replies: a label, the question, then chatter; one reply per (topic, template)
        topic = [p.split("'")[1] for p in prompts]
        out.write_text("".join(json.dumps({"completion": f"Sure. Question: What is {t}?\nIt is"}) + "\n"
                               for t in topic))
        return []

    monkeypatch.setattr(synthetic._Teacher, "generate", fake_questions)
    path = _recipe(tmp_path, tiny_teacher, topics=str(topics))
    assert main(["run", str(path)]) == 0
    base = tmp_path / "runs" / "s-synthetic"
    assert [r["prompt"] for r in _jsonl(base / "teacher.jsonl")] == ["What is alpha?", "What is beta?"]
    prov = json.loads((base / "provenance.json").read_text())
    assert prov["topics"] == {"source": str(topics), "read": 3, "named_in_held_out": 1, "used": 2}
    assert prov["templates"] == list(synthetic.TEMPLATES)
    # 2 topics x 3 templates: the same question thrice per topic
    assert prov["question_filters"] == {"total": 6, "removed": {"no question": 0, "degenerate": 0, "length": 0,
                                                                "exact duplicates": 4, "near duplicates": 0,
                                                                "contaminated": 0}, "kept": 2}


def test_self_instruct_with_a_teacher_that_asks_nothing_is_one_line(tmp_path, tiny_teacher, capsys):
    topics = tmp_path / "topics.txt"
    topics.write_text("lists\ndicts\nsets\n")
    path = _recipe(tmp_path, tiny_teacher, topics=str(topics), question_max_tokens=4)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "questions.jsonl: synthetic: every question the teacher wrote was " \
                                          "filtered out" in err and "no question -" in err


def test_builtin_topics_and_questions():
    import builtins

    from distil.methods.synthetic import clean_question, named_in, read_topics

    pydoc = read_topics("builtin:pydoc")
    assert "assert" in pydoc and "atom identifiers" in pydoc and len(pydoc) == len(set(pydoc)) > 50
    both = read_topics("builtin:pydoc, builtin:builtins")
    assert both[:len(pydoc)] == pydoc and "enumerate" in both and "zip" in both and not any(t.startswith("_")
                                                                                           for t in both)
    assert "json" in read_topics("builtin:stdlib") and hasattr(builtins, "len")
    asked = 'A beginner might ask: "What is the `assert` statement?"'
    assert clean_question(asked) == "What is the `assert` statement?"
    assert clean_question("Question: How does `a.b()` work?\nAnswer: ...") == "How does `a.b()` work?"
    assert clean_question("In Python, the for loop repeats.") == ""
    assert named_in("for", [["explain", "the", "for", "loop"]]) and not named_in("for loop", [["for", "the", "loop"]])


def test_a_task_keeps_only_answers_that_verify(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, task="sum3", max_prompts=4, min_tokens=0, max_repetition=1.0)
    assert main(["run", str(path), "data.chat_template=false"]) == 2  # random characters never sum three numbers
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "(4 samples: degenerate -" in err and "verifier -" in err
    # without chat templates in the data, the teacher is asked the bare prompt ('12+345+67=': one id per character)
    records = _jsonl(tmp_path / "runs" / "s-synthetic" / "teacher.jsonl")
    assert len(records) == 4 and all(r["prompt_tokens"] == len(r["prompt"]) for r in records)
    assert all(r["prompt"].endswith("=") for r in records)


def test_token_kd_trains_on_the_teachers_logits(tmp_path, tiny_teacher):
    path = _recipe(tmp_path, tiny_teacher, prompts=str(_prompts(tmp_path, bad=())), token_kd=True)
    assert main(["run", str(path), "distill.alpha=0.5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["kd"] > 0 and r["ce"] > 0 for r in rows)


@pytest.mark.parametrize("override, needle", [
    ("synthetic.n=2", "synthetic.n: greedy answers (synthetic.temperature: 0) are all the same"),
    ("synthetic.topics=builtin:nope", "synthetic.topics: expected one of builtin:pydoc, builtin:builtins, "
                                      "builtin:stdlib or a .txt file, found 'builtin:nope'"),
    ("synthetic.task=sum3", "synthetic.task: one seed-prompt source per recipe"),
    ("synthetic.max_tokens=2", "synthetic.min_tokens: expected <= synthetic.max_tokens (2), found 4"),
    ("synthetic.backend=vllm", "synthetic.backend: expected one of 'hf', 'llamacpp'"),
    ("synthetic.near_dup_threshold=0", "synthetic.near_dup_threshold: expected a value > 0"),
])
def test_bad_options_are_one_line_at_validation(tmp_path, tiny_teacher, capsys, override, needle):
    path = _recipe(tmp_path, tiny_teacher, topics="builtin:pydoc", temperature=0.0, min_tokens=4)
    assert main(["validate", str(path), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_validate_explains_the_section(capsys):
    assert main(["validate", "--explain"]) == 0
    out = capsys.readouterr().out
    for key in ("synthetic.topics", "synthetic.prompts", "synthetic.decontam_n", "synthetic.near_dup_threshold",
                "synthetic.token_kd", "synthetic.keep_truncated"):
        assert key in out
    assert main(["validate", "recipes/synthetic_chat.yaml"]) == 0


def test_without_a_prompt_source_the_recipes_training_prompts_are_used(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path)]) == 0
    base = tmp_path / "runs" / "s-synthetic"
    prompts = [r["prompt"] for r in _jsonl(base / "teacher.jsonl")]
    held = _jsonl(base / "heldout.jsonl")
    assert len(prompts) == 4 and len(held) == 2  # 6 records, data.eval_size 2
    # the held-out prompts (rendered ids) are the 2 questions missing from the training prompts
    tok = load_tokenizer(str(tiny_teacher))
    held_text = {tok.decode(r["prompt"]) for r in held}
    missing = {f"question {i}?" for i in range(6)} - set(prompts)
    assert len(missing) == 2 and all(any(q in h for h in held_text) for q in missing)
    assert json.loads((base / "provenance.json").read_text())["prompts"]["source"] == str(tmp_path / "qa.jsonl")


def test_task_questions_written_by_the_teacher_get_the_tasks_gold_answers(tmp_path, capsys, monkeypatch):
    """synthetic.task_questions: teacher: the teacher is sampled from BOS, stopped at '='; what parses as a sum3
    question and is on the train side of the hash split is asked back, verified against the task's own answer."""
    from distil.eval.tasks import TASKS
    from distil.methods import synthetic
    from distil.testing import char_tokenizer, save_tiny_model

    teacher = save_tiny_model(tmp_path / "teacher", tokenizer=char_tokenizer(add_bos=True), num_hidden_layers=4)
    task = TASKS["sum3"]
    (a, b), held = task.split(2, 1, seed=5)
    written = [(a.question, "stop"), (held[0].question, "stop"), ("12+34", "stop"), (a.question, "stop"),
               (b.question, "stop"), ("1+2+", "length")]
    seen = {}
    real = synthetic._Teacher.generate

    def fake_questions(self, prompts, params, out, what):
        if what != "questions written":
            return real(self, prompts, params, out, what)
        seen.update(prompts=prompts, params=params)
        out.write_text("".join(json.dumps({"completion": c, "finish_reason": f}) + "\n" for c, f in written))
        return []

    monkeypatch.setattr(synthetic._Teacher, "generate", fake_questions)
    path = _recipe(tmp_path, teacher, task="sum3", task_questions="teacher", question_temperature=1.0, max_prompts=6,
                   min_tokens=0, max_repetition=1.0)
    capsys.readouterr()  # saving the teacher's shards printed a progress bar
    assert main(["run", str(path), "data.chat_template=false"]) == 2  # a random teacher never sums correctly
    out, err = capsys.readouterr()
    assert seen["prompts"] == [[1]] and seen["params"].n == 6 and seen["params"].stop == ("=",)
    assert "synthetic: questions: 6 samples: not a question of the task -2, eval side of the split -1, exact " \
           "duplicates -1 -> 2 kept" in out
    asked = _jsonl(tmp_path / "runs" / "s-synthetic" / "teacher.jsonl")
    assert [r["prompt"] for r in asked] == [a.prompt, b.prompt]
    assert len(err.strip().splitlines()) == 1 and "(2 samples:" in err and "verifier -" in err


def test_task_questions_need_a_teacher_with_bos_and_sampling(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, task="sum3", task_questions="teacher", question_temperature=1.0)
    assert main(["run", str(path), "data.chat_template=false"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "synthetic.task_questions: teacher:" in err and "adds no BOS" in err
    for override, needle in (("synthetic.question_temperature=0", "greedy questions written from the start"),
                             ("synthetic.task=null", "expected synthetic.task to name one")):
        assert main(["validate", str(path), override]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
