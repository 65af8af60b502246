"""distil/eval/tasks.py: the answer extractor on what models write, the arithmetic generator's gold answers and
rationales against Python's own evaluation, determinism, the knobs, the hash split, records and the registry."""

import random
import re
import time
import typing
from dataclasses import replace

import pytest

from distil.errors import DistilError
from distil.eval.tasks import PROMPTS, TASKS, Arithmetic, TaskName, extract_answer, get_task, verify

# (what a model wrote, the answer a reader would take from it)
OUTPUTS = [
    ("12-3=9\n9*4=36\n36+5=41\n#### 41", 41),  # the documented format
    ("#### -17", -17),
    ("#### - 42", -42),  # a spaced sign right after the marker
    ("####-42", -42),
    ("The answer is 1,234.", 1234),  # thousands separators, sentence period
    ("ANSWER: 1,000,000", 1000000),
    ("Answer: 3 + 4 = 7", 7),  # an expression after the marker: its result, not its first operand
    ("The answer is: 24 - 10 = 14", 14),
    ("**Answer:** 42", 42),  # markdown
    ("The final answer is $\\boxed{42}$.", 42),  # LaTeX
    ("#### 41\n\nQuestion: what is 2+2?\nAnswer", 41),  # a model that runs on after its answer line
    ("#### 41 apples", 41),
    ("Answer: 7. Check: 7*2=14", 7),
    ("Answer:\n\n  -8", -8),  # the number on a later line
    ("#### 41 #### 43", 43),  # the last marker wins (a model correcting itself)
    ("36+5=41\n####", 41),  # marker with nothing after it: the last number of the text
    ("I think it's 12, no wait, 15", 15),  # no marker: the last number
    ("10-3", 3),  # a binary minus is not a sign
    ("x = -5", -5),
    ("The sum: (-3)*4=-12", -12),
    ("Step 1: 5*3=15\nStep 2: 15-20=-5\nSo the answer is -5", -5),
    ("answer is \u221212", -12),  # Unicode minus
    ("In 2024 we had 3 apples", 3),
    ("The result is 41.0", 41),  # an integral decimal is the integer
    ("#### $1,234.00", 1234),
    ("#### 2.5", 2.5),
    ("pi is 3.14 or so", 3.14),  # one number, not 3 and 14
    ("", None),
    ("I don't know.", None),
    ("#### ", None),
    ("@@@ ### ??? !! <|im_end|>", None),
    ("answer: seven", None),
]


@pytest.mark.parametrize("text,expected", OUTPUTS)
def test_extract_answer_realistic_outputs(text, expected):
    got = extract_answer(text)
    assert got == expected and type(got) is type(expected), (text, got)


def test_extract_never_raises_and_stays_linear():
    for thing in (None, 42, 4.5, b"#### 4", ["#### 4"], {"a": 1}):
        assert extract_answer(thing) is None
    rng = random.Random(0)
    alphabet = "0123456789 ,.-+*/=#:()$\\{}\nanswerANSWERboxed\u2212x"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        got = extract_answer(text)
        assert got is None or isinstance(got, (int, float)), text
    # Inputs built to make a careless regex backtrack quadratically: all must come back at once.
    start = time.perf_counter()
    for text in ("####" + " " * 20000 + "x", "answer" + " " * 20000, "1," * 20000, "-" * 20000, "9" * 20000 + " +",
                 "#### " + "1" * 20000 + " +", "final answer" + " " * 20000 + "is" + " " * 20000):
        extract_answer(text)
    assert time.perf_counter() - start < 1.0


def test_verify():
    assert verify("2+3=5\n#### 5", 5)
    assert not verify("2+3=5\n#### 6", 5)
    assert not verify("no idea", 5)  # unextractable = wrong, never a crash
    assert not verify(None, 5)
    assert verify("#### -5", -5) and not verify("#### 5", -5)


# -- the generator ---------------------------------------------------------------------------------------------------

SAFE = re.compile(r"^[0-9+\-*()]+$")


def python_value(expression: str) -> int:
    assert SAFE.match(expression), expression  # only digits, + - * and parentheses reach eval
    return eval(expression, {"__builtins__": {}}, {})


VARIANTS = [
    *TASKS.values(),
    Arithmetic(operators="-", parentheses=True, max_operands=5),
    Arithmetic(operators="*", min_digits=3, max_digits=4),
    Arithmetic(parentheses=False, max_operands=6),
    Arithmetic(negative=False, operators="+-", max_operands=5),
    Arithmetic(min_operands=2, max_operands=2, prompt_style="bare"),
]


@pytest.mark.parametrize("task", VARIANTS, ids=lambda t: repr(t)[:90])
def test_gold_answer_and_rationale_match_python(task):
    train, held = task.split(150, 30, seed=3)
    for ex in train + held:
        q = ex.question
        assert ex.answer == python_value(q)
        # Knobs: operand count and digits, the operators used, parentheses only when allowed.
        operands = re.findall(r"\d+", q)
        assert task.min_operands <= len(operands) <= task.max_operands
        assert all(task.min_digits <= len(o) <= task.max_digits and o[0] != "0" for o in operands)
        assert set(re.findall(r"[+\-*]", q)) <= set(task.operators)
        if not task.parentheses:
            assert "(" not in q
        # The rationale: one valid line per operation, each right by Python, the last giving the answer.
        lines = ex.rationale.split("\n")
        assert len(lines) == len(operands) - 1
        for line in lines:
            lhs, rhs = line.split("=")
            assert python_value(lhs) == int(rhs), line
        assert int(lines[-1].split("=")[1]) == ex.answer
        if not task.negative:
            assert all(int(line.split("=")[1]) >= 0 for line in lines)
        # The documented response format, read back by the extractor.
        assert ex.response().endswith(f"\n#### {ex.answer}")
        assert ex.response(cot=False) == f"#### {ex.answer}"
        assert task.verify(ex.response(), ex.answer) and not task.verify(ex.response(), ex.answer + 1)
        assert extract_answer(ex.response(cot=False)) == ex.answer
        assert q in ex.prompt
        if task.prompt_style == "bare":
            assert ex.prompt == q + "="


def test_rationale_order_and_rendering_by_hand():
    task = Arithmetic()
    ex = task.example(("+", ("*", ("-", 12, 3), 4), 5))
    assert ex.question == "(12-3)*4+5"
    assert ex.rationale == "12-3=9\n9*4=36\n36+5=41" and ex.answer == 41
    ex = task.example(("*", ("-", 3, 9), ("-", 2, ("-", 7, 1))))
    assert ex.question == "(3-9)*(2-(7-1))"  # a right child of equal precedence keeps its parentheses
    assert ex.rationale == "3-9=-6\n7-1=6\n2-6=-4\n(-6)*(-4)=24" and ex.answer == 24
    ex = task.example(("-", ("-", 8, 2), ("*", 3, 2)))
    assert ex.question == "8-2-3*2"  # no needless parentheses
    assert ex.response() == "8-2=6\n3*2=6\n6-6=0\n#### 0"


def test_generator_is_deterministic_and_pinned():
    task = TASKS["arithmetic"]
    a, b = task.split(40, 10, seed=0), task.split(40, 10, seed=0)
    assert a == b
    assert task.split(40, 10, seed=1)[0] != a[0]
    # Pinned: a change to the generator changes every eval set built from it, so it must be deliberate.
    assert [e.question for e in a[0][:4]] == PINNED_TRAIN
    assert [e.question for e in a[1][:2]] == PINNED_EVAL


PINNED_TRAIN = ["78*(2-70)", "9*66-17", "95*(52*6)", "4*(21*6)"]
PINNED_EVAL = ["61*71+9*5", "77+4*84"]


def test_split_never_overlaps_across_seeds_and_sizes():
    task = TASKS["arithmetic"]
    train, held = task.split(300, 60, seed=0)
    assert len(train) == 300 and len(held) == 60
    assert len({e.question for e in train}) == 300 and len({e.question for e in held}) == 60  # deduplicated
    eval_questions = {e.question for e in held}
    assert all(task.is_eval(q) for q in eval_questions) and not any(task.is_eval(e.question) for e in train)
    for seed in range(1, 4):  # no eval question is ever a training question, whatever the seed
        other_train, _ = task.split(300, 0, seed=seed)
        assert not eval_questions & {e.question for e in other_train}
    # Each side is the first n of its kind in the stream: the eval set does not move with the train size.
    assert task.split(10, 60, seed=0)[1] == held
    assert task.split(300, 5, seed=0)[0] == train
    # The eval side is eval_fraction of the questions drawn (a hash is as good as a coin here).
    rng = random.Random(7)
    share = sum(task.is_eval(task.draw(rng).question) for _ in range(3000)) / 3000
    assert abs(share - task.eval_fraction) < 0.03


def test_split_refuses_a_question_space_too_small():
    tiny = Arithmetic(min_operands=2, max_operands=2, min_digits=1, max_digits=1, operators="+")  # 81 questions
    with pytest.raises(DistilError, match="too few distinct questions"):
        tiny.split(500, 10)
    train, held = tiny.split(30, 5)  # a feasible request is served
    assert len(train) == 30 and len(held) == 5


def test_records_are_the_shapes_data_py_trains_on():
    from distil.data import record_kind

    task = TASKS["arithmetic"]
    train, held = task.records(5, 3, seed=0)
    ex = task.split(5, 3, seed=0)[0][0]
    assert train[0] == {"prompt": ex.prompt, "response": ex.response()}
    assert all(record_kind(r, "t") == "prompt_response" for r in train + held)
    chat, _ = task.records(5, 3, seed=0, shape="messages")
    assert chat[0] == {"messages": [{"role": "user", "content": ex.prompt},
                                    {"role": "assistant", "content": ex.response()}]}
    assert all(record_kind(r, "t") == "messages" for r in chat)
    answer_only, held_cot = task.records(5, 3, seed=0, cot=False)
    assert answer_only[0]["response"] == f"#### {ex.answer}"
    assert held_cot == held  # eval records keep the gold rationale
    with pytest.raises(DistilError, match="shape"):
        ex.record("text")


def test_registry_and_knob_errors():
    assert set(typing.get_args(TaskName)) == set(TASKS)
    assert all(task.name == name for name, task in TASKS.items())
    assert get_task("arithmetic", max_digits=3).max_digits == 3
    assert get_task("arithmetic") == TASKS["arithmetic"]
    with pytest.raises(DistilError, match="expected one of"):
        get_task("arithmetics")
    with pytest.raises(DistilError, match="unknown knob 'digits'"):
        get_task("arithmetic", digits=3)
    for knobs, key in [({"min_operands": 1}, "min_operands"), ({"max_operands": 2}, "max_operands"),
                       ({"max_digits": 0}, "max_digits"), ({"operators": "+/"}, "operators"),
                       ({"operators": ""}, "operators"), ({"eval_fraction": 1.0}, "eval_fraction"),
                       ({"prompt_style": "chatty"}, "prompt_style"), ({"min_digits": True}, "min_digits")]:
        with pytest.raises(DistilError, match=key):
            get_task("arithmetic", **knobs)
    with pytest.raises(DistilError, match="negative"):  # a-b-c-... >= 0 is (almost) never drawn
        Arithmetic(operators="-", parentheses=False, min_operands=12, max_operands=12, negative=False,
                   max_redraws=50).split(1, 0)


def test_records_tokenize_with_the_response_as_the_only_target():
    """distil/data.py trains on both shapes: the targets are exactly the gold response (+ end of turn)."""
    from distil.data import build_examples
    from distil.testing import char_tokenizer

    tok = char_tokenizer()
    train, _ = TASKS["arithmetic"].records(2, 0, seed=0)
    chat, _ = TASKS["arithmetic"].records(2, 0, seed=0, shape="messages")
    for records, template, end in [(train, False, tok.eos_token), (chat, True, "<|im_end|>\n")]:
        for record, ex in zip(records, build_examples(records, tok, seq_len=512, pack=False, chat_template=template)):
            targets = [i for i, label in zip(ex["input_ids"], ex["labels"]) if label != -100]
            response = record["response"] if "response" in record else record["messages"][1]["content"]
            assert tok.decode(targets) == response + end


# -- built-in data sources ---------------------------------------------------------------------------------------------


def test_builtin_sources_hold_train_side_questions_only():
    """`builtin:sum3` / `builtin:sum3_answers`: the task's train side (by hash), so no eval question is ever in a
    recipe's data; the same questions in both variants, gold CoT vs the answer line only."""
    from distil.eval.tasks import SOURCE_QUESTIONS, source_names
    from distil.readers import BUILTIN, TASK_SOURCES, read_records

    assert tuple(source_names()) == TASK_SOURCES and set(TASK_SOURCES) <= set(BUILTIN)
    task = TASKS["sum3"]
    cot, answers = read_records("builtin:sum3"), read_records("builtin:sum3_answers")
    assert len(cot) == len(answers) == SOURCE_QUESTIONS
    train, held = task.split(SOURCE_QUESTIONS, 500, seed=0)
    assert cot == [{"prompt": e.prompt, "response": e.response()} for e in train]
    assert answers == [{"prompt": e.prompt, "response": f"#### {e.answer}"} for e in train]
    questions = [r["prompt"][:-1] for r in cot]  # bare prompts: the question and '='
    assert not any(task.is_eval(q) for q in questions)
    assert not {e.prompt for e in held} & {r["prompt"] for r in cot}  # the eval split is disjoint
    assert read_records("builtin:arithmetic", max_records=3) == TASKS["arithmetic"].records(3, 0, seed=0)[0]
    # `_text`: the same questions as whole texts (prompt + gold CoT), for a teacher that also learns to ask
    assert read_records("builtin:sum3_text", max_records=2) == [{"text": r["prompt"] + r["response"]} for r in cot[:2]]


def test_text_source_makes_every_token_but_bos_a_target_and_ends_with_eos():
    """With the BOS-adding character tokenizer (the `config:tiny-llama-char` preset), a `_text` record trains the
    question too: [BOS] q = rationale #### a [EOS], every position a target except BOS."""
    from distil.data import IGNORE, load_examples
    from distil.recipe import DataSpec
    from distil.testing import char_tokenizer

    tok = char_tokenizer(add_bos=True)
    spec = DataSpec(source="builtin:sum3_text", chat_template=False, seq_len=64, eval_size=0, max_records=3,
                    pack=False)
    train, _ = load_examples(spec, tok, seed=0)
    texts = {e.prompt + e.response() for e in TASKS["sum3"].split(3, 0)[0]}
    assert {tok.decode(ex["input_ids"], skip_special_tokens=True) for ex in train} == texts
    for ex in train:
        ids = ex["input_ids"]
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert ex["labels"] == [IGNORE] + ids[1:]


def test_parse_prompt_reads_back_what_the_task_writes_and_nothing_else():
    """A model-written prompt gets its gold answer only when it is a question of the task, written the task's way."""
    sum3, arith = TASKS["sum3"], TASKS["arithmetic"]
    for task in (sum3, arith):
        train, held = task.split(200, 50, seed=1)
        assert all(task.parse_prompt(e.prompt) == e for e in train + held)
    ex = sum3.parse_prompt("12+34+56=")
    assert (ex.question, ex.rationale, ex.answer) == ("12+34+56", "12+34=46\n46+56=102", 102)
    assert arith.parse_prompt(arith.split(1, 0)[0][0].prompt.replace("Compute ", "Compute  ")) is None
    for bad in ("12+34=",  # two operands: sum3 has three
                "1+2+3=",  # one-digit operands: sum3's are 2-3 digits
                "12+34+5600=", "012+34+56=",  # a 4-digit operand; a leading zero the task never writes
                "12+34+56", "12+34+56==", "12 +34+56=", "(12+34)+56=",  # no '=', '=' twice, a space, extra parens
                "12*34+56=", "12+34+=", "=", "", None, "+" * 500):
        assert sum3.parse_prompt(bad) is None, bad
    flat = replace(arith, prompt_style="bare", parentheses=False)
    assert flat.parse_prompt("3+4*5=").answer == 23 and flat.parse_prompt("(3+4)*5=") is None
    assert arith.parse_prompt(PROMPTS["instruct"].format(q="(3+4)*5")).answer == 35
    assert arith.parse_prompt(PROMPTS["instruct"].format(q="3-(4-5)")).answer == 4
    assert arith.parse_prompt(PROMPTS["instruct"].format(q="(3-4)-5")) is None  # not canonical: '3-4-5'


def test_builtin_source_through_a_recipes_split_keeps_eval_questions_out(tmp_path):
    """Whatever data.eval_size holds out for the loss eval, the run's train examples hold no eval question."""
    from distil.data import load_examples
    from distil.recipe import DataSpec
    from distil.testing import char_tokenizer

    tok = char_tokenizer()
    spec = DataSpec(source="builtin:sum3_answers", chat_template=False, seq_len=32, eval_size=50, max_records=400)
    train, held = load_examples(spec, tok, seed=3)
    assert len(train) == 350 and len(held) == 50
    task = TASKS["sum3"]
    for ex in train + held:
        text = tok.decode(ex["input_ids"], skip_special_tokens=True)
        question = text.split("=")[0]
        assert not task.is_eval(question) and text.endswith(f"#### {python_value(question)}")
