"""Capacity gap (distil/eval/capacity.py, `distil advise`): the vocabulary refusal, the chain-vs-direct rule, and a
two-teacher sweep (direct and TAKD) end to end on tiny models."""

import pytest
import yaml

from distil.cli import main
from distil.errors import DistilError
from distil.eval.capacity import chain_wins, check_vocabularies, format_table, plot, sweep
from distil.testing import char_tokenizer, save_tiny_model


def test_teachers_of_different_vocabularies_are_refused_naming_both_sizes():
    a, b = char_tokenizer(add_bos=True), char_tokenizer(extra_chars="éü", add_bos=True)
    assert check_vocabularies([("t1", a), ("t2", char_tokenizer(add_bos=True))]) == len(a)
    with pytest.raises(DistilError, match=rf"'t1' \({len(a)} tokens\) and 't2' \({len(b)} tokens\)"):
        check_vocabularies([("t1", a), ("t2", b)])
    assert len(a) != len(b)


def test_chain_wins_by_accuracy_then_perplexity():
    assert chain_wins({"ppl": 3.0}, {"ppl": 2.5})
    assert not chain_wins({"ppl": 2.5}, {"ppl": 3.0})
    assert chain_wins({"ppl": 2.0, "accuracy": 0.1}, {"ppl": 3.0, "accuracy": 0.2})  # accuracy decides
    assert chain_wins({"ppl": 3.0, "accuracy": 0.1}, {"ppl": 2.0, "accuracy": 0.1})  # a tie: perplexity


def _teachers(tmp_path):
    tok = char_tokenizer(add_bos=True)
    return [str(save_tiny_model(tmp_path / f"t{n}", seed=n, tokenizer=tok, num_hidden_layers=n, hidden_size=32))
            for n in (1, 3)]


def _recipe(tmp_path, teacher):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "cap", "teacher": {"source": teacher},
        "student": {"source": "config:tiny-llama-char", "config": {"num_hidden_layers": 1, "hidden_size": 16,
                                                                   "intermediate_size": 32}},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": "offline", "temperature": 1.0, "alpha": 1.0},
        "train": {"steps": 2, "batch_size": 2, "lr": 1e-2, "warmup_steps": 0, "progress": False}}))
    return path


def test_sweep_direct_and_chain_per_teacher(tmp_path):
    teachers = _teachers(tmp_path)
    rows = sweep(_recipe(tmp_path, teachers[0]), teachers, assistant={"num_hidden_layers": 1, "hidden_size": 24},
                 out=tmp_path / "runs", echo=lambda s: None)
    assert [r["teacher"] for r in rows] == teachers
    for r in rows:
        assert r["direct"]["ppl"] > 1 and r["takd"]["ppl"] > 1 and r["assistant"]["ppl"] > 1
        assert r["chain_beats_direct"] == (r["takd"]["ppl"] < r["direct"]["ppl"])
    assert rows[0]["teacher_params"] < rows[1]["teacher_params"]
    # the two teachers are different models: their held-out perplexities differ
    assert rows[0]["teacher_quality"]["ppl"] != rows[1]["teacher_quality"]["ppl"]
    table = format_table(rows)
    assert "chain beats direct" in table and len(table.splitlines()) == 4
    png = plot(rows, tmp_path / "cap.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_advise_refuses_mixed_vocabularies_in_one_line(tmp_path, capsys):
    good = save_tiny_model(tmp_path / "a", tokenizer=char_tokenizer(add_bos=True), num_hidden_layers=1)
    other = save_tiny_model(tmp_path / "b", tokenizer=char_tokenizer(extra_chars="é", add_bos=True),
                            num_hidden_layers=1)
    capsys.readouterr()  # the fixtures' own output
    rc = main(["advise", str(_recipe(tmp_path, str(good))), "--teachers", f"{good},{other}",
               "--out", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "different vocabularies" in err and str(good) in err and str(other) in err
    assert not (tmp_path / "runs").exists()  # refused before anything trains
