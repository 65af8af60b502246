"""Compatibility pre-flight: can text the teacher writes be learned by this student, and will the student stop?

Teacher-written data (SeqKD, synthetic data, CoT) is rendered for the teacher, answered by the teacher, then
learned by the student in the student's own chat format. Three mismatches silently ruin such a run:

1. **Token ids cross tokenizers.** The teacher-data methods hand the teacher the prompts as the student's token
   ids (so prompt rendering, BOS and the split are `distil/data.py`'s). Different vocabularies would feed the
   teacher garbage: refused, naming both tokenizers.
2. **A chat teacher, a template-less student.** The student would learn the teacher's answers as plain text
   continuations, then be prompted through a chat template it never saw (or none): refused, unless the recipe
   gives the student the teacher's template (`student.chat_template: teacher`) or turns templates off
   (`data.chat_template: false`). Every special token the student's template writes must be ONE token of the
   student's vocabulary (a `<|im_start|>` split into 7 pieces is not a turn marker).
3. **A student that never learns to stop.** Every learned answer ends with the tokens the student's template
   closes an assistant turn with (`turn_end`, e.g. `<|im_end|>\\n`). If the first of them is not a token the
   student stops at (its EOS or its generation config's EOS ids), the trained student writes the turn end and
   keeps going: the classic base student under an instruct teacher's template. Refused, naming the token and
   the student's EOS, unless the recipe says which token ends the student's answers (`student.eos_token`,
   saved with the student and written into its GGUF).
4. **Two BOS conventions.** Gemma starts every sequence with BOS and scores absurdly without it (perplexity 33 vs
   1,826 on one sentence); SmolLM2 adds none. When text crosses tokenizers each model reads it through its own
   tokenizer, with its own BOS (`tok(text)` adds it; data.py's `ensure_bos` for rendered examples), so any pair
   works. When token ids cross (one vocabulary: the teacher reads the student's ids) a teacher that adds BOS needs
   a student that adds the same, or it would read every example without the BOS it needs: `check_bos` refuses,
   naming both tokenizers. A
   teacher whose template renders no BOS although its tokenizer adds one would be asked its prompts without it
   (generation renders prompts through the template as they are): refused by `check_teacher_data`.
"""

from __future__ import annotations

from typing import Any

from distil.errors import DistilError

_SENTINEL = "\u2063distil-answer\u2063"  # invisible separators: no template alters or trims them


def name(tok: Any) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


def has_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def stop_ids(tok: Any, model: Any = None) -> list[int]:
    """The ids generation stops at: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids: list[int] = []
    gen = getattr(model, "generation_config", None) if model is not None else None
    for value in (getattr(tok, "eos_token_id", None), getattr(gen, "eos_token_id", None)):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return ids


def adds_bos(tok: Any) -> int | None:
    """The BOS id the tokenizer puts in front of a text by itself (Gemma, Llama), or None (SmolLM2, Qwen)."""
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a")["input_ids"] if bos is not None else []
    return int(bos) if ids and ids[0] == bos else None


def _bos_name(tok: Any, bos: int | None) -> str:
    return f"starts every sequence with BOS {tok.convert_ids_to_tokens(bos)!r}" if bos is not None else "adds no BOS"


def check_bos(teacher_tok: Any, student_tok: Any, where: str = "teacher and student") -> None:
    """Token ids cross (the teacher reads the student's ids): a teacher whose tokenizer adds a BOS must find that
    BOS in the student's ids, i.e. the student's tokenizer adds the same one (module docstring, 4). One line naming
    both tokenizers otherwise. The other way round (the student adds a BOS the teacher's tokenizer does not) the
    teacher reads one extra structural token at position 0, a token of its own vocabulary that is never a target:
    allowed."""
    bt, bs = adds_bos(teacher_tok), adds_bos(student_tok)
    if bt is not None and bt != bs:
        raise DistilError(f"{where}: the teacher's tokenizer ({name(teacher_tok)}) {_bos_name(teacher_tok, bt)} and "
                          f"the student's ({name(student_tok)}) {_bos_name(student_tok, bs)}; the teacher reads the "
                          f"student's token ids, so expected one BOS convention, found two (a model trained with BOS "
                          f"scores absurdly without it); give the student the teacher's tokenizer (student.tokenizer)")


def turn_end(tok: Any, chat: bool) -> list[int]:
    """The token ids that follow an assistant answer in the student's format: what the chat template writes after
    an assistant message's content (`<|im_end|>\\n` for ChatML), or the EOS for plain text."""
    if not (chat and has_template(tok)):
        if tok.eos_token_id is None:
            raise DistilError(f"tokenizer {name(tok)}: has no EOS token; a learned answer could never end")
        return [int(tok.eos_token_id)]
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tok.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # a template that raises on a plain two-turn conversation
        raise DistilError(f"tokenizer {name(tok)}: its chat template cannot render a user/assistant exchange "
                          f"({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") from None
    if _SENTINEL not in text:
        raise DistilError(f"tokenizer {name(tok)}: its chat template drops the assistant's answer; cannot tell "
                          f"how an answer ends")
    tail = text.split(_SENTINEL, 1)[1]
    ids = list(tok(tail, add_special_tokens=False)["input_ids"]) if tail else []
    if not ids:  # a template that writes nothing after an answer: the answer ends with the EOS
        return turn_end(tok, chat=False)
    return ids


def _template_specials(template: str, tok: Any) -> list[str]:
    """The special/added tokens of `tok` that appear literally in a template string."""
    added = set(getattr(tok, "all_special_tokens", []) or []) | set(tok.get_added_vocab() if hasattr(tok, "get_added_vocab") else {})
    return sorted(t for t in added if t and t in template)


def check_teacher_data(teacher_tok: Any, student_tok: Any, *, student_model: Any = None, chat: bool = True,
                       where: str = "teacher-written data", ids_cross: bool = True) -> list[int]:
    """The pre-flight before teacher-written text is learned. Returns the student's turn-end ids (what every
    learned answer ends with); raises DistilError with one line naming both tokenizers otherwise. `ids_cross`:
    the teacher is handed the student's token ids (False: the method passes text, as SeqKD across tokenizers)."""
    t, s = name(teacher_tok), name(student_tok)
    if ids_cross and teacher_tok.get_vocab() != student_tok.get_vocab():
        raise DistilError(f"{where}: the teacher's tokenizer ({t}, {len(teacher_tok)} tokens) and the student's "
                          f"({s}, {len(student_tok)} tokens) differ; the teacher is given the student's token ids, "
                          f"so expected one vocabulary, found two")
    if chat and has_template(teacher_tok) and not has_template(student_tok):
        raise DistilError(f"{where}: the teacher ({t}) answers in a chat template and the student ({s}) has none, "
                          f"so it would learn answers without the turn markers it will be prompted with; set "
                          f"student.chat_template: teacher (and student.eos_token) or data.chat_template: false")
    if ids_cross:
        check_bos(teacher_tok, student_tok, where)
    elif chat and has_template(teacher_tok) and adds_bos(teacher_tok) is not None:
        rendered = teacher_tok.apply_chat_template([{"role": "user", "content": "Q"}], add_generation_prompt=True,
                                                   tokenize=False)
        if teacher_tok(rendered, add_special_tokens=False)["input_ids"][:1] != [adds_bos(teacher_tok)]:
            raise DistilError(f"{where}: the teacher ({t}) needs BOS at position 0 (its tokenizer adds "
                              f"{teacher_tok.bos_token!r}) but its chat template renders none, so it would be asked "
                              f"every prompt without it; expected a template that writes BOS, or "
                              f"data.chat_template: false (plain text gets the tokenizer's BOS)")
    chat = chat and has_template(student_tok)
    if chat:
        specials = set(_template_specials(student_tok.chat_template, teacher_tok))
        specials |= set(_template_specials(student_tok.chat_template, student_tok))
        for token in sorted(specials):
            pieces = student_tok(token, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1:
                raise DistilError(f"{where}: the student's tokenizer ({s}) splits its chat template's special token "
                                  f"{token!r} into {len(pieces)} pieces; expected one token (the teacher's {t} "
                                  f"has it as one)")
    end = turn_end(student_tok, chat)
    stops = stop_ids(student_tok, student_model)
    if end[0] not in stops:
        shown = ", ".join(repr(student_tok.convert_ids_to_tokens(i)) for i in stops) or "none"
        raise DistilError(f"{where}: the student ({s}) ends an answer with {student_tok.convert_ids_to_tokens(end[0])!r} "
                          f"(its chat template's turn end) but stops only at {shown}: trained on the teacher's "
                          f"answers it would never stop; set student.eos_token: "
                          f"{student_tok.convert_ids_to_tokens(end[0])!r} (saved with the student and its GGUF)")
    return end
