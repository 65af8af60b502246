"""Prompt files: `.jsonl` ({"prompt": str} or {"messages": [{"role", "content"}, ...]} per line) or `.txt`
(one prompt per line). Blank lines are ignored; malformed lines are skipped and counted, so one bad
line in a file of thousands does not stop a long generation run; a file with no usable prompt is an
error (one line)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distil.errors import DistilError

Prompt = Any  # a str, a list of {"role": str, "content": str} messages, or a list of token ids (pre-rendered)


def is_ids(prompt: Any) -> bool:
    """A pre-rendered prompt: token ids, used as they are (the methods pass the prompt part of their examples)."""
    return isinstance(prompt, list) and len(prompt) > 0 and all(isinstance(t, int) and not isinstance(t, bool)
                                                                and t >= 0 for t in prompt)


@dataclass
class PromptFile:
    path: Path
    prompts: list[Prompt]
    skipped: int = 0
    first_bad: list[int] = field(default_factory=list)  # line numbers (1-based) of the first malformed lines

    def report(self) -> str:
        if not self.skipped:
            return ""
        return (f"{self.path}: skipped {self.skipped} malformed line(s) (first: line "
                f"{', '.join(map(str, self.first_bad))})")


def _messages_ok(messages: Any) -> bool:
    return (isinstance(messages, list) and len(messages) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in messages))


def parse_record(obj: Any) -> Prompt | None:
    """A prompt from one JSON record, or None when it has no usable prompt."""
    if not isinstance(obj, dict):
        return None
    if "ids" in obj:
        return list(obj["ids"]) if is_ids(obj["ids"]) else None
    if "messages" in obj:
        return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]] \
            if _messages_ok(obj["messages"]) else None
    prompt = obj.get("prompt")
    return prompt if isinstance(prompt, str) and prompt.strip() else None


def read_prompts(path: str | Path) -> PromptFile:
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"{path}: prompts file not found")
    if path.suffix not in (".jsonl", ".txt"):
        raise DistilError(f"{path}: prompts file: expected a .jsonl or .txt file, found {path.suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DistilError(f"{path}: prompts file: expected UTF-8 text, found byte {exc.object[exc.start]:#x} "
                          f"at offset {exc.start}") from None
    result = PromptFile(path, [])
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            result.prompts.append(line)
            continue
        try:
            prompt = parse_record(json.loads(line))
        except json.JSONDecodeError:
            prompt = None
        if prompt is None:
            result.skipped += 1
            if len(result.first_bad) < 3:
                result.first_bad.append(number)
        else:
            result.prompts.append(prompt)
    if not result.prompts:
        found = (f"{result.skipped} malformed line(s), first at line {result.first_bad[0]}" if result.skipped
                 else "no non-blank line")
        raise DistilError(f"{path}: no usable prompt: expected lines with {{\"prompt\": str}} or "
                          f"{{\"messages\": [{{\"role\", \"content\"}}, ...]}} (.jsonl) or one prompt per line "
                          f"(.txt), found {found}")
    return result


def as_messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
