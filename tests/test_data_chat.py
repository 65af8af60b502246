"""Chat records: assistant masks exactly as the template renders them, or a one-line refusal."""

import sys
from pathlib import Path

import pytest

from distil.data import IGNORE, ROLES, build_examples
from distil.errors import DistilError
from distil.testing import char_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from helpers_data import (CHATML_WRONG_GENERATION, QWEN3_LIKE, QWEN3_LIKE_GENERATION,  # noqa: E402
                          QWEN3_LIKE_WRONG_GENERATION)

MSGS = [{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "u2"},
        {"role": "assistant", "content": "A2"}]
# Reasoning in both assistant turns: Qwen3-like templates drop it from every turn but the last.
THINK = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "<think>r</think>A1"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "<think>s</think>A2"}]


def tokenizer(template):
    tok = char_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def expected(tok, pieces, question):
    """Golden example from (text, is_target) pieces of the rendered conversation (the char tokenizer
    tokenizes piece by piece exactly as it does the whole), and what it asks (the last user message before
    the first assistant turn, printed by eval.answers)."""
    ids, labels = [], []
    for text, target in pieces:
        p = tok(text, add_special_tokens=False)["input_ids"]
        ids += p
        labels += p if target else [IGNORE] * len(p)
    return {"input_ids": ids, "labels": labels, "question": question}


CHATML_PIECES = [("<|im_start|>system\ns<|im_end|>\n<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n", False),
                 ("A1<|im_end|>\n", True), ("<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n", False),
                 ("A2<|im_end|>\n", True)]


@pytest.mark.parametrize("template", [None, QWEN3_LIKE, QWEN3_LIKE_GENERATION])
def test_multi_turn_masks_are_exactly_the_assistant_turns(template):
    # ChatML (distil.testing's), and the Qwen3-like templates on turns without reasoning, render
    # the same text: the masks must be today's, exactly.
    tok = tokenizer(template)
    (ex,) = build_examples([{"messages": MSGS}], tok, 256)
    assert ex == expected(tok, CHATML_PIECES, "u1")


def test_template_that_rewrites_earlier_turns_is_refused_in_one_line():
    tok = tokenizer(QWEN3_LIKE)
    with pytest.raises(DistilError) as info:
        build_examples([{"messages": MSGS}, {"messages": THINK}], tok, 256, source="chat.jsonl")
    msg = str(info.value)
    # Turn 1 renders with its reasoning when it is last and without it in the whole conversation:
    # the tokens between the partial renders' lengths would reach into the user's next turn.
    assert msg.startswith("chat.jsonl: record 1: messages[1]: the chat template renders the conversation up to")
    assert "{% generation %}" in msg and "\n" not in msg


def test_generation_markers_give_the_assistant_tokens_the_template_produced():
    tok = tokenizer(QWEN3_LIKE_GENERATION)
    (ex,) = build_examples([{"messages": THINK}], tok, 256)
    # The earlier turn's reasoning is not in the conversation, so it is not a target; the last's is.
    assert ex == expected(tok, [("<|im_start|>user\nu1<|im_end|>\n<|im_start|>assistant\n", False),
                                ("A1<|im_end|>\n", True),
                                ("<|im_start|>user\nu2<|im_end|>\n<|im_start|>assistant\n", False),
                                ("<think>s</think>A2<|im_end|>\n", True)], "u1")


@pytest.mark.parametrize("template, msgs", [(CHATML_WRONG_GENERATION, MSGS), (QWEN3_LIKE_WRONG_GENERATION, THINK)],
                         ids=["verifiable_turns", "rewritten_turns"])
def test_generation_markers_that_mark_user_turns_are_refused(template, msgs):
    # With verifiable turn boundaries every marked token must lie in an assistant turn; where the
    # template rewrites history, at least nothing before the first assistant turn may be marked.
    with pytest.raises(DistilError, match=r"^data: record 0: the chat template's \{% generation %\} markers "
                                          r"disagree with its assistant turns"):
        build_examples([{"messages": msgs}], tokenizer(template), 256)


def test_prompt_response_through_a_rewriting_template_never_targets_the_prompt():
    # One assistant turn, always the last: the Qwen3-like template keeps its reasoning both ways.
    tok = tokenizer(QWEN3_LIKE)
    (ex,) = build_examples([{"prompt": "q", "response": "<think>r</think>a"}], tok, 256)
    assert ex == expected(tok, [("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n", False),
                                ("<think>r</think>a<|im_end|>\n", True)], "q")


def test_unknown_role_is_refused_in_one_line():
    tok = tokenizer(None)
    msgs = [{"role": "user", "content": "u"}, {"role": "narrator", "content": "n"},
            {"role": "assistant", "content": "a"}]
    with pytest.raises(DistilError) as info:
        build_examples([{"messages": MSGS}, {"messages": msgs}], tok, 256, source="d.jsonl")
    assert str(info.value) == ("d.jsonl: record 1: messages[1].role: expected one of 'system', 'developer', "
                               "'user', 'assistant', 'tool', 'ipython', found 'narrator'")


def test_every_known_role_is_accepted_and_only_assistant_is_a_target():
    tok = tokenizer(None)
    assert ROLES == ("system", "developer", "user", "assistant", "tool", "ipython")
    msgs = [{"role": r, "content": r[:2].upper()} for r in ROLES]
    (ex,) = build_examples([{"messages": msgs}], tok, 512)
    assert tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE]) == "AS<|im_end|>\n"


def test_template_that_raises_is_bad_input():
    tok = tokenizer("{{ raise_exception('Conversation roles must alternate user/assistant') }}")
    with pytest.raises(DistilError, match=r"^data: record 0: the chat template could not render the conversation "
                                          r"\(TemplateError: Conversation roles must alternate user/assistant\)$"):
        build_examples([{"messages": MSGS}], tok, 256)
