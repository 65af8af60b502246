"""Method `cot`: rejection sampling of the teacher's chain-of-thought samples, shortest-correct selection, the
distilling step-by-step examples and loss, and runs end to end through distil's pipeline."""

import json

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.methods import cot
from distil.testing import char_tokenizer


def rec(p, s, completion, tokens=None, finish="stop"):
    return {"prompt_index": p, "sample_index": s, "completion": completion, "finish_reason": finish,
            "completion_tokens": len(completion) if tokens is None else tokens}


# A stub teacher corpus: golds 5, 7, 9 and a question whose reference has no answer.
GOLDS = [5, 7, 9, None]
CORPUS = [
    rec(0, 0, "2+3=5\n#### 5"),  # right
    rec(0, 1, "2+3=6\n#### 6"),  # wrong
    rec(0, 2, "2+3=5\n#### 5", finish="length"),  # right but cut at max_new_tokens: never kept
    rec(0, 3, "no idea"),  # nothing to extract: wrong, no crash
    rec(1, 0, "3+4=7\n7+0=7\n#### 7"),  # right, longer
    rec(1, 1, "3+4=7\n#### 7"),  # right, shortest
    rec(1, 2, "3+4=7\n#### 7"),  # the same trace again
    rec(1, 3, "@@@ #### "),  # garbage: wrong
    rec(2, 0, "4+4=8\n#### 8"),  # every sample of question 2 is wrong
    rec(2, 1, "#### 10"),
    rec(2, 2, ""),
    rec(2, 3, "4+5=9 #### nine"),  # the marker is followed by no number: the last number in the text is 9...
    rec(3, 0, "#### 1"),  # no gold answer: never verified
]


def test_rejection_sampling_keeps_exactly_the_verified_samples():
    # Without dedup or a length cap, the kept samples are exactly those a person would verify by hand.
    sel = cot.select(CORPUS, GOLDS, shortest=0, unique=False)
    kept = {(r["prompt_index"], r["sample_index"]) for r in sel.kept}
    assert kept == {(0, 0), (1, 0), (1, 1), (1, 2), (2, 3)}  # (2, 3): '4+5=9' is the answer the extractor reads
    by_q = {q["prompt_index"]: q for q in sel.questions}
    assert [by_q[p]["generated"] for p in range(4)] == [4, 4, 4, 1]
    assert [by_q[p]["finished"] for p in range(4)] == [3, 4, 4, 1]
    assert [by_q[p]["verified"] for p in range(4)] == [1, 3, 1, 0]
    s = sel.summary()
    assert (s["questions"], s["generated"], s["verified"], s["kept"], s["no_gold"]) == (4, 13, 5, 5, 1)
    assert s["kept_per_question"] == pytest.approx(5 / 4)
    assert s["no_correct"] == 0.0  # the three questions with a gold answer each have a correct sample


def test_a_question_with_no_correct_sample_is_counted_and_keeps_nothing():
    corpus = [r for r in CORPUS if r["prompt_index"] != 2 or r["sample_index"] != 3]
    sel = cot.select(corpus, GOLDS)
    assert not any(r["prompt_index"] == 2 for r in sel.kept)
    assert sel.questions[2]["verified"] == 0 and sel.questions[2]["kept"] == 0
    assert sel.summary()["no_correct"] == pytest.approx(1 / 3)  # 1 of the 3 questions with a gold answer
    # a question the teacher never answered at all counts as one with no correct sample
    sel = cot.select([r for r in corpus if r["prompt_index"] == 0], [5, 7])
    assert sel.questions[1]["generated"] == 0 and sel.summary()["no_correct"] == 0.5


def test_unique_and_shortest_correct_selection():
    sel = cot.select(CORPUS, GOLDS, shortest=0, unique=True)
    q1 = [r for r in sel.kept if r["prompt_index"] == 1]
    assert [r["sample_index"] for r in q1] == [1, 0]  # the duplicate (1, 2) is dropped; shortest first
    sel = cot.select(CORPUS, GOLDS, shortest=1, unique=False)
    assert [(r["prompt_index"], r["sample_index"]) for r in sel.kept] == [(0, 0), (1, 1), (2, 3)]
    # ties in length go to the lower sample index; the length is the token count, not characters
    tied = [rec(0, 0, "#### 5 ", tokens=3), rec(0, 1, "#### 5", tokens=3), rec(0, 2, "5", tokens=1)]
    assert [r["sample_index"] for r in cot.select(tied, [5], shortest=2).kept] == [2, 0]


def test_trace_examples_mask_the_prompt_and_end_with_the_students_stop():
    tok = char_tokenizer()
    prompt = [tok.bos_token_id] + tok("2+3=", add_special_tokens=False)["input_ids"]
    (ex,) = cot.trace_examples([prompt], [rec(0, 0, "2+3=5\n#### 5")], tok, 64, [tok.eos_token_id])
    n = len(prompt)
    assert ex["input_ids"][:n] == prompt and ex["labels"][:n] == [IGNORE] * n
    assert tok.decode(ex["labels"][n:]) == "2+3=5\n#### 5</s>"


def test_step_by_step_examples_are_two_prefixed_tasks():
    tok = char_tokenizer()
    prompt = [tok.bos_token_id] + tok("2+3+4=", add_special_tokens=False)["input_ids"]
    kept = [rec(0, 0, "2+3=5\n5+4=9\n#### 9")]
    label, rationale = cot.step_by_step_examples([prompt], kept, [9], tok, 64, [tok.eos_token_id], "[label] ",
                                                 "[rationale] ")
    assert (label["task"], rationale["task"]) == (0, 1)
    for ex, prefix, target in ((label, "[label] ", "#### 9</s>"), (rationale, "[rationale] ", "2+3=5\n5+4=9</s>")):
        first = next(i for i, v in enumerate(ex["labels"]) if v != IGNORE)
        assert tok.decode(ex["input_ids"][:first]) == f"<s>{prefix}2+3+4="  # BOS, then the prefix, then the prompt
        assert all(v == IGNORE for v in ex["labels"][:first])
        assert tok.decode(ex["labels"][first:]) == target
    assert cot.split_trace("a=1\n#### 1", 1) == ("a=1", "#### 1")
    assert cot.split_trace("the answer is 1", 1) == ("the answer is 1", "#### 1")  # no marker: all rationale


def test_step_by_step_loss_is_label_ce_plus_lambda_rationale_ce():
    from distil.data import collate
    from distil.testing import tiny_llama_config
    from transformers import LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tok)))
    prompt = [tok.bos_token_id] + tok("2+3+4=", add_special_tokens=False)["input_ids"]
    examples = cot.step_by_step_examples([prompt], [rec(0, 0, "2+3=5\n5+4=9\n#### 9")], [9], tok, 64,
                                         [tok.eos_token_id], "[label] ", "[rationale] ")
    examples = [{**ex, "index": i} for i, ex in enumerate(examples)]
    batch = collate(examples, 0)
    n_items = float((batch["labels"][:, 1:] != IGNORE).sum())
    lam = 0.3
    with torch.no_grad():
        out = cot.build_step_by_step(torch.tensor([0, 1]), lam, len(tok))(model, batch, n_items)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    # by hand, in float64: -log softmax at every target position of each example, summed per task
    sums = []
    for row in range(2):
        logp = logits[row, :-1].log_softmax(-1)
        target = batch["labels"][row, 1:]
        sums.append(sum(-logp[t, int(y)] for t, y in enumerate(target) if y != IGNORE))
    assert float(out.loss) == pytest.approx(float((sums[0] + lam * sums[1]) / n_items), rel=1e-5)
    assert float(out.metrics["label_ce"]) == pytest.approx(float(sums[0] / n_items), rel=1e-5)
    assert float(out.metrics["rationale_ce"]) == pytest.approx(float(sums[1] / n_items), rel=1e-5)


# -- end to end --------------------------------------------------------------------------------------------------------

QUESTIONS = [(a, b) for a in (1, 2, 3) for b in (4, 5, 6)]  # 9 questions: 7 train + 2 held out


def _records(cot_text=True):
    out = []
    for a, b in QUESTIONS:
        rationale = f"{a}+{b}={a + b}\n" if cot_text else ""
        out.append({"prompt": f"{a}+{b}=", "response": f"{rationale}#### {a + b}"})
    return out


@pytest.fixture(scope="module")
def taught_teacher(tmp_path_factory):
    """A tiny teacher that has learned the stub task (gold CoT, through distil's own hard-labels recipe), so that
    most of its samples verify and some do not."""
    root = tmp_path_factory.mktemp("cot-teacher")
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    recipe = {"name": "teacher", "student": {"source": "config:tiny-llama-char", "config": {"hidden_size": 64,
                                                                                           "intermediate_size": 128}},
              "data": {"source": str(data), "seq_len": 32, "eval_size": 1, "chat_template": False},
              "distill": {"method": "hard_labels"},
              "train": {"steps": 120, "batch_size": 8, "lr": 1e-2, "warmup_steps": 5, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(root / "runs")}}
    path = root / "teacher.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    return root / "runs" / "teacher" / "student", data


def _cot_recipe(tmp_path, taught_teacher, **cot_options):
    teacher, data = taught_teacher
    recipe = {"name": "c", "teacher": {"source": str(teacher)},
              "student": {"source": "config:tiny-llama-char"},
              "data": {"source": str(data), "seq_len": 32, "eval_size": 2, "chat_template": False},
              "distill": {"method": "cot"}, "cot": {"n": 4, "temperature": 1.0, "max_new_tokens": 16, **cot_options},
              "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "cot.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_end_to_end_rejection_sampled_traces_are_what_the_student_learns(tmp_path, taught_teacher, capsys):
    from distil.eval.tasks import verify

    path = _cot_recipe(tmp_path, taught_teacher)
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    samples = [json.loads(x) for x in (tmp_path / "runs" / "c-cot" / "teacher.jsonl").read_text().splitlines()]
    assert len(samples) == 7 * 4 and "28 generated" in out
    prov = json.loads((tmp_path / "runs" / "c" / "cot.json").read_text())
    # recount from the corpus: the provenance says what rejection sampling did, question by question
    tok = char_tokenizer()
    golds = {q["prompt_index"]: q["gold"] for q in prov["questions"]}
    for s in samples:  # each question's gold is its reference's answer: a + b of the prompt 'a+b='
        a, b = tok.decode(s["prompt"], skip_special_tokens=True).rstrip("=").split("+")
        assert golds[s["prompt_index"]] == int(a) + int(b)
    verified = [s for s in samples
                if s["finish_reason"] == "stop" and verify(s["completion"], golds[s["prompt_index"]])]
    unique = {(s["prompt_index"], s["completion"]) for s in verified}
    assert prov["summary"]["generated"] == 28 and prov["summary"]["verified"] == len(verified)
    assert prov["summary"]["kept"] == len(unique) > 0  # cot.unique: one copy of identical traces
    no_correct = sum(q["verified"] == 0 for q in prov["questions"]) / 7
    assert prov["summary"]["no_correct"] == pytest.approx(no_correct, abs=1e-4)
    assert f"{no_correct:.1%} of the questions have no correct sample" in out
    rows = [json.loads(x) for x in (tmp_path / "runs" / "c" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["ce"] > 0 for r in rows)


def test_golds_come_from_the_references_and_answer_only_references_work(tmp_path, taught_teacher):
    """The gold answer is read from each reference response: '#### 5' alone verifies as well as a full CoT."""
    tok = char_tokenizer()
    from distil.data import build_examples

    for records in (_records(True), _records(False)):
        examples = build_examples(records, tok, 32, pack=False, chat_template=False)
        assert [cot.reference_answer(e, tok) for e in examples] == [a + b for a, b in QUESTIONS]


def test_token_kd_and_step_by_step_train_end_to_end(tmp_path, taught_teacher, capsys):
    path = _cot_recipe(tmp_path, taught_teacher, token_kd=True)
    assert main(["run", str(path), "distill.alpha=0.5"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "c" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 and r["ce"] > 0 for r in rows)
    # the samples are reused (same teacher, parameters and prompts), the run is new
    capsys.readouterr()
    assert main(["run", str(path), "cot.token_kd=false", "cot.step_by_step=true", "cot.rationale_weight=0.5",
                 "--overwrite"]) == 0
    assert "28 kept from an earlier run, 0 generated" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "runs" / "c" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["label_ce"] > 0 and r["rationale_ce"] > 0
        assert r["loss"] == pytest.approx(r["label_ce"] + 0.5 * r["rationale_ce"], rel=1e-5)


def test_a_teacher_that_never_verifies_is_one_line(tmp_path, taught_teacher, tiny_teacher, capsys):
    path = _cot_recipe(tmp_path, taught_teacher)
    assert main(["run", str(path), f"teacher.source={tiny_teacher}"]) == 2  # a random teacher: no sample verifies
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rejection sampling kept no trace" in err, err
    assert not (tmp_path / "runs" / "c").exists()


def test_references_without_answers_are_refused(tmp_path, taught_teacher, capsys):
    path = _cot_recipe(tmp_path, taught_teacher)
    data = tmp_path / "prose.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{c}?", "response": "no number here"}) + "\n" for c in "abcdef"))
    assert main(["run", str(path), f"data.source={data}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "found no number in any reference" in err, err


def test_bad_options_are_one_line(tmp_path, taught_teacher, capsys):
    path = _cot_recipe(tmp_path, taught_teacher)
    for overrides, needle in ((["cot.n=0"], "cot.n: expected a value > 0"),
                              (["cot.temperature=0"], "cot.n: greedy samples"),
                              (["cot.shortest=-1"], "cot.shortest: expected a value >= 0"),
                              (["cot.step_by_step=true", "cot.token_kd=true"], "cot.token_kd: the teacher never saw"),
                              (["cot.step_by_step=true", "cot.label_prefix=' '"], "cot.label_prefix: expected a non"),
                              (["cot.step_by_step=true", "cot.rationale_prefix='[label] '"], "different from")):
        assert main(["validate", str(path), *overrides]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert main(["validate", str(path), "cot.temperature=0", "cot.n=1"]) == 0
