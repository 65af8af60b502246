"""Weight-only post-training quantization (distil/compress/quantize.py, method `ptq`): the grid by hand, torchao
and the fallback agree, the fallback is taken (and said once) when torchao is missing, the quality loss is
reported."""

import json
import sys

import pytest
import torch
import yaml

from distil.cli import main
from distil.compress import quantize as Q
from distil.compress.sparsity import prunable
from distil.errors import DistilError


def _model():
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def test_symmetric_grid_by_hand():
    # int4, one group of 4: s = max|w| / 7.5 = 1; q = round(w / s) (half to even), clamped to [-8, 7]
    w = torch.tensor([[3.7, -7.5, 0.4, 1.2]], dtype=torch.float64)
    assert Q.fake_quantize(w, 4, 4).tolist() == [[4.0, -8.0, 0.0, 1.0]]
    # the positive extreme is clamped to 7
    assert Q.fake_quantize(torch.tensor([[7.5, 1.0]], dtype=torch.float64), 4, 2).tolist() == [[7.0, 1.0]]
    # int8, two groups of 2 with their own scales: s1 = 127.5 / 127.5 = 1; s2 = 2.55 / 127.5 = 0.02
    w = torch.tensor([[127.5, 3.4, 2.55, -0.5]], dtype=torch.float64)
    torch.testing.assert_close(Q.fake_quantize(w, 8, 2), torch.tensor([[127.0, 3.0, 2.54, -0.5]],
                                                                       dtype=torch.float64))
    # group_size 0: one scale per row
    w = torch.tensor([[7.5, 0.6], [0.75, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(Q.fake_quantize(w, 4, 0), torch.tensor([[7.0, 1.0], [0.7, 0.1]], dtype=torch.float64))


def test_ste_passes_the_gradient_straight_through():
    w = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 8, dtype=torch.float64)
    out = Q.fake_quantize_ste(w, 4, 8)
    torch.testing.assert_close(out.detach(), Q.fake_quantize(w.detach(), 4, 8))
    (out * c).sum().backward()
    torch.testing.assert_close(w.grad, c)


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 0), (8, 16)])
def test_fallback_puts_every_weight_on_the_grid(bits, group):
    model = _model()
    before = {n: lin.weight.detach().clone() for n, lin in prunable(model).items()}
    assert Q.quantize_(model, Q.QuantConfig(bits=bits, group_size=group, backend="fake")) == "fake"
    for name, lin in prunable(model).items():
        s = Q.scales(before[name], bits, group)
        q = Q._groups(lin.weight.detach(), group) / s
        torch.testing.assert_close(q, q.round(), rtol=0, atol=1e-4)
        lo, hi = Q.qrange(bits)
        assert q.round().min() >= lo and q.round().max() <= hi
    # embeddings and head untouched
    assert torch.equal(model.model.embed_tokens.weight, _model().model.embed_tokens.weight)


def test_torchao_and_the_fallback_agree():
    pytest.importorskip("torchao")
    model, fake = _model(), _model()
    config = Q.QuantConfig(bits=4, group_size=32, backend="torchao")
    assert Q.quantize_(model, config) == "torchao"
    Q.quantize_(fake, Q.QuantConfig(bits=4, group_size=32, backend="fake"))
    ids = torch.randint(6, 100, (2, 12))
    with torch.no_grad():
        y_ao, y_fake = model(input_ids=ids).logits, fake(input_ids=ids).logits
    Q.dequantize_(model)
    for (name, a), b in zip(prunable(model).items(), prunable(fake).values()):
        assert type(a.weight) is torch.nn.Parameter
        s = Q.scales(a.weight.detach(), 4, 32).repeat_interleave(32, 1).reshape(a.weight.shape)
        step = ((a.weight - b.weight).abs() / s).round()
        # the same grid; the codes differ (by one step) only where w / s is a hair from the clamp at the extreme
        assert step.max() <= 1 and (step > 0).float().mean() < 0.02, name
    torch.testing.assert_close(y_ao, y_fake, rtol=0.05, atol=0.05)


def test_torchao_missing_falls_back_once_or_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao -> ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    monkeypatch.setattr(Q, "_NOTED", set())
    said = []
    assert Q.quantize_(_model(), Q.QuantConfig(backend="auto"), echo=said.append) == "fake"
    assert Q.quantize_(_model(), Q.QuantConfig(backend="auto"), echo=said.append) == "fake"
    assert len(said) == 1 and "fake-quant fallback" in said[0]
    with pytest.raises(DistilError, match="quantize.backend: torchao"):
        Q.quantize_(_model(), Q.QuantConfig(backend="torchao"))


def test_a_group_that_does_not_divide_the_rows_is_refused():
    with pytest.raises(DistilError, match="group_size 48"):
        Q.quantize_(_model(), Q.QuantConfig(group_size=48, backend="fake"))


def _recipe(tmp_path, tiny_teacher, **ptq):
    recipe = {"name": "q", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "ptq"}, "ptq": ptq,
              "train": {"steps": 1, "progress": False},
              "eval": {"enabled": True, "batch_size": 2}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_ptq_recipe_reports_the_quality_loss(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    path = _recipe(tmp_path, tiny_teacher, bits=4, group_size=32, backend="auto")
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "q"
    results = json.loads((run / "eval.json").read_text())["results"]
    # the teacher itself: a KL of identical distributions, up to fp32 rounding of a sum over 49k terms per token
    assert abs(results["student (before)"]["kl"]) < 1e-4
    assert results["student (ptq)"]["kl"] > 1e-6
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    w = student.model.layers[0].mlp.up_proj.weight.detach()
    assert len(torch.unique(w[0])) <= 16  # one group of 32 per row: at most 16 int4 values


@pytest.mark.parametrize("ptq,message", [({"bits": 3}, "ptq.bits"), ({"group_size": -1}, "ptq.group_size"),
                                         ({"backend": "gpu"}, "ptq.backend")])
def test_bad_input_is_one_line(tmp_path, tiny_teacher, capsys, ptq, message):
    path = _recipe(tmp_path, tiny_teacher, **ptq)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
