"""Typed option sections from untrusted input: the field every recipe section is made of (`option`), the
conversion of YAML values into those dataclasses with errors that name the file and the key path, `key=value`
overrides, and a YAML reader that refuses a mapping key written twice.

Core sections live in distil/recipe.py; each method's own section (its `options` dataclass) lives in the
method's file and is added to the recipe by the method registry (distil/methods/__init__.py). Both are
validated, explained (`distil validate --explain`) and fuzzed by this same code.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from distil.errors import DistilError


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field with documentation (`help`) and range checks (gt, ge, le, lt)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Building dataclasses from untrusted dicts, with errors that name the file and the key path.


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " (or null)"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(value: Any, tp: Any, where: str, path: str) -> Any:
    """Check `value` against the annotation `tp`; return the converted value or raise DistilError."""
    origin = typing.get_origin(tp)
    bad = DistilError(f"{where}: {path}: expected {_type_name(tp)}, found {_found(value)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, where, path)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and type(None) in typing.get_args(tp):
            return None
        if len(args) == 1:  # Optional[X]: X's own error is the most precise one
            return _convert(value, args[0], where, path)
        for arg in args:
            try:
                return _convert(value, arg, where, path)
            except DistilError:
                pass
        raise bad
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise DistilError(f"{where}: {path}: expected {_type_name(tp)}, found {_found(value)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_convert(v, item, where, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        if not -2**63 <= value < 2**63:  # torch, numpy and the JSON of checkpoints hold 64 bits at most
            raise DistilError(f"{where}: {path}: expected an integer that fits in 64 bits, found {_found(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string; accept it as the number it is
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):  # .inf / .nan validate every range check or none, then training diverges
            raise DistilError(f"{where}: {path}: expected a finite number, found {_found(value)}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported recipe type {tp}")  # a bug in distil, not user input


#: Range checks of fields whose dataclass declares none: a seed must be a valid seed for Python's, numpy's and
#: torch's generators (numpy takes 0 <= seed < 2**32; torch 64 bits, and data order seeds with seed * 1_000_003).
def _check_range(value: Any, meta: dict, where: str, path: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    rules = {"gt": (lambda v, b: v > b, "> {}"), "ge": (lambda v, b: v >= b, ">= {}"),
             "lt": (lambda v, b: v < b, "< {}"), "le": (lambda v, b: v <= b, "<= {}")}
    for key, (ok, text) in rules.items():
        if key in meta and not ok(value, meta[key]):
            raise DistilError(f"{where}: {path}: expected a value {text.format(meta[key])}, found {_found(value)}")


def _build(cls: type, data: dict, where: str, prefix: str = "", base: dict | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = dict(base or {})
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(fields)}"
            raise DistilError(f"{where}: {path}: unknown key{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict) and fields[key].default_factory is not None:
            # A section starts from its default (e.g. student.source = 'teacher'), then the file's keys.
            default = fields[key].default_factory()
            base = {f.name: getattr(default, f.name) for f in dataclasses.fields(tp)}
            converted = _build(tp, value, where, path, base)
        else:
            converted = _convert(value, tp, where, path)
        _check_range(converted, dict(fields[key].metadata), where, path)
        kwargs[key] = converted
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003). The value is parsed as YAML (safely)."""
    if "=" not in text:
        raise DistilError(f"override {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise DistilError(f"override {text!r}: expected key.path=value")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw != "" else ""  # a SafeLoader
    except _DuplicateKey as exc:
        raise DistilError(f"override {text!r}: {key}.{exc.key}: expected each key once, found it twice") from None
    except RecursionError:
        raise DistilError(f"override {text!r}: the value is nested too deeply") from None
    except yaml.YAMLError as exc:
        raise DistilError(f"override {text!r}: the value is not valid YAML ({str(exc).splitlines()[0]})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = value
    return data


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: str, first: Any, again: Any):
        super().__init__(key)
        self.key, self.first, self.again = key, first.line + 1, again.line + 1


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.safe_load`'s loader (same tags, same values), except that a mapping key written twice is an error:
    plain safe_load silently keeps the last one, so `lr: 1e-4 ... lr: 3e-4` ran with whichever came second."""

    def construct_document(self, node: Any) -> Any:
        stack, seen = [(node, "")], set()
        while stack:  # iterative, and each node once: aliases share nodes (no blow-up, no cycles)
            item, path = stack.pop()
            if id(item) in seen:
                continue
            seen.add(id(item))
            if isinstance(item, yaml.MappingNode):
                first: dict = {}
                for key_node, value_node in item.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: explicit keys may override
                        stack.append((value_node, path))
                        continue
                    if not isinstance(key_node, yaml.ScalarNode):
                        continue
                    name = f"{path}.{key_node.value}" if path else str(key_node.value)
                    ident = (key_node.tag, key_node.value)
                    if ident in first:
                        raise _DuplicateKey(name, first[ident], key_node.start_mark)
                    first[ident] = key_node.start_mark
                    stack.append((value_node, name))
            elif isinstance(item, yaml.SequenceNode):
                stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item.value))
        return super().construct_document(node)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise DistilError(f"{path}: recipe file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # safe: a SafeLoader
    except _DuplicateKey as exc:
        raise DistilError(f"{path}: {exc.key}: expected each key once, found it at line {exc.first} and again at "
                          f"line {exc.again}") from None
    except RecursionError:
        raise DistilError(f"{path}: expected a recipe, found YAML nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise DistilError(f"{path}: invalid YAML{pos}: {problem}") from None
    except UnicodeDecodeError:
        raise DistilError(f"{path}: expected a UTF-8 YAML file, found undecodable bytes") from None
