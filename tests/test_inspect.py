"""`distil inspect`: a run's teacher and student side by side on the soft targets of each position; bad input."""

import math

import pytest
import torch
import yaml

from distil.cli import main
from distil.eval import diagnostics as dg
from distil.testing import char_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as `distil run` leaves it: recipe.yaml naming the teacher, and student/."""
    root = tmp_path_factory.mktemp("inspect")
    teacher = save_tiny_model(root / "teacher", seed=0)
    run = root / "run"
    save_tiny_model(run / "student", seed=1)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"teacher": {"source": str(teacher)},
                                                     "student": {"source": "teacher"}}))
    return run


def _logits(path, text):
    from distil.models import load_model

    m = load_model(str(path))
    ids = m.tokenizer(text)["input_ids"]
    with torch.no_grad():
        return ids, m.model(input_ids=torch.tensor([ids])).logits[0].double()


def test_run_dir_shows_teacher_and_student_with_kl(run_dir, tmp_path, capsys):
    png = tmp_path / "dk.png"
    assert main(["inspect", str(run_dir), "--text", "hello world", "--positions", "2,-1",
                 "--temperatures", "1,2", "--top-k", "3", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "teacher" in out and "student" in out and "KL(teacher||student)" in out
    assert "where teacher and student disagree most" in out
    # position 2 ('l' -> 'l'): the teacher's T=2 line carries the hand-computed entropy and top-1 probability
    ids, t = _logits(run_dir.parent / "teacher", "hello world")
    _, s = _logits(run_dir / "student", "hello world")
    p2 = [math.exp(z / 2) for z in t[2].tolist()]
    p2 = [x / sum(p2) for x in p2]
    h2 = -sum(x * math.log(x) for x in p2)
    row = next(ln for ln in lines if "teacher" in ln and f"{h2:.3f}" in ln)
    assert f"{max(p2):.3f}" in row and f"{1 - max(p2):.3f}" in row
    kl1 = sum(a * (math.log(a) - math.log(b)) for a, b in zip(torch.softmax(t[2], -1).tolist(),
                                                              torch.softmax(s[2], -1).tolist()))
    assert f"T=1: {kl1:.4f}" in out
    # the last position (-1 -> 10) is shown and has no next token
    assert any(ln.lstrip().startswith("10") and "(end)" in ln for ln in lines)
    kl, differs = dg.disagreement(t, s)
    worst = dg.most_disagreeing(kl, differs, 1)[0]
    assert f"pos {worst:>3}" in out.split("disagree most")[1].splitlines()[1]
    assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).std() > 0  # not blank


def test_a_model_alone(run_dir, capsys):
    assert main(["inspect", str(run_dir / "student"), "--text", "abc"]) == 0
    out = capsys.readouterr().out
    assert "KL(" not in out and "disagree" not in out
    assert len([ln for ln in out.splitlines()[1:] if ln.strip()]) == 3 * 3  # 3 positions x T in {1, 2, 4}


def test_text_longer_than_the_context_is_truncated_with_a_warning(tmp_path, capsys):
    model = save_tiny_model(tmp_path / "short", seed=0, max_position_embeddings=8)
    assert main(["inspect", str(model), "--text", "a" * 20, "--temperatures", "1"]) == 0
    captured = capsys.readouterr()
    assert "truncated to the first 8" in captured.err and "20 tokens" in captured.err
    assert any(ln.lstrip().startswith("7 ") for ln in captured.out.splitlines())
    assert main(["inspect", str(model), "--text", "a" * 20, "--positions", "12"]) == 2
    assert "position 12 is out of range: the text has 8 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--positions", "11"], "--positions: position 11 is out of range: the text has 11 tokens"),
    (["--positions", "x"], "--positions: expected comma-separated integers, found 'x'"),
    (["--temperatures", "1,0"], "--temperatures: expected comma-separated numbers > 0"),
    (["--top-k", "0"], "--top-k: expected an integer >= 1, found 0"),
])
def test_bad_input_is_one_line_exit_2(run_dir, capsys, args, message):
    assert main(["inspect", str(run_dir / "student"), "--text", "hello world", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_run_whose_student_has_another_vocabulary_is_refused(tmp_path, run_dir, capsys):
    run = tmp_path / "run"
    save_tiny_model(run / "student", seed=1, tokenizer=char_tokenizer(extra_chars="éü"))
    (run / "recipe.yaml").write_text((run_dir / "recipe.yaml").read_text())
    assert main(["inspect", str(run), "--text", "hi"]) == 2
    assert "tokenizers differ" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "nothing"), "--text", "hi"]) == 2
    assert "expected a run directory, a model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_the_embedded_teacher(capsys):
    assert main(["inspect", "embedded:smollm2-135m-instruct", "--text", "The capital of France is Paris",
                 "--positions", "-2", "--top-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "' Paris'" in out
