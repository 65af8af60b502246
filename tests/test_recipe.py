"""Recipes: typed validation with file + key path in every error, overrides, bundled recipes."""

import pytest
import yaml

from distil.cli import bundled_recipes, main
from distil.errors import DistilError
from distil.recipe import Recipe, apply_overrides, explain, load_recipe, parse_override, recipe_from_dict


def test_every_bundled_recipe_validates():
    recipes = bundled_recipes()
    assert "demo" in recipes
    for name, path in recipes.items():
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe), name
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path}: a recipe starts with a comment saying what it does"


def test_defaults_and_types():
    r = recipe_from_dict({"teacher": {"source": "x"}, "train": {"lr": 1}})
    assert r.train.lr == 1.0 and isinstance(r.train.lr, float)
    assert r.distill.loss == "forward_kl" and r.student.source == "teacher"


def _err(data, where="r.yaml"):
    with pytest.raises(DistilError) as info:
        recipe_from_dict(data, where)
    return str(info.value)


def test_unknown_key_suggests():
    msg = _err({"teacher": {"source": "x"}, "train": {"learning_rate": 1e-3, "stpes": 3}})
    assert msg.startswith("r.yaml: train.")
    assert "unknown key" in msg


def test_unknown_key_did_you_mean():
    msg = _err({"teacher": {"source": "x"}, "train": {"stpes": 3}})
    assert msg == "r.yaml: train.stpes: unknown key; did you mean 'steps'?"


def test_wrong_type_names_key_and_found_value():
    msg = _err({"teacher": {"source": "x"}, "train": {"steps": "many"}})
    assert msg == "r.yaml: train.steps: expected an integer, found 'many'"


def test_negative_learning_rate():
    msg = _err({"teacher": {"source": "x"}, "train": {"lr": -0.001}})
    assert msg == "r.yaml: train.lr: expected a value > 0.0, found -0.001"


def test_literal_choice_suggests():
    msg = _err({"teacher": {"source": "x"}, "distill": {"loss": "reverse-kl"}})
    assert "distill.loss" in msg and "did you mean 'reverse_kl'" in msg


def test_bool_is_not_an_int_and_list_items_are_checked():
    assert "train.steps" in _err({"teacher": {"source": "x"}, "train": {"steps": True}})
    assert "student.layers[1]" in _err({"teacher": {"source": "x"}, "student": {"layers": [0, "a"]}})


def test_cross_field_checks():
    assert "teacher.source" in _err({})
    assert "student.layers" in _err({"teacher": {"source": "x"}, "student": {"layers": [1, 1]}})


def test_overrides_parse_yaml_values():
    assert parse_override("train.lr=0.5") == (["train", "lr"], 0.5)
    # YAML 1.1 reads 3e-4 as a string; float fields accept it as the number.
    assert recipe_from_dict(apply_overrides({"teacher": {"source": "x"}}, ["train.lr=3e-4"])).train.lr == 3e-4
    assert parse_override("student.layers=[0, 2]") == (["student", "layers"], [0, 2])
    data = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "distill.loss=jsd"])
    assert data == {"train": {"lr": 0.5}, "distill": {"loss": "jsd"}}
    with pytest.raises(DistilError):
        parse_override("train.lr")


def test_load_recipe_errors(tmp_path):
    with pytest.raises(DistilError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(DistilError, match=r"bad.yaml: invalid YAML at line \d+"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"teacher": {"source": "x"}}))
    with pytest.raises(DistilError, match="good.yaml: train.lr: expected a value > 0.0"):
        load_recipe(good, ["train.lr=-1"])


def test_yaml_is_loaded_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("teacher: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(DistilError, match="invalid YAML"):
        load_recipe(evil)


def _leaf_keys(cls, prefix=""):
    from distil.recipe import leaf_keys

    return leaf_keys(cls, prefix)


def test_explain_documents_every_key():
    lines = explain()
    keys = list(_leaf_keys(Recipe))
    assert {"train.lr", "distill.temperature", "student.layers", "data.seq_len", "eval.hard_label_baseline"} <= set(keys)
    for key in keys:  # one line per key: its type, its default and a sentence of help
        [line] = [ln for ln in lines if ln.startswith(f"  {key} (")]
        assert "; default " in line and len(line.split("): ", 1)[1]) > 10, line
    assert sum(ln.startswith("  ") for ln in lines) == len(keys)  # and no line for a key that does not exist


@pytest.mark.parametrize("content,needle", [
    ("teacher: {source: x}\ntrain: {stpes: 3}\n", "train.stpes: unknown key; did you mean 'steps'?"),
    ("teacher: {source: x}\ntrain: {lr: -1}\n", "train.lr: expected a value > 0.0"),
    ("teacher: {source: x\n", "invalid YAML"),
])
def test_cli_validate_bad_input_one_line_exit_2(tmp_path, capsys, content, needle):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_validate_ok_and_ls(capsys):
    assert main(["validate", "demo"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in bundled_recipes())
