"""Every recipe key, core sections and method sections alike, answers a wrong value with one DistilError line
that names the key path, never another exception (the recipe is untrusted input)."""

import random

import pytest

from distil.errors import DistilError
from distil.recipe import Recipe, leaf_keys, recipe_from_dict

BAD_VALUES = ["a string", 3, -1, 2.5, float("inf"), float("nan"), True, None, [1, "x"], {"k": 1}, 2**70]


def _nested(path, value):
    keys = path.split(".")
    tree = {"teacher": {"source": "x"}}
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return tree


LEAVES = leaf_keys(Recipe)


def test_method_sections_are_fuzzed_too():
    assert any(p.startswith("cache.") for p in LEAVES) and "distill.method" in LEAVES


@pytest.mark.parametrize("path", LEAVES)
def test_every_key_refuses_wrong_values_in_one_line(path):
    rng = random.Random(path)  # seeded per key: the same cases on every run
    for value in rng.sample(BAD_VALUES, len(BAD_VALUES)):
        try:
            recipe_from_dict(_nested(path, value), "r.yaml")
        except DistilError as exc:
            msg = str(exc)
            assert "\n" not in msg and msg.startswith("r.yaml: "), msg
            continue
        # accepted: then it must be a value of the key's own type that passed its range checks
        recipe = recipe_from_dict(_nested(path, value), "r.yaml")
        node = recipe
        for k in path.split("."):
            node = getattr(node, k)
        assert node == value or (isinstance(value, int) and node == float(value)), (path, value, node)
