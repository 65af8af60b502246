"""Malformed input of every kind, through every verb: one line on stderr, exit code 2, nothing touched.

Each case builds its broken file (recipe, model directory, GGUF, cache, run directory) in a tmp dir, drives the
CLI in-process (`distil.cli.main`) and checks: return code 2; exactly one non-empty stderr line, starting with
`distil: error:` and naming what is wrong; no traceback; and that nothing that existed changed (byte for byte,
hidden files included) and nothing new appeared (no run directory, no partial or temporary file).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import struct
from pathlib import Path

import pytest
import yaml

from distil.cli import main


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must fail with exit code 2 and one `distil: error:` line (returned)."""
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert "Traceback" not in captured.err, captured.err
    assert rc == 2, (rc, captured.err)
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("distil: error: "), lines[0]
    return lines[0]


def tree(root: Path) -> dict[str, str]:
    """Every file and directory under root (hidden ones too) -> sha256 of its bytes ('dir' for directories)."""
    root = Path(root)
    if not root.exists():
        return {}
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------------------------
# Recipes: `distil validate` (nothing is loaded) and `distil run` (nothing is written)

BASE = "name: t\nteacher: {source: some/dir}\n"

RECIPES = {  # id -> (YAML text, what the error line must contain)
    "not-a-mapping": ("- name: t\n- teacher: x\n", "expected a mapping of recipe sections at the top level"),
    "a-scalar": ("just words\n", "expected a mapping of recipe sections at the top level, found 'just words'"),
    "unknown-key": (BASE + "train: {lrr: 0.1}\n", "train.lrr: unknown key; did you mean 'lr'?"),
    "unknown-section": (BASE + "trian: {lr: 0.1}\n", "trian: unknown key; did you mean 'train'?"),
    "wrong-type": (BASE + "train: {steps: many}\n", "train.steps: expected an integer, found 'many'"),
    "section-not-a-mapping": (BASE + "train: 5\n", "train: expected a mapping, found 5"),
    "duplicate-top-key": ("name: a\nteacher: {source: x}\nname: b\n",
                          "name: expected each key once, found it at line 1 and again at line 3"),
    "duplicate-nested-key": (BASE + "train:\n  lr: 0.1\n  steps: 3\n  lr: 0.2\n",
                             "train.lr: expected each key once, found it at line 4 and again at line 6"),
    "duplicate-flow-key": (BASE + "distill: {alpha: 0.5, alpha: 0.7}\n", "distill.alpha: expected each key once"),
    "lr-inf": (BASE + "train: {lr: .inf}\n", "train.lr: expected a finite number, found inf"),
    "temperature-inf": (BASE + "distill: {temperature: .inf}\n", "distill.temperature: expected a finite number"),
    "temperature-nan": (BASE + "distill: {temperature: .nan}\n", "distill.temperature: expected a finite number"),
    "weight-decay-inf": (BASE + "train: {weight_decay: .inf}\n", "train.weight_decay: expected a finite number"),
    "max-grad-norm-nan": (BASE + "train: {max_grad_norm: .NaN}\n", "train.max_grad_norm: expected a finite"),
    "lr-overflowing-exponent": (BASE + "train: {lr: 1e999}\n", "train.lr: expected a finite number"),
    "betas-inf": (BASE + "train: {betas: [0.9, .inf]}\n", "train.betas[1]: expected a finite number"),
    "seed-beyond-64-bits": (BASE + f"seed: {2**64}\n", "seed: expected an integer that fits in 64 bits"),
    "seed-beyond-32-bits": (BASE + f"seed: {2**32}\n", "seed: expected a value < 4294967296"),
    "seed-negative": (BASE + "seed: -1\n", "seed: expected a value >= 0, found -1"),
    "steps-huge": (BASE + f"train: {{steps: {10**30}}}\n", "train.steps: expected an integer that fits in 64 bits"),
    "invalid-yaml": (BASE + "train: {lr: [1, 2}\n", "invalid YAML at line"),
    "nested-too-deep": ("[" * 5000, "nested too deeply"),
    "not-utf8": (b"name: \xff\xfe\n", "expected a UTF-8 YAML file"),
    "python-tag": (BASE + "x: !!python/object/apply:os.system ['true']\n", "invalid YAML"),
}


@pytest.mark.parametrize("case", list(RECIPES))
def test_malformed_recipe(case, tmp_path, capsys):
    text, needle = RECIPES[case]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    line = one_line_error(capsys, ["validate", path])
    assert needle in line and str(path) in line


OVERRIDES = {  # id -> (override, what the error line must contain)
    "not-a-number": ("train.lr=abc", "train.lr: expected a number, found 'abc'"),
    "unknown-section": ("x.y=1", "x: unknown key"),
    "empty-key": ("=3", "override '=3': expected key.path=value"),
    "empty-part": ("train..lr=3", "expected key.path=value"),
    "no-equals": ("train.lr", "override 'train.lr': expected key.path=value"),
    "section-replaced-by-scalar": ("train=5", "train: expected a mapping, found 5"),
    "infinite": ("train.lr=.inf", "train.lr: expected a finite number"),
    "duplicate-in-value": ("train={lr: 1, lr: 2}", "expected each key once"),
    "bad-yaml-value": ("train.lr=[1", "the value is not valid YAML"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_malformed_override(case, tmp_path, capsys):
    override, needle = OVERRIDES[case]
    path = tmp_path / "recipe.yaml"
    path.write_text(BASE)
    assert needle in one_line_error(capsys, ["validate", path, override])


COMMAND_LINES = {  # id -> (arguments, what the error line must contain)
    "export-without-gguf": (["export", "some/model"], "export: the following arguments are required: --gguf"),
    "unknown-verb": (["nosuch"], "invalid choice: 'nosuch'"),
    "unknown-option": (["export", "m", "--gguf", "o.gguf", "--bogus"], "unrecognized arguments: --bogus"),
    "no-verb": ([], "the following arguments are required: verb"),
}


@pytest.mark.parametrize("case", list(COMMAND_LINES))
def test_malformed_command_line(case, capsys):
    argv, needle = COMMAND_LINES[case]
    assert needle in one_line_error(capsys, argv)


def test_help_still_prints_usage(capsys):
    assert main(["export", "--help"]) == 0
    assert "--gguf" in capsys.readouterr().out


@pytest.mark.parametrize("seed", [2**64, 2**32, -1])
def test_bad_seed_fails_before_the_run_directory_exists(seed, make_recipe, tmp_path, capsys):
    path = make_recipe(seed=seed)
    assert "seed: expected" in one_line_error(capsys, ["run", path])
    assert not (tmp_path / "runs").exists()


def test_nonfinite_lr_fails_before_the_run_directory_exists(make_recipe, tmp_path, capsys):
    path = make_recipe()
    assert "train.lr: expected a finite number" in one_line_error(capsys, ["run", path, "train.lr=.inf"])
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Model directories, as a teacher (`distil run`) and as an export source (`distil export`)


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))


def _st_header(w: Path) -> tuple[int, dict, bytes]:
    data = w.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _offsets_past_end(d: Path) -> None:
    w = d / "model.safetensors"
    n, header, payload = _st_header(w)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 4096
    raw = json.dumps(header).encode()
    w.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _header_not_json(d: Path) -> None:
    w = d / "model.safetensors"
    data = w.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    w.write_bytes(data[:8] + b"x" * n + data[8 + n:])


def _truncate(d: Path) -> None:
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])


MODEL_DAMAGE = {  # id -> (damage(dir), what the error line must contain)
    "config-not-json": (lambda d: (d / "config.json").write_text("{'model_type': llama,"), "config.json"),
    "config-a-list": (lambda d: (d / "config.json").write_text("[1, 2, 3]"), "config.json: expected a JSON object"),
    "config-not-utf8": (lambda d: (d / "config.json").write_bytes(b"\xff\xfe{}"), "config.json"),
    "config-no-model-type": (lambda d: _edit_config(d, model_type=None), "model_type"),
    "weights-truncated": (_truncate, "truncated"),
    "weights-absurd-header-length": (
        lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**62)
                                                        + (d / "model.safetensors").read_bytes()[8:]),
        "the header claims 4611686018427387904 bytes"),
    "weights-zero-bytes": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors"),
    "weights-header-not-json": (_header_not_json, "expected a JSON header"),
    "weights-offsets-past-end": (_offsets_past_end, "model.safetensors"),
    "weights-bin-only": (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pytorch_model.bin"),
}


@pytest.fixture
def bad_model(tmp_path, tiny_teacher):
    def make(case: str) -> Path:
        d = tmp_path / f"model-{case}"
        shutil.copytree(tiny_teacher, d)
        MODEL_DAMAGE[case][0](d)
        return d

    return make


@pytest.mark.parametrize("case", list(MODEL_DAMAGE))
def test_bad_model_dir_as_teacher(case, bad_model, make_recipe, tmp_path, capsys):
    d = bad_model(case)
    before = tree(d)
    line = one_line_error(capsys, ["run", make_recipe(teacher={"source": str(d)})])
    assert MODEL_DAMAGE[case][1] in line
    assert tree(d) == before
    assert not (tmp_path / "runs").exists()


EXPORT_ONLY_DAMAGE = {  # files only the exporter reads itself
    "config-heads-missing": (lambda d: _edit_config(d, num_attention_heads=None),
                             "num_attention_heads: expected a positive integer, found no such key"),
    "config-hidden-a-string": (lambda d: _edit_config(d, hidden_size="32"), "hidden_size: expected a positive"),
    "tokenizer-json-not-json": (lambda d: (d / "tokenizer.json").write_text('{"model": '), "tokenizer.json"),
    "tokenizer-json-a-list": (lambda d: (d / "tokenizer.json").write_text("[]"), "tokenizer.json: expected a JSON"),
    "tokenizer-config-not-json": (lambda d: (d / "tokenizer_config.json").write_text("{"), "tokenizer_config.json"),
}


@pytest.mark.parametrize("case", list(MODEL_DAMAGE) + list(EXPORT_ONLY_DAMAGE))
def test_export_of_a_bad_model_dir(case, tmp_path, tiny_teacher, capsys):
    d = tmp_path / f"model-{case}"
    shutil.copytree(tiny_teacher, d)
    damage, needle = {**MODEL_DAMAGE, **EXPORT_ONLY_DAMAGE}[case]
    damage(d)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"the previous export")
    before_model, before_out = tree(d), tree(out)
    line = one_line_error(capsys, ["export", d, "--gguf", out / "m.gguf", "--quant", "Q4_K_M"])
    assert needle in line
    assert tree(d) == before_model and tree(out) == before_out  # no partial GGUF, no temp, no Modelfile


CONFIG_SOURCES = {  # id -> (what to write, is it a directory, what the error line must contain)
    "file-not-json": ('{"model_type": "llama", ', False, "expected a JSON model config, found invalid JSON"),
    "dir-config-not-json": ('{"model_type": "llama", ', True, "expected a JSON model config, found invalid JSON"),
    "dir-config-a-list": ("[]", True, "expected a JSON object"),
    "file-unknown-model-type": ('{"model_type": "no-such-arch"}', False, "not a usable model config"),
    "file-heads-do-not-divide": (json.dumps({"model_type": "llama", "vocab_size": 106, "hidden_size": 30,
                                             "num_attention_heads": 4, "num_hidden_layers": 1,
                                             "intermediate_size": 16}), False, "config"),
}


@pytest.mark.parametrize("case", list(CONFIG_SOURCES))
def test_bad_config_source(case, make_recipe, tmp_path, capsys):
    text, as_dir, needle = CONFIG_SOURCES[case]
    where = tmp_path / "cfg"
    where.mkdir()
    (where / "config.json").write_text(text)
    ref = where if as_dir else where / "config.json"
    line = one_line_error(capsys, ["run", make_recipe(student={"source": f"config:{ref}", "layers": None})])
    assert needle in line
    assert not (tmp_path / "runs").exists()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from distil.export import export_gguf
    from distil.testing import save_tiny_model

    d = tmp_path_factory.mktemp("gguf")
    return export_gguf(save_tiny_model(d / "m"), d / "m.gguf", "F32", modelfile=False).path


GGUF_DAMAGE = {
    "random-bytes": lambda good: random.Random(0).randbytes(4096),
    "truncated": lambda good: good[: len(good) // 2],
    "wrong-magic": lambda good: b"GGUX" + good[4:],
    "empty": lambda good: b"",
    "header-only": lambda good: good[:24],
}


@pytest.mark.parametrize("case", list(GGUF_DAMAGE))
def test_bad_gguf_teacher(case, tiny_gguf, make_recipe, tmp_path, capsys):
    bad = tmp_path / "teacher.gguf"
    bad.write_bytes(GGUF_DAMAGE[case](tiny_gguf.read_bytes()))
    before = tree(tmp_path / "teacher.gguf")
    line = one_line_error(capsys, ["run", make_recipe(teacher={"source": str(bad)})])
    assert str(bad) in line
    assert tree(bad) == before and not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------
# Export: where it writes, and what a failure midway leaves


def test_export_under_a_file(tiny_teacher, tmp_path, capsys):
    (tmp_path / "somefile").write_text("x")
    line = one_line_error(capsys, ["export", tiny_teacher, "--gguf", tmp_path / "somefile" / "out.gguf"])
    assert "is not a directory" in line
    assert (tmp_path / "somefile").read_text() == "x"


def test_export_onto_a_directory(tiny_teacher, tmp_path, capsys):
    (tmp_path / "out.gguf").mkdir()
    assert "found a directory" in one_line_error(capsys, ["export", tiny_teacher, "--gguf", tmp_path / "out.gguf"])


def test_export_into_a_missing_directory(tiny_teacher, tmp_path, capsys):
    line = one_line_error(capsys, ["export", tiny_teacher, "--gguf", tmp_path / "nope" / "out.gguf"])
    assert "does not exist" in line and not (tmp_path / "nope").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions: a read-only directory is "
                                              "writable (test_export_under_a_file covers an unwritable path)")
def test_export_into_a_read_only_directory(tiny_teacher, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert "cannot write" in one_line_error(capsys, ["export", tiny_teacher, "--gguf", ro / "out.gguf"])
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_export_failing_midway_leaves_no_partial_file(tiny_teacher, tmp_path, capsys):
    """NaN weights in the last layer: found while the tensors stream out, after the header is written."""
    from safetensors.numpy import load_file, save_file

    d = shutil.copytree(tiny_teacher, tmp_path / "nan")
    t = load_file(d / "model.safetensors")
    key = "model.layers.3.mlp.down_proj.weight"
    t[key][0, 0] = float("nan")
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.gguf").write_bytes(b"the previous export")
    before = tree(out)
    assert "contains nan or inf" in one_line_error(capsys, ["export", d, "--gguf", out / "m.gguf"])
    assert tree(out) == before


def test_interrupted_export_leaves_no_partial_file(tiny_teacher, tmp_path, capsys, monkeypatch):
    """Ctrl-C between two tensors: the temp file goes, the previous GGUF stays."""
    from distil.export import tensors

    real, calls = tensors._encoded, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(tensors, "_encoded", interrupted)
    (tmp_path / "m.gguf").write_bytes(b"the previous export")
    before = tree(tmp_path)
    assert main(["export", str(tiny_teacher), "--gguf", str(tmp_path / "m.gguf")]) == 130
    assert len(calls) == 5 and tree(tmp_path) == before


def test_stale_temp_of_a_killed_export_is_removed_by_the_next_export(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    stale = tmp_path / ".m.gguf.4194999.abc123.tmp"  # pid above Linux's pid_max: its process is gone
    stale.write_bytes(b"half a GGUF")
    live = tmp_path / f".m.gguf.{os.getppid()}.def456.tmp"  # a running process's export: not ours to remove
    live.write_bytes(b"being written")
    other = tmp_path / ".other.gguf.4194999.abc123.tmp"  # another output's temp: left alone
    other.write_bytes(b"x")
    assert main(["export", str(tiny_teacher), "--gguf", str(out), "--quant", "F16"]) == 0
    capsys.readouterr()
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "m.Modelfile", live.name, other.name])


# ----------------------------------------------------------------------------------------------
# Paths in recipes, run directories, caches


def test_output_dir_is_a_file(make_recipe, tmp_path, capsys):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")
    one_line_error(capsys, ["run", make_recipe()])
    assert blocker.read_text() == "not a directory"


def test_cache_dir_is_a_file(make_recipe, tmp_path, capsys):
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a directory")
    path = make_recipe(distill={"method": "cache"}, cache={"k": 8, "dir": str(blocker)})
    one_line_error(capsys, ["cache", path])
    assert blocker.read_text() == "not a directory"


def test_eval_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    before = tree(tmp_path)
    assert "expected a run directory" in one_line_error(capsys, ["eval", tmp_path])
    assert tree(tmp_path) == before


def test_eval_of_a_run_with_a_bad_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("- not\n- a mapping\n")
    before = tree(run)
    assert "expected a mapping" in one_line_error(capsys, ["eval", run])
    assert tree(run) == before


def test_eval_of_a_run_with_a_truncated_student(make_recipe, tiny_teacher, tmp_path, capsys):
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    shutil.copy(make_recipe(), run / "recipe.yaml")
    shutil.copytree(tiny_teacher, run / "student")
    _truncate(run / "student")
    before = tree(run)
    assert "truncated" in one_line_error(capsys, ["eval", run])
    assert tree(run) == before


@pytest.fixture
def built_cache(make_recipe, capsys):
    """A recipe with method cache and its complete cache (3+ shards): (recipe path, cache dir)."""
    path = make_recipe(distill={"method": "cache"}, cache={"k": 8, "shard_tokens": 2048})
    assert main(["cache", str(path)]) == 0
    capsys.readouterr()
    recipe = yaml.safe_load(path.read_text())
    cdir = Path(recipe["output"]["dir"]) / "t-cache"
    assert len(list(cdir.glob("shard-*.safetensors"))) >= 2
    return path, cdir


def _rename_tensor_in_header(shard: Path) -> None:
    """Same size, still valid JSON, but the offsets tensor is now called something else."""
    data = shard.read_bytes()
    assert data.count(b'"offsets"') == 1
    shard.write_bytes(data.replace(b'"offsets"', b'"offsetz"'))


def _break_header_json(shard: Path) -> None:
    data = bytearray(shard.read_bytes())
    data[8] = ord("x")  # the header's opening brace
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_rename_tensor_in_header, _break_header_json], ids=["renamed", "not-json"])
@pytest.mark.parametrize("verb", ["run", "cache"])
def test_cache_shard_with_a_corrupt_header(verb, damage, built_cache, tmp_path, capsys):
    path, cdir = built_cache
    damage(cdir / "shard-00001.safetensors")
    before = tree(cdir)
    line = one_line_error(capsys, [verb, path])
    assert "shard-00001.safetensors" in line
    assert tree(cdir) == before and not (tmp_path / "runs" / "t").exists()


def test_cache_manifest_pointing_outside_the_cache(built_cache, tmp_path, capsys):
    path, cdir = built_cache
    manifest = json.loads((cdir / "manifest.json").read_text())
    manifest["shards"][0]["file"] = "../../recipe.yaml"
    (cdir / "manifest.json").write_text(json.dumps(manifest))
    before = tree(tmp_path)
    assert "shards[0]: expected" in one_line_error(capsys, ["run", path])
    assert tree(tmp_path) == before


# ----------------------------------------------------------------------------------------------
# Data files and checkpoints (owned by data.py / checkpoint.py; listed here so every verb is covered)

DATA_FILES = {  # id -> (file name, bytes, what the error line must contain)
    "jsonl-line-not-json": ("d.jsonl", b'{"text": "fine"}\n{"text": \n', "d.jsonl"),
    "json-a-number": ("d.json", b"3", "d.json"),
    "parquet-garbage": ("d.parquet", b"PAR1 this is not parquet PAR1", "d.parquet"),
    "txt-not-utf8": ("d.txt", b"\xff\xfe\x00\xd8 broken", "d.txt"),
    "csv-binary": ("d.csv", b"\x00\x01\x02\xff\n\xfe", "d.csv"),
}


@pytest.mark.parametrize("case", list(DATA_FILES))
def test_malformed_data_file(case, make_recipe, tmp_path, capsys):
    name, content, needle = DATA_FILES[case]
    (tmp_path / name).write_bytes(content)
    line = one_line_error(capsys, ["run", make_recipe(data={"source": str(tmp_path / name), "eval_size": 0})])
    assert needle in line
    assert not (tmp_path / "runs").exists()


@pytest.fixture
def finished_run(make_recipe, tmp_path, capsys):
    path = make_recipe(train={"steps": 2, "save_every": 1, "keep_last": 2})
    assert main(["run", str(path)]) == 0
    capsys.readouterr()
    return path, tmp_path / "runs" / "t"


@pytest.mark.parametrize("damage", ["state-not-json", "weights-truncated"])
def test_resume_from_a_damaged_checkpoint(damage, finished_run, capsys):
    path, run = finished_run
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    if damage == "state-not-json":
        (ckpt / "trainer_state.json").write_text('{"step": ')
    else:
        _truncate(ckpt)
    before = tree(run)
    one_line_error(capsys, ["run", path, "--resume", ckpt])
    assert tree(run) == before
