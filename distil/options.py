"""The building block of every recipe section: a dataclass field with its documentation and range checks.

Core sections live in distil/recipe.py; each method's own section (its `options` dataclass) lives in the
method's file and is added to the recipe by the method registry (distil/methods/__init__.py). Both are
validated, explained (`distil validate --explain`) and fuzzed by the same code in recipe.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, **checks: Any) -> Any:
    """A dataclass field with documentation (`help`) and range checks (gt, ge, le, lt)."""
    meta = {"help": help, **checks}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)
