"""Reading training data: files, `datasets` directories and built-in corpora -> a list of plain record dicts.

.jsonl/.json are read with the standard library (errors name the line), .csv/.parquet and save_to_disk
directories through `datasets`, .txt as blank-line-separated documents, `builtin:pydoc` from Python's own
documentation (no download). Every problem is one DistilError line naming the file (and line or record).
What the records mean (text, prompt/response, messages) is distil/data.py's business.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

from distil.errors import DistilError

READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def builtin_pydoc() -> list[dict]:
    """Python's own documentation topics (stdlib `pydoc_data`): ~465k characters of English prose."""
    from pydoc_data.topics import topics

    return [{"text": topics[k].strip()} for k in sorted(topics) if topics[k].strip()]


def builtin_pydoc_qa() -> list[dict]:
    """The same topics as prompt/response records: "Explain ... '<topic>'" -> the topic's first paragraph (at most
    ~600 characters, cut at a sentence end). A prompt set that needs no download, for the methods where the
    teacher writes the answers (SeqKD, synthetic data): their responses replace these references."""
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        text = topics[key].strip()
        if not text:
            continue
        paragraphs = [q.strip() for q in text.split("\n\n")]
        # the first paragraph of prose: not a title underlined with *** / ===, not a one-liner or a code block
        prose = [" ".join(q.split()) for q in paragraphs if not re.search(r"^[*=~-]{3,}$", q, re.M)
                 and not q.startswith((">>>", "   ")) and "::=" not in q]  # no titles, code or grammar rules
        prose = [q for q in prose if len(q) >= 80]
        if not prose:
            continue
        first = prose[0]
        if len(first) > 600:
            cut = first[:600].rfind(". ")
            first = first[: cut + 1] if cut > 0 else first[:600]
        name = key.replace("-", " ")
        records.append({"prompt": f"Explain the Python topic '{name}' in a few sentences.", "response": first})
    return records


def _first_prose(doc: str, skip_prefix: str = "") -> str:
    """A docstring's first prose paragraph (not a signature line), whitespace-normalised, <= ~600 characters."""
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        if len(text) >= 30 and not (skip_prefix and text.startswith(skip_prefix)):
            if len(text) > 600:
                cut = text[:600].rfind(". ")
                text = text[: cut + 1] if cut > 0 else text[:600]
            return text
    return ""


def builtin_python_qa() -> list[dict]:
    """`builtin:pydoc_qa` plus questions about Python's built-in functions and types and the methods of str, list,
    dict and set, each answered by its docstring's first prose paragraph: ~300 prompt/response records, no
    download. The chat prompt set of the demo and of the teacher-data methods. (Docstrings come from the running
    Python, so the references differ slightly between Python versions; the prompts are stable.)"""
    import builtins
    import inspect

    records = builtin_pydoc_qa()
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if name.startswith("_") or not callable(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
            continue
        answer = _first_prose(inspect.getdoc(obj) or "", skip_prefix=f"{name}(")
        if answer:
            kind = "type" if isinstance(obj, type) else "function"
            records.append({"prompt": f"What does the Python built-in {kind} `{name}` do?", "response": answer})
    for owner in (str, list, dict, set):
        for name in sorted(vars(owner)):
            if name.startswith("_"):
                continue
            answer = _first_prose(inspect.getdoc(getattr(owner, name)) or "", skip_prefix=f"{owner.__name__}.")
            if answer:
                records.append({"prompt": f"What does the Python {owner.__name__} method `{name}` do?",
                                "response": answer})
    return records


def builtin_task(source: str) -> list[dict]:
    """`builtin:sum3` / `builtin:sum3_answers` / `builtin:sum3_text` (and the other tasks'): a verifiable task's
    train-side questions with the gold chain of thought / the gold answer only / as whole texts (distil/eval/tasks.py,
    `source_records`)."""
    from distil.eval.tasks import source_records  # here: distil.eval imports distil.data, which imports this module

    return source_records(source)


# = distil.eval.tasks.source_names() (tested), static to avoid the import cycle
TASK_SOURCES = ("arithmetic", "arithmetic_answers", "arithmetic_text", "sum3", "sum3_answers", "sum3_text",
                "arithmetic_hard", "arithmetic_hard_answers", "arithmetic_hard_text")
BUILTIN = {"pydoc": builtin_pydoc, "pydoc_qa": builtin_pydoc_qa, "python_qa": builtin_python_qa,
           **{name: functools.partial(builtin_task, name) for name in TASK_SOURCES}}


def _one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (the user gets one line, never a dump)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: `datasets` wraps the reader's real error in a generic one."""
    seen = {id(exc)}
    while exc.__cause__ is not None and id(exc.__cause__) not in seen:
        exc = exc.__cause__
        seen.add(id(exc))
    return exc


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_records(source: str, max_records: int | None = None) -> list[dict]:
    """Records as plain dicts from a file, a save_to_disk directory or a built-in corpus."""
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN:
            raise DistilError(f"data.source: unknown built-in corpus {name!r}; available: "
                              + ", ".join(f"builtin:{n}" for n in BUILTIN))
        records = BUILTIN[name]()
    else:
        records = _read_path(Path(source))
    if max_records is not None:
        records = records[:max_records]
    if not records:
        raise DistilError(f"{source}: the dataset is empty (no records)")
    return records


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DistilError(f"{path}: expected UTF-8 text, found undecodable bytes at byte {exc.start}") from None


def _read_json(path: Path) -> list[dict]:
    """JSON lines (.jsonl), or a JSON array of objects (.json, which may also hold JSON lines).

    Read with the standard library rather than `datasets` so a bad line is reported by its number,
    and records keep exactly the keys they were written with.
    """
    text = _read_text(path)
    if not text.strip():
        raise DistilError(f"{path}: the dataset is empty (only whitespace)")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if text.lstrip()[:1] == "[":
                raise DistilError(f"{path}: line {exc.lineno}: could not parse as json ({exc.msg} at column "
                                  f"{exc.colno})") from None
            data = None  # several values: JSON lines in a .json file, as `datasets` accepts
        if isinstance(data, dict):
            data = [data]  # a single object is one record (as `datasets` reads it)
        if isinstance(data, list):
            for i, r in enumerate(data):
                if not isinstance(r, dict):
                    raise DistilError(f"{path}: record {i}: expected a JSON object, found {_json_type(r)}")
            return data
        if data is not None:
            raise DistilError(f"{path}: expected a JSON array of record objects, found {_json_type(data)}")
    records = []
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which JSON strings may hold raw.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DistilError(f"{path}: line {n}: could not parse as json ({exc.msg} at column {exc.colno})") from None
        if not isinstance(r, dict):
            raise DistilError(f"{path}: line {n}: expected a JSON object (one record per line), found {_json_type(r)}")
        records.append(r)
    return records


def _read_path(path: Path) -> list[dict]:
    if path.is_dir():
        if not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
                or (path / "state.json").exists()):
            raise DistilError(f"{path}: expected a data file or a directory saved with datasets' save_to_disk, "
                              f"found a directory without dataset_info.json")
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        try:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
            # Arrow files are memory-mapped: a corrupt one fails while rows are read, so read them here.
            return [dict(r) for r in ds]
        except Exception as exc:
            raise DistilError(f"{path}: could not read the saved dataset ({type(exc).__name__}: "
                              f"{_one_line(exc)})") from None
    if not path.is_file():
        raise DistilError(f"{path}: data file not found")
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise DistilError(f"{path}: unsupported data file type {path.suffix!r}; expected one of "
                          + ", ".join(READERS))
    if path.stat().st_size == 0:
        raise DistilError(f"{path}: the dataset is empty (0 bytes)")
    if kind == "json":
        return _read_json(path)
    if kind == "text":
        # One document per blank-line-separated paragraph group keeps prose together.
        return [{"text": t.strip()} for t in _read_text(path).split("\n\n") if t.strip()]
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    level = datasets.logging.get_verbosity()
    # datasets logs its own multi-line error before raising; the user gets our one line instead.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        return [dict(r) for r in ds]
    except Exception as exc:
        cause = _root_cause(exc)
        if isinstance(cause, UnicodeDecodeError):
            raise DistilError(f"{path}: expected UTF-8 text, found undecodable bytes at byte {cause.start}") from None
        raise DistilError(f"{path}: could not parse as {kind} ({_one_line(cause)})") from None
    finally:
        datasets.logging.set_verbosity(level)
