"""report.html's dark-knowledge panels: which held-out positions are chosen (by hand), the numbers of
dark_knowledge.json against a float64 hand computation from the two models' logits, the switches
(eval.dark_knowledge: 0, output.report_html: false), the page from a hand-made record, and the skips."""

import json
import math

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE
from distil.eval import diagnostics as dg
from distil.eval.inspect import held_out_dark_knowledge, write_dark_knowledge
from distil.report_html import write_page
from distil.testing import char_tokenizer, save_tiny_model

# ----------------------------------------------------------------------------------------------------------------
# Choosing the positions


def test_choose_panels_by_hand():
    #                     0    1    2    3    4    5
    kl = torch.tensor([9.0, 0.5, 3.0, 3.0, 0.1, 7.0], dtype=torch.float64)
    differs = torch.tensor([0, 0, 0, 1, 0, 0], dtype=torch.bool)
    ent = torch.tensor([0.0, 0.1, 0.2, 0.3, 2.5, 0.4], dtype=torch.float64)
    cand = [1, 2, 3, 4, 5]  # position 0 is not a target: its KL of 9 must not count
    # among the candidates by KL: 5 (7.0), 3 (3.0, argmax differs: before 2), 2, 1, 4; most uncertain: 4
    assert dg.choose_panels(kl, differs, ent, cand, 3) == [(3, ["disagree most #2"]), (4, ["teacher most uncertain"]),
                                                           (5, ["disagree most #1"])]
    assert dg.choose_panels(kl, differs, ent, cand, 1) == [(5, ["disagree most #1"])]
    # the most uncertain position is also the most disagreeing one: both reasons, and the next one fills up
    ent2 = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.0, 5.0], dtype=torch.float64)
    assert dg.choose_panels(kl, differs, ent2, cand, 3) == [
        (2, ["disagree most #3"]), (3, ["disagree most #2"]), (5, ["disagree most #1", "teacher most uncertain"])]
    assert len(dg.choose_panels(kl, differs, ent, cand, 32)) == 5  # never more than the candidates
    assert dg.choose_panels(kl, differs, ent, cand, 0) == [] and dg.choose_panels(kl, differs, ent, [], 4) == []


# ----------------------------------------------------------------------------------------------------------------
# The record against float64 hand math


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from distil.models import load_model

    root = tmp_path_factory.mktemp("dk")
    teacher = load_model(str(save_tiny_model(root / "teacher", seed=0)))
    student = load_model(str(save_tiny_model(root / "student", seed=1)))
    return teacher, student


def _softmax(z, t):
    m = max(z)
    e = [math.exp((x - m) / t) for x in z]
    s = sum(e)
    return [x / s for x in e]


def test_record_equals_a_float64_hand_computation(pair):
    teacher, student = pair
    tok = student.tokenizer
    ids = tok("print(len(x))")["input_ids"]
    examples = [{"input_ids": ids[:5], "labels": [IGNORE] * 5},  # no target token: skipped
                {"input_ids": ids, "labels": [IGNORE] * 6 + ids[6:]}]  # a prompt of 6 tokens, then the response
    rec = held_out_dark_knowledge(teacher.model, student.model, tok, examples, 3, len(tok))
    assert rec["example"] == 1 and rec["example_tokens"] == len(ids) and rec["temperatures"] == [1.0, 2.0]
    cand = list(range(5, len(ids) - 1))  # position i predicts token i + 1: the targets are tokens 6..
    assert rec["target_positions"] == len(cand)
    with torch.no_grad():  # the models' own logits, then everything by hand in Python floats (float64)
        zt = teacher.model(input_ids=torch.tensor([ids])).logits[0].float().tolist()
        zs = student.model(input_ids=torch.tensor([ids])).logits[0].float().tolist()

    def kl(i, t):
        p, q = _softmax(zt[i], t), _softmax(zs[i], t)
        return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q))

    def ent(z, t):
        return -sum(a * math.log(a) for a in _softmax(z, t))

    kls = {i: kl(i, 1.0) for i in cand}
    assert rec["mean_kl"] == pytest.approx(sum(kls.values()) / len(cand), rel=1e-9)
    by_kl = sorted(cand, key=lambda i: -kls[i])
    uncertain = max(cand, key=lambda i: ent(zt[i], 1.0))
    expected = sorted(set(by_kl[:2]) | {uncertain} | (set(by_kl[2:3]) if uncertain in by_kl[:2] else set()))
    assert [p["position"] for p in rec["positions"]] == expected
    for p in rec["positions"]:
        i = p["position"]
        assert p["token"] == tok.decode([ids[i]]) and p["next"] == tok.decode([ids[i + 1]])
        assert p["context"].endswith(tok.decode(ids[:i + 1])[-3:])
        for j, t in enumerate((1.0, 2.0)):
            assert p["kl"][j] == pytest.approx(kl(i, t), rel=1e-9)
            for name, z in (("teacher", zt[i]), ("student", zs[i])):
                st, probs = p[name][j], _softmax(z, t)
                top = sorted(range(len(probs)), key=lambda v: -probs[v])[:5]
                assert st["T"] == t and st["ids"] == top and st["tokens"] == [tok.decode([v]) for v in top]
                assert st["probs"] == pytest.approx([probs[v] for v in top], rel=1e-9)
                assert st["entropy"] == pytest.approx(ent(z, t), rel=1e-9)
                assert st["outside_top1"] == pytest.approx(1 - max(probs), rel=1e-9)
            ps = _softmax(zs[i], t)
            assert p["student_on_teacher_top"][j] == pytest.approx([ps[v] for v in p["teacher"][j]["ids"]], rel=1e-9)
        assert p["teacher_p_next"] == pytest.approx(_softmax(zt[i], 1.0)[ids[i + 1]], rel=1e-9)
        assert p["argmax_differs"] == (max(range(len(zt[i])), key=zt[i].__getitem__)
                                       != max(range(len(zs[i])), key=zs[i].__getitem__))
    assert held_out_dark_knowledge(teacher.model, student.model, tok, examples[:1], 3, len(tok)) is None


def test_the_logits_are_read_without_a_graph(pair):
    """The student of a finished run still has trainable weights: its panel logits build no autograd graph."""
    from distil.eval.inspect import model_logits

    teacher, student = pair
    student.model.train()
    assert any(p.requires_grad for p in student.model.parameters())
    out = model_logits(student.model, student.tokenizer("print(x)")["input_ids"], len(student.tokenizer))
    assert not out.requires_grad and out.grad_fn is None and student.model.training  # mode restored


def test_a_long_example_is_read_up_to_its_first_128_targets(pair, monkeypatch):
    from distil.eval import inspect as ins

    teacher, student = pair
    tok = student.tokenizer
    ids = tok("the quick brown fox " * 20)["input_ids"]  # 400 tokens, every one a target
    seen = []
    monkeypatch.setattr(ins, "model_logits", lambda m, i, v, f=ins.model_logits: seen.append(len(i)) or f(m, i, v))
    rec = ins.held_out_dark_knowledge(teacher.model, student.model, tok, [{"input_ids": ids, "labels": ids}], 4,
                                      len(tok))
    assert seen == [129, 129]  # the first 128 targets are tokens 1..128, predicted at positions 0..127
    assert rec["target_positions"] == 128 and all(0 <= p["position"] <= 127 for p in rec["positions"])


def test_write_dark_knowledge_skips_without_a_shared_teacher_or_when_off(pair, tmp_path):
    from distil.recipe import recipe_from_dict

    teacher, student = pair
    ex = [{"input_ids": [10, 11, 12, 13], "labels": [10, 11, 12, 13]}]
    on = recipe_from_dict({"teacher": {"source": "x"}}, "r")
    off = recipe_from_dict({"teacher": {"source": "x"}, "eval": {"dark_knowledge": 0}}, "r")
    args = (student.model, student.tokenizer, ex, len(student.tokenizer))
    assert write_dark_knowledge(tmp_path, on, None, *args) is None  # no teacher, or one across vocabularies
    assert write_dark_knowledge(tmp_path, off, teacher.model, *args) is None
    assert not (tmp_path / "dark_knowledge.json").exists()
    path = write_dark_knowledge(tmp_path, on, teacher.model, *args, row="student (x)")
    rec = json.loads(path.read_text())
    assert rec["teacher"] == "x" and rec["student"] == "student (x)" and len(rec["positions"]) == 3  # 3 targets


# ----------------------------------------------------------------------------------------------------------------
# The page from a hand-made record


def _record():
    pt = [0.7, 0.2, 0.05]
    return {"teacher": "T-model", "student": "student (offline)", "format": 1, "example": 0, "example_tokens": 9,
            "target_positions": 8, "temperatures": [1.0, 2.0], "top_k": 3, "mean_kl": 0.123456,
            "argmax_differs": 2, "positions": [{
                "position": 4, "why": ["disagree most #1"], "context": "def f(x)", "token": ")", "next": ":",
                "next_id": 30, "argmax_differs": True, "kl": [0.5432, 0.0987],
                "teacher": [{"T": 1.0, "ids": [30, 31, 32], "tokens": [":", "\n", "$"], "probs": pt,
                             "entropy": 0.8018, "outside_top1": 0.3},
                            {"T": 2.0, "ids": [30, 31, 32], "tokens": [":", "\n", "$"], "probs": [0.4, 0.2, 0.1],
                             "entropy": 2.5, "outside_top1": 0.6}],
                "student": [{"T": 1.0, "ids": [31, 30, 33], "tokens": ["\n", ":", " "], "probs": [0.5, 0.25, 0.1],
                             "entropy": 1.3, "outside_top1": 0.5},
                            {"T": 2.0, "ids": [31, 30, 33], "tokens": ["\n", ":", " "], "probs": [0.3, 0.2, 0.1],
                             "entropy": 3.1, "outside_top1": 0.7}],
                "teacher_p_next": 0.7, "student_p_next": 0.25,
                "student_on_teacher_top": [[0.25, 0.5, 0.01], [0.2, 0.3, 0.05]]}]}


def test_the_page_shows_a_hand_made_record(tmp_path):
    import base64
    import io
    import re

    import matplotlib.image

    (tmp_path / "recipe.yaml").write_text("name: x\nteacher: {source: T-model}\n")
    (tmp_path / "dark_knowledge.json").write_text(json.dumps(_record()))
    page = write_page(tmp_path).read_text()
    section = page.split('<h2 id="dark-knowledge">Dark knowledge</h2>')[1]
    assert "<code>T-model</code> vs student (offline) on 1 position(s) of held-out example 0" in section
    assert "mean KL(teacher&#8214;student) at T=1 0.1235 nats, a different argmax at 2" in section
    assert "position 4: <code class=\"ctx\">def f(x)</code> &rarr; <code>&#x27;:&#x27;</code>" in section
    assert "(disagree most #1)" in section
    # one row per model and temperature: T, entropy, 1-top1, the top-k with their probabilities (repr'd tokens)
    assert ("<tr><td>teacher</td><td>1</td><td>0.8018</td><td>0.3000</td><td class=\"tok\">&#x27;:&#x27;&nbsp;0.700"
            "&nbsp; &#x27;\\n&#x27;&nbsp;0.200&nbsp; &#x27;$&#x27;&nbsp;0.050</td></tr>") in section
    assert "<tr><td>student</td><td>2</td><td>3.1000</td><td>0.7000</td>" in section
    assert "KL(teacher&#8214;student) T=1: 0.5432, T=2: 0.0987; <b>argmax differs</b>" in section
    assert "p(&#x27;:&#x27;): teacher 0.700, student 0.250" in section
    [b64] = re.findall(r'<img alt="plot" src="data:image/png;base64,([A-Za-z0-9+/=]+)">', section)
    assert matplotlib.image.imread(io.BytesIO(base64.b64decode(b64)), format="png").std() > 0
    for bad in ({"positions": [{"teacher": 1}]}, {**_record(), "mean_kl": "high"},
                {**_record(), "positions": [{**_record()["positions"][0], "kl": ["a", "b"]}]},
                {**_record(), "positions": [{**_record()["positions"][0], "kl": [0.5]}]}):  # one KL for two T
        (tmp_path / "dark_knowledge.json").write_text(json.dumps(bad))
        assert "dark_knowledge.json is not a readable dark-knowledge record" in write_page(tmp_path).read_text()


@pytest.mark.parametrize("recipe, why", [
    ("name: x\nteacher: {source: t}\neval: {enabled: false}\n", "eval.enabled was off"),
    ("name: x\nteacher: {source: t}\neval: {dark_knowledge: 0}\n", "eval.dark_knowledge: 0 switched them off"),
    ("name: x\n", "the run has no teacher"),
    ("name: x\nteacher: {source: t}\n", "do not share a vocabulary"),
    (None, "no readable recipe.yaml either"),
])
def test_without_the_record_the_page_says_why(tmp_path, recipe, why):
    if recipe:
        (tmp_path / "recipe.yaml").write_text(recipe)
    page = write_page(tmp_path).read_text()
    [line] = [ln for ln in page.splitlines() if "No dark_knowledge.json in this run directory" in ln]
    assert why in line and "<img" not in page.split("Dark knowledge</h2>")[1]


# ----------------------------------------------------------------------------------------------------------------
# Runs


def test_a_run_writes_the_record_and_the_page_shows_it_and_eval_refreshes_it(make_recipe):
    path = make_recipe(eval={"enabled": True, "dark_knowledge": 3})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    rec = json.loads((run / "dark_knowledge.json").read_text())
    assert rec["student"] == "student (offline)" and len(rec["positions"]) == 3 and rec["example"] == 0
    page = (run / "report.html").read_text()
    for p in rec["positions"]:
        assert f"<h3>position {p['position']}: " in page
        assert f"<td>{p['teacher'][0]['entropy']:.4f}</td><td>{p['teacher'][0]['outside_top1']:.4f}</td>" in page
        assert f"T=1: {p['kl'][0]:.4f}, T=2: {p['kl'][1]:.4f}" in page
    (run / "dark_knowledge.json").unlink()
    (run / "report.html").unlink()
    assert main(["eval", str(run)]) == 0  # `distil eval RUN_DIR` writes both again, the same numbers
    again = json.loads((run / "dark_knowledge.json").read_text())
    assert [p["position"] for p in again["positions"]] == [p["position"] for p in rec["positions"]]
    assert again["mean_kl"] == pytest.approx(rec["mean_kl"], rel=1e-5)
    assert "<h2 id=\"dark-knowledge\">Dark knowledge</h2>" in (run / "report.html").read_text()


def test_the_switches_turn_the_record_and_the_page_off(make_recipe):
    path = make_recipe(eval={"enabled": True, "dark_knowledge": 0})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "t"
    assert not (run / "dark_knowledge.json").exists()
    assert "eval.dark_knowledge: 0 switched them off" in (run / "report.html").read_text()
    assert main(["run", str(path), "output.report_html=false", "eval.dark_knowledge=2", "--overwrite"]) == 0
    assert (run / "eval.json").is_file() and (run / "report.md").is_file() and (run / "dark_knowledge.json").is_file()
    assert not (run / "report.html").exists()
    assert main(["eval", str(run), "output.report_html=false"]) == 0  # `distil eval` follows the switch too
    assert not (run / "report.html").exists()


def test_across_vocabularies_nothing_is_written_and_the_page_says_why(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", seed=0, tokenizer=char_tokenizer(extra_chars="éü"))
    student = save_tiny_model(tmp_path / "student", seed=1)
    data = tmp_path / "text.txt"
    data.write_text("\n\n".join(f"the cat {i} sat in the hat." for i in range(8)))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "teacher": {"source": str(teacher)}, "student": {"source": str(student)},
        "data": {"source": str(data), "seq_len": 16, "eval_size": 2}, "distill": {"method": "crosstok"},
        "train": {"steps": 1, "batch_size": 2, "warmup_steps": 0, "progress": False},
        "output": {"dir": str(tmp_path / "runs")}}))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "x"
    assert (run / "eval.json").is_file() and not (run / "dark_knowledge.json").exists()
    assert "do not share a vocabulary" in (run / "report.html").read_text()


@pytest.mark.parametrize("override, needle", [
    ("eval.dark_knowledge=-1", "eval.dark_knowledge: expected a value >= 0"),
    ("eval.dark_knowledge=33", "eval.dark_knowledge: expected a value <= 32"),
    ("eval.dark_knowledge=two", "eval.dark_knowledge"),
    ("output.report_html=maybe", "output.report_html"),
])
def test_bad_values_are_one_line_exit_2(make_recipe, capsys, override, needle):
    path = make_recipe()
    assert main(["validate", str(path), override]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
