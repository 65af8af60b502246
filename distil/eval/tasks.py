"""Verifiable built-in tasks: questions with a gold answer, a gold chain of thought, and a checker.

A task makes questions from a seed, writes the gold step-by-step rationale for each, and checks what a model
wrote (`extract_answer` then `==`). Methods that learn from teacher-written text (SeqKD, CoT distillation with
rejection sampling, synthetic data) and the generation metrics (`distil/eval/generation.py`) use them. Recipes
name a task from `TASKS` (a `TaskName` literal), never an import path.

**Multi-step arithmetic** (`Arithmetic`): integer expressions over `+ - *` with parentheses, e.g.

    prompt    Compute (12-3)*4+5. Work step by step, one operation per line, then write the final answer
              on its own line as '#### <integer>'.
    response  12-3=9
              9*4=36
              36+5=41
              #### 41

The rationale evaluates one operation per line in the order a person would (innermost parentheses first,
`*` before `+ -`, left to right); a negative intermediate is written in parentheses when it is an operand
(`(-3)*4=-12`), so every line is itself a valid expression. The answer line is `#### <integer>` (GSM8K's
marker). `prompt_style="bare"` asks with the expression alone (`(12-3)*4+5=`), the short form that character-
level tiny models learn fastest; the response is the same.

Calibration knobs (all on `Arithmetic`, validated on construction): operand count (`min_operands`..
`max_operands`, = the number of steps + 1), digits per operand (`min_digits`..`max_digits`; the digit count is
uniform, then the operand is uniform among the integers with that many digits, never 0), `operators`,
`parentheses` (False: flat expressions such as `3+4*5`, precedence still applies), `negative` (False:
questions with a negative intermediate or answer are redrawn). Steps and digits set the difficulty: every
operand adds a line to the rationale, and `*` of two k-digit numbers gives up to 2k digits.

Calibration (the issue asks that a student trained on gold answers only stay clearly below a teacher trained on
gold CoT). Task `sum3`, `recipes/arithmetic_teacher.yaml`: a 2-layer, hidden-64 Llama from scratch (122k params,
character tokenizer that starts every text with BOS), hard labels on `builtin:sum3_text` (3,800 train-side
questions with their gold CoT as whole texts, so it also learns to write questions), 6,000 steps of batch 64, lr
3e-3 (19 min on the shared machine at load ~7). Greedy accuracy on 200 eval questions: 74.5% (pass@8 83.5%; it
writes a well-formed sum3 question in 199 of 200 samples from BOS at T = 1). The first version of this teacher
(prompt tokens masked, no BOS) reached 49.6% on 500 questions, and the same model trained the same way on gold
answers only (`builtin:sum3_answers`) 1.2% (pass@8 12.0%). A smaller student (2 layers, hidden 48) on gold CoT
reached 14.6% after 2,500 steps: the CoT jump comes after ~1,500-2,000 steps, so short student budgets show little.
Earlier measurement (../shared/reference/environment-facts.md, a standalone loop, three integers in 10-999): 2-4
layer tiny Llamas reach 95-99% with gold CoT in 8 CPU minutes on some seeds and stay <= 1.8% on answers only.

**Train/eval split** (`Arithmetic.split`): a question belongs to the eval side iff the SHA-256 of its text
falls in the first `eval_fraction` of the hash range. So no eval question can appear in any train set of
any seed or size (decontamination by construction, for every task with the same `eval_fraction`); within a
side questions are deduplicated, and each side is the first n distinct questions of its kind in the seeded
stream, so the eval set does not change with the train size.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, Union

from distil.errors import DistilError

ANSWER_MARKER = "####"

# -- answer extraction --------------------------------------------------------------------------------------------

# Markers a model may put before its final answer; the canonical one is '####'. Case-insensitive.
_MARKERS = re.compile(r"####|\bfinal answer\b\s*(?:is)?\s*:?|\banswer\s*(?:is|:)|\\boxed\s*\{", re.IGNORECASE)
# A number: thousands groups with commas (1,234,567) or plain digits, then an optional decimal part; never the
# tail of a longer number ('3.14' is one number, not 3 and 14). A leading '-', '+' or Unicode minus is a sign only
# where it cannot be a binary operator: not after a word character or a closing bracket ('10-3' holds 10 and 3;
# '= -3' and '(-3)' hold -3).
_BODY = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?!\d)"
_NUMBER = re.compile(rf"(?:(?<![\w)\]])([-+\u2212]))?(?<![\d.])({_BODY})")
# Right after a marker: optional decoration (spaces, ':', '=', '$', '*', '\boxed{'), a sign that may be spaced
# from its digits ('#### - 42'), the number, and then no arithmetic operator ('Answer: 3 + 4 = 7' is not 3).
# The optional parts never overlap (no two adjacent quantifiers can both match a space), so a long run of spaces
# cannot make the match backtrack quadratically.
_AFTER_MARKER = re.compile(rf"[\s:=$*]*(?:\\boxed\s*\{{\s*)?(?:([-+\u2212])\s*)?({_BODY})"
                           rf"(?!\s*[-+*/=^\u2212\u00d7\u00f7])")

Number = Union[int, float]


def _to_number(sign: str, digits: str) -> Number:
    value: Number
    body = digits.replace(",", "")
    if "." in body:
        whole, frac = body.split(".")
        value = int(whole) if not frac.strip("0") else float(body)  # '41.00' is the integer 41
    else:
        value = int(body)
    return -value if sign in ("-", "\u2212") else value


def extract_answer(text: object) -> Number | None:
    """The final number a model wrote, or None when there is none (never raises).

    Rules, in order:
      1. Find the LAST answer marker ('####', 'answer:', 'answer is', 'final answer', '\\boxed{'; any case).
         a. A number right after it (after spaces, ':', '=', '$', '*'; a sign may be spaced: '#### - 42'),
            unless an arithmetic operator follows it ('Answer: 3 + 4 = 7' is not 3).
         b. Else the last number on the rest of the marker's line ('Answer: 3 + 4 = 7' -> 7).
         c. Else the first number after the marker in the rest of the text ('Answer:\\n\\n7').
      2. No marker, or nothing after it: the last number in the whole text.
      3. No number at all: None.
    Numbers: digits with optional thousands commas (1,234 -> 1234) and decimals (41.0 -> 41 as an int,
    41.5 -> 41.5 as a float); '-', '+' and the Unicode minus are signs where they cannot be a binary operator
    ('10-3' has the numbers 10 and 3; '= -3' has -3).
    """
    if not isinstance(text, str) or not text:
        return None
    try:
        return _extract(text)
    except (ValueError, OverflowError):  # a number too long for int() (Python refuses > 4,300 digits): garbage
        return None


def _extract(text: str) -> Number | None:
    markers = list(_MARKERS.finditer(text))
    if markers:
        rest = text[markers[-1].end():]
        m = _AFTER_MARKER.match(rest)
        if m:
            return _to_number(m.group(1) or "", m.group(2))
        line = rest.split("\n", 1)[0]
        found = list(_NUMBER.finditer(line))
        if found:
            return _to_number(found[-1].group(1) or "", found[-1].group(2))
        m = _NUMBER.search(rest)
        if m:
            return _to_number(m.group(1) or "", m.group(2))
    found = list(_NUMBER.finditer(text))
    if found:
        return _to_number(found[-1].group(1) or "", found[-1].group(2))
    return None


def verify(completion: object, gold: Number) -> bool:
    """True iff the answer extracted from `completion` equals `gold` (an unextractable answer is wrong)."""
    got = extract_answer(completion)
    return got is not None and got == gold


# -- examples ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One question of a task, with its gold rationale (the chain of thought, one step per line) and answer."""

    question: str
    prompt: str
    rationale: str
    answer: int

    def response(self, cot: bool = True) -> str:
        """What a perfect model writes: the rationale then '#### <answer>' (cot=False: the answer line only)."""
        final = f"{ANSWER_MARKER} {self.answer}"
        return f"{self.rationale}\n{final}" if cot and self.rationale else final

    def record(self, shape: Literal["prompt_response", "messages"] = "prompt_response", cot: bool = True) -> dict:
        """The example as a training record in one of the shapes `distil/data.py` reads."""
        response = self.response(cot)
        if shape == "prompt_response":
            return {"prompt": self.prompt, "response": response}
        if shape == "messages":
            return {"messages": [{"role": "user", "content": self.prompt},
                                 {"role": "assistant", "content": response}]}
        raise DistilError(f"task record shape: expected 'prompt_response' or 'messages', found {shape!r}")


# -- multi-step arithmetic -----------------------------------------------------------------------------------------

# An expression tree: an int leaf, or (operator, left, right).
Tree = Union[int, tuple]
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}

PROMPTS = {
    "instruct": ("Compute {q}. Work step by step, one operation per line, then write the final answer on its own "
                 "line as '#### <integer>'."),
    "bare": "{q}=",
}


def _render(tree: Tree) -> str:
    """The expression with the fewest parentheses that parse back to this exact tree (left-associative, * before
    + -): a left child needs them when it binds less tightly than its parent, a right child also when it binds
    equally ('a-(b-c)', 'a*(b*c)'), so the text's conventional evaluation order is the tree's."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    ltxt, rtxt = _render(left), _render(right)
    if not isinstance(left, int) and _PRECEDENCE[left[0]] < _PRECEDENCE[op]:
        ltxt = f"({ltxt})"
    if not isinstance(right, int) and _PRECEDENCE[right[0]] <= _PRECEDENCE[op]:
        rtxt = f"({rtxt})"
    return f"{ltxt}{op}{rtxt}"


def _evaluate(tree: Tree, steps: list[str]) -> int:
    """Post-order evaluation, left subtree first; appends one 'a op b=c' line per operation."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    a, b = _evaluate(left, steps), _evaluate(right, steps)
    c = _APPLY[op](a, b)
    operand = lambda v: f"({v})" if v < 0 else str(v)  # noqa: E731 - '(-3)*4', never '5--3'
    steps.append(f"{operand(a)}{op}{operand(b)}={c}")
    return c


def _has_negative(tree: Tree) -> bool:
    steps: list[str] = []
    _evaluate(tree, steps)
    return any(s.rsplit("=", 1)[1].startswith("-") for s in steps)


def _leaves(tree: Tree) -> list[int]:
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def _parse(text: str, operators: str) -> Tree | None:
    """An expression of non-negative integers, `operators` and parentheses -> its tree (left-associative, `*` before
    `+ -`: the order `_render` writes), or None for anything else (a recursive-descent parser of
        expr := term (('+'|'-') term)*;  term := atom ('*' atom)*;  atom := digits | '(' expr ')' )."""
    tokens = re.findall(r"\d+|[-+*()]|\S", text)
    if not tokens or "".join(tokens) != text or any(t.startswith("0") and len(t) > 1 for t in tokens
                                                   if t.isdigit()):
        return None  # spaces, other characters, or leading zeros ('007': never written by the task)
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def atom(depth: int) -> Tree | None:
        tok = peek()
        if tok is None or depth > 32:
            return None
        if tok.isdigit():
            return int(take())
        if tok == "(":
            take()
            inner = expr(depth + 1)
            if inner is None or peek() != ")":
                return None
            take()
            return inner
        return None

    def binary(ops: str, sub: Any, depth: int) -> Tree | None:
        left = sub(depth)
        while left is not None and peek() is not None and peek() in ops:
            op = take()
            right = sub(depth)
            left = None if right is None else (op, left, right)
        return left

    def term(depth: int) -> Tree | None:
        return binary("*" if "*" in operators else "", atom, depth)

    def expr(depth: int) -> Tree | None:
        return binary("".join(o for o in "+-" if o in operators), term, depth)

    tree = expr(0)
    return tree if tree is not None and pos == len(tokens) else None


def _bucket(question: str) -> float:
    """A position in [0, 1) from the SHA-256 of the question text: the same on every machine and Python."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2.0**64


@dataclass(frozen=True)
class Arithmetic:
    """Multi-step integer arithmetic (see the module docstring for the format and the knobs)."""

    name: str = "arithmetic"
    min_operands: int = 3
    max_operands: int = 4
    min_digits: int = 1
    max_digits: int = 2
    operators: str = "+-*"
    parentheses: bool = True
    negative: bool = True
    prompt_style: Literal["instruct", "bare"] = "instruct"
    eval_fraction: float = 0.2
    max_redraws: int = field(default=1000, repr=False)  # per question, for `negative=False`

    def __post_init__(self) -> None:
        def bad(key: str, expected: str, value: object) -> DistilError:
            return DistilError(f"task {self.name}: {key}: expected {expected}, found {value!r}")

        for key in ("min_operands", "max_operands", "min_digits", "max_digits"):
            value = getattr(self, key)
            low = 2 if "operands" in key else 1
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= (64 if "operands" in key
                                                                                           else 18):
                raise bad(key, f"an integer in [{low}, {64 if 'operands' in key else 18}]", value)
        if self.max_operands < self.min_operands:
            raise bad("max_operands", f">= min_operands ({self.min_operands})", self.max_operands)
        if self.max_digits < self.min_digits:
            raise bad("max_digits", f">= min_digits ({self.min_digits})", self.max_digits)
        if not isinstance(self.operators, str) or not self.operators or set(self.operators) - set(_PRECEDENCE):
            raise bad("operators", "a non-empty string of '+', '-', '*'", self.operators)
        if self.prompt_style not in PROMPTS:
            raise bad("prompt_style", f"one of {sorted(PROMPTS)}", self.prompt_style)
        if not isinstance(self.eval_fraction, (int, float)) or not 0.0 < self.eval_fraction < 1.0:
            raise bad("eval_fraction", "a number in (0, 1)", self.eval_fraction)

    # The task interface: extract / verify are the module's functions.
    extract = staticmethod(extract_answer)
    verify = staticmethod(verify)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(self.min_digits, self.max_digits)
        return rng.randint(10 ** (d - 1), 10**d - 1)

    def _tree(self, rng: random.Random, n: int) -> Tree:
        if self.parentheses:
            # A random binary tree with n leaves: split the leaves at a uniform point, recursively.
            def grow(k: int) -> Tree:
                if k == 1:
                    return self._operand(rng)
                cut = rng.randint(1, k - 1)
                op = rng.choice(self.operators)
                return (op, grow(cut), grow(k - cut))

            return grow(n)
        # Flat: operands and operators in a row, parsed by precedence (products first, then sums left to right).
        values = [self._operand(rng) for _ in range(n)]
        ops = [rng.choice(self.operators) for _ in range(n - 1)]
        terms: list[Tree] = [values[0]]
        joins: list[str] = []
        for op, v in zip(ops, values[1:]):
            if op == "*":
                terms[-1] = ("*", terms[-1], v)
            else:
                joins.append(op)
                terms.append(v)
        tree = terms[0]
        for op, term in zip(joins, terms[1:]):
            tree = (op, tree, term)
        return tree

    def draw(self, rng: random.Random) -> Example:
        """One question from the stream `rng` (redrawn while it breaks `negative=False`)."""
        for _ in range(self.max_redraws):
            tree = self._tree(rng, rng.randint(self.min_operands, self.max_operands))
            if self.negative or not _has_negative(tree):
                return self.example(tree)
        raise DistilError(f"task {self.name}: negative: no question without a negative intermediate in "
                          f"{self.max_redraws} draws with operators {self.operators!r}; allow '+' or '*', fewer "
                          f"operands, or negative: true")

    def example(self, tree: Tree) -> Example:
        steps: list[str] = []
        answer = _evaluate(tree, steps)
        question = _render(tree)
        return Example(question=question, prompt=PROMPTS[self.prompt_style].format(q=question),
                       rationale="\n".join(steps), answer=answer)

    def parse_prompt(self, text: str) -> Example | None:
        """The Example a prompt of this task asks (its gold rationale and answer computed here), or None when `text`
        is not one: not in the task's prompt form, not an expression of its operators, not written the canonical
        way `draw` writes it (fewest parentheses), or with operands outside the task's digit range or count. This
        is how questions a model wrote (synthetic data: teacher-written questions) get a gold answer to verify."""
        head, _, tail = PROMPTS[self.prompt_style].partition("{q}")
        if not isinstance(text, str) or not text.startswith(head) or not text.endswith(tail) or \
                len(text) <= len(head) + len(tail) or len(text) > 400:
            return None
        question = text[len(head): len(text) - len(tail)]
        tree = _parse(question, self.operators)
        if tree is None or _render(tree) != question:
            return None
        leaves = _leaves(tree)
        if not self.min_operands <= len(leaves) <= self.max_operands or \
                any(not 10 ** (self.min_digits - 1) <= v < 10**self.max_digits for v in leaves):
            return None
        if not self.parentheses and "(" in question:
            return None
        if not self.negative and _has_negative(tree):
            return None
        return self.example(tree)

    def is_eval(self, question: str) -> bool:
        """Whether a question text belongs to the eval side (by its hash, whatever the seed)."""
        return _bucket(question) < self.eval_fraction

    def split(self, n_train: int, n_eval: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
        """(train, eval): the first n_train / n_eval distinct questions of each side in the stream of `seed`."""
        if n_train < 0 or n_eval < 0:
            raise DistilError(f"task {self.name}: expected sizes >= 0, found n_train={n_train}, n_eval={n_eval}")
        rng = random.Random(seed)
        sides: tuple[dict[str, Example], dict[str, Example]] = ({}, {})
        wanted = (n_train, n_eval)
        # Draws: a side needs n / (its share of the hash range) on average; 4x that, plus slack, before giving up.
        budget = int(4 * (n_train / (1 - self.eval_fraction) + n_eval / self.eval_fraction)) + 1000
        for _ in range(budget):
            if len(sides[0]) >= n_train and len(sides[1]) >= n_eval:
                break
            ex = self.draw(rng)
            side = int(self.is_eval(ex.question))
            if len(sides[side]) < wanted[side]:
                sides[side].setdefault(ex.question, ex)
        else:
            if len(sides[0]) < n_train or len(sides[1]) < n_eval:
                raise DistilError(
                    f"task {self.name}: found only {len(sides[0])}/{n_train} distinct train and {len(sides[1])}/"
                    f"{n_eval} eval questions in {budget} draws; these knobs allow too few distinct questions "
                    f"(raise max_operands or max_digits, or ask for fewer)")
        return list(sides[0].values()), list(sides[1].values())

    def records(self, n_train: int, n_eval: int, seed: int = 0,
                shape: Literal["prompt_response", "messages"] = "prompt_response",
                cot: bool = True) -> tuple[list[dict], list[dict]]:
        """`split` as training records (`Example.record`); eval records always carry the full gold rationale."""
        train, held = self.split(n_train, n_eval, seed)
        return [e.record(shape, cot) for e in train], [e.record(shape, True) for e in held]


Task = Arithmetic  # the one task kind so far; a second kind adds its class to this union

# name -> task. `arithmetic` is the default; `sum3` is the task measured on these CPUs (sums of three 2-3 digit
# numbers, bare prompt); `arithmetic_hard` has more steps and bigger operands, for teachers with more capacity.
TASKS: dict[str, Task] = {
    "arithmetic": Arithmetic(),
    "sum3": Arithmetic(name="sum3", min_operands=3, max_operands=3, min_digits=2, max_digits=3, operators="+",
                       parentheses=False, prompt_style="bare"),
    "arithmetic_hard": Arithmetic(name="arithmetic_hard", min_operands=4, max_operands=6, min_digits=1,
                                  max_digits=3),
}
TaskName = Literal["arithmetic", "sum3", "arithmetic_hard"]


# -- built-in data sources ---------------------------------------------------------------------------------------------

SOURCE_QUESTIONS = 4000  # train-side questions in each built-in data source


SOURCE_SUFFIXES = ("", "_answers", "_text")


def source_names() -> list[str]:
    """The `data.source: builtin:<name>` corpora of the tasks: `<task>` (gold CoT), `<task>_answers` (gold answer
    only) and `<task>_text` (question and gold CoT as one text: every token a target, so a model trained on it also
    learns to WRITE the task's questions; the teacher of synthetic data with teacher-written questions) for every
    task in TASKS."""
    return [f"{name}{suffix}" for name in TASKS for suffix in SOURCE_SUFFIXES]


def source_records(source: str) -> list[dict]:
    """`builtin:<task>` / `builtin:<task>_answers`: the first SOURCE_QUESTIONS train-side questions of the task's
    seed-0 stream as prompt/response records, with the gold rationale + answer line / the answer line only
    ('#### 41'). Train side only, by the hash split: no eval question of the task is in any recipe's data, whatever
    `data.eval_size` then holds out (those held-out examples are train-side questions the run does not train on);
    accuracy is measured on `task.split(0, n_eval)`. The two variants hold the same questions in the same order,
    so `data.max_records: N` gives both the same N questions."""
    suffix = next((s for s in SOURCE_SUFFIXES[1:] if source.endswith(s)), "")
    task = get_task(source[: len(source) - len(suffix)])
    train, _ = task.records(SOURCE_QUESTIONS, 0, seed=0, cot=suffix != "_answers")
    if suffix == "_text":  # the prompt as the model reads it, then the response: '436+760+20=436+760=1196\n...'
        return [{"text": r["prompt"] + r["response"]} for r in train]
    return train


def get_task(name: str, **knobs: object) -> Task:
    """The registered task `name`, with some knobs changed (`get_task("arithmetic", max_digits=3)`)."""
    if name not in TASKS:
        raise DistilError(f"task: expected one of {sorted(TASKS)}, found {name!r}")
    base = TASKS[name]
    known = {f.name for f in fields(base)} - {"name"}
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise DistilError(f"task {name}: unknown knob {unknown[0]!r}; expected one of {sorted(known)}")
    return replace(base, **knobs)
