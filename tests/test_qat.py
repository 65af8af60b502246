"""Quantization-aware training (distil/compress/qat.py, method `qat`): Q4_0 fake quantization equals ggml's
(gguf-py's) and is idempotent, the converted model computes what the fake-quantized model computed, and one recipe
trains with fake quantization against the full-precision teacher; Q4_0 export then holds the trained weights
exactly."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from distil.cli import main
from distil.compress import qat as Q
from distil.compress.quantize import scales
from distil.compress.sparsity import prunable


def _model():
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).eval()


def test_q4_0_fake_quantization_is_ggmls():
    from gguf import quants

    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g) * torch.rand(8, 1, generator=g)
    w[0, :32] = 0.0  # an all-zero block
    w[1, 5] = -3.0  # a negative extreme
    blocks = w.numpy().reshape(-1, 32)
    ggml = quants.Q4_0.dequantize_blocks(quants.Q4_0.quantize_blocks(blocks)).reshape(w.shape)
    ours = Q.q4_0_fake(w)
    np.testing.assert_array_equal(ours.numpy(), ggml)
    # idempotent: Q4_0 of the trained (already quantized) weights changes nothing
    np.testing.assert_array_equal(Q.q4_0_fake(ours).numpy(), ours.numpy())


def test_int4_grid_and_straight_through_gradient():
    spec = SimpleNamespace(grid="int4", group_size=8)
    w = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    out = Q.FakeQuant(spec)(w)
    q = out.detach().reshape(4, 2, 8) / scales(w.detach(), 4, 8)
    torch.testing.assert_close(q, q.round())
    c = torch.randn(4, 16, dtype=torch.float64)
    (out * c).sum().backward()
    torch.testing.assert_close(w.grad, c)


@pytest.mark.parametrize("grid", ["int4", "q4_0"])
def test_converted_model_outputs_match_the_fake_quantized_model(grid):
    spec = SimpleNamespace(grid=grid, group_size=16)
    model = _model()
    ids = torch.randint(6, 100, (2, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
    Q.prepare(model, spec)
    assert Q.is_prepared(model)
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    Q.convert(model)
    assert not Q.is_prepared(model)
    assert all(type(lin.weight) is torch.nn.Parameter for lin in prunable(model).values())
    with torch.no_grad():
        converted = model(input_ids=ids).logits
    torch.testing.assert_close(converted, fake, rtol=0, atol=0)
    assert not torch.allclose(fake, full, atol=1e-3)  # the quantization did something


def _recipe(tmp_path, tiny_teacher, qat, **extra):
    recipe = {"name": "qat", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "qat"}, "qat": qat,
              "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": True, "batch_size": 2}, "output": {"dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_qat_recipe_trains_and_exports_q4_0_exactly(tmp_path, tiny_teacher):
    from gguf import GGUFReader, quants
    from transformers import AutoModelForCausalLM

    path = _recipe(tmp_path, tiny_teacher, {"grid": "q4_0"},
                   export={"enabled": True, "quant": "Q4_0", "modelfile": False})
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "qat"
    results = json.loads((run / "eval.json").read_text())["results"]
    assert {"student (before)", "student (qat)", "student (ptq, no training)"} <= set(results)
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    w = student.model.layers[1].mlp.up_proj.weight.detach()
    np.testing.assert_array_equal(Q.q4_0_fake(w).numpy(), w.numpy())  # on the grid
    assert not torch.equal(w, Q.q4_0_fake(teacher.model.layers[1].mlp.up_proj.weight.detach()))  # and trained
    reader = GGUFReader(str(next((run / "export").glob("*.gguf"))))
    tensor = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    assert tensor.tensor_type.name == "Q4_0"
    back = quants.dequantize(tensor.data, tensor.tensor_type).reshape(w.shape)
    np.testing.assert_array_equal(back, w.numpy())  # the GGUF holds exactly the weights QAT trained


def test_qat_int4_saves_weights_on_the_int4_grid(tmp_path, tiny_teacher):
    from transformers import AutoModelForCausalLM

    path = _recipe(tmp_path, tiny_teacher, {"grid": "int4", "group_size": 16})
    assert main(["run", str(path)]) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "runs" / "qat" / "student")
    for lin in prunable(student).values():
        groups = lin.weight.detach().double().reshape(lin.weight.shape[0], -1, 16)
        unit = groups.abs().amax(-1, keepdim=True).clamp(min=1e-30)
        # every group is k * s with integer k in [-8, 7]: its largest |k| is 8 or 7, so w / (max|w| / 8) or
        # w / (max|w| / 7) is an integer vector
        on = [((groups / (unit / k)) - (groups / (unit / k)).round()).abs().amax(-1) < 1e-4 for k in (8, 7)]
        assert (on[0] | on[1]).all()
