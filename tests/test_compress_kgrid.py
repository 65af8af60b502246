"""QAT on llama.cpp's Q4_K_M grid (`qat.grid: q4_k`, distil/compress/kgrid.py): the fake quantization is the
dequantized Q4_K bytes of export/kquants.py (decoded here by hand from ggml's block layout), each matrix gets the
type Q4_K_M gives it, the straight-through gradient and the once-per-step cache, and a Q4_K_M export of the trained
student holds exactly the weights it was trained with."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

from distil.compress import kgrid
from distil.compress import qat as Q
from distil.compress.sparsity import prunable
from distil.export.kquants import quantize_k
from distil.export.tensors import permute_rows


def _q4_k_by_hand(raw: np.ndarray) -> np.ndarray:
    """ggml's dequantize_row_q4_K, block by block: d, dmin (fp16), 12 bytes of 6-bit scales/mins, 128 bytes of
    nibbles; y = (d * sc) * q - (dmin * m) in float32, sub-block 2p in the low nibbles of qs[32p:32p+32], 2p+1 in
    the high ones."""
    out = np.empty((raw.shape[0], 256), np.float32)
    for b, block in enumerate(raw):
        d = block[0:2].view(np.float16)[0].astype(np.float32)
        dmin = block[2:4].view(np.float16)[0].astype(np.float32)
        q = block[4:16].astype(np.int32)
        qs = block[16:144]

        def scale_min(j):
            if j < 4:
                return q[j] & 63, q[j + 4] & 63
            return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)

        for p in range(4):
            for half in range(2):
                sc, m = scale_min(2 * p + half)
                nib = (qs[32 * p:32 * p + 32] >> (4 * half)) & 0xF
                d1, m1 = np.float32(d * np.float32(sc)), np.float32(dmin * np.float32(m))
                out[b, 64 * p + 32 * half:64 * p + 32 * half + 32] = d1 * nib.astype(np.float32) - m1
    return out


def test_q4_k_fake_quantization_is_the_dequantized_kquants_bytes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 512, generator=g) * torch.rand(4, 1, generator=g) * 0.1
    w[0, :256] = 0.0  # an all-zero super-block
    w[1, 3] = 2.0  # an outlier
    w[2, 256:] = w[2, 256:].abs() + 0.01  # all positive: min clamped to 0
    raw = quantize_k(w.numpy(), "Q4_K").reshape(-1, 144)
    want = _q4_k_by_hand(raw).reshape(w.shape)
    got = kgrid.fake_quantize(w, "Q4_K")
    np.testing.assert_array_equal(got.numpy(), want)
    assert not np.array_equal(want, w.numpy())
    # at most 16 levels per sub-block of 32
    assert max(len(np.unique(want.reshape(-1, 32)[i])) for i in range(want.size // 32)) <= 16
    # what QAT trains with is a fixed point of Q: Q4_K of it gives it back
    grid = kgrid.on_grid(w, "Q4_K")
    np.testing.assert_array_equal(kgrid.fake_quantize(grid, "Q4_K").numpy(), grid.numpy())


def test_on_grid_is_a_fixed_point_where_requantizing_moves_a_super_block():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 256, generator=g) * 0.02
    once = kgrid.fake_quantize(w, "Q4_K")
    twice = kgrid.fake_quantize(once, "Q4_K")
    grid = kgrid.on_grid(w, "Q4_K")
    np.testing.assert_array_equal(kgrid.fake_quantize(grid, "Q4_K").numpy(), grid.numpy())
    same = (twice == once).all(1)  # rows Q does not move are Q(w) as they are
    np.testing.assert_array_equal(grid[same].numpy(), once[same].numpy())


def test_each_matrix_gets_the_type_q4_k_m_gives_it():
    # llama.cpp: rows of 576 (SmolLM2's hidden) are not a multiple of 256 -> Q5_0; ffn_down (rows of 1536) is Q6_K
    # in layers i < n/8, i >= 7n/8 and (i - n/8) % 3 == 2, else Q4_K (n = 30: n/8 = 3, 7n/8 = 26)
    t = kgrid.q4_k_m_type
    assert t("model.layers.4.self_attn.q_proj", (576, 576), 30) == "Q5_0"
    assert t("model.layers.4.mlp.down_proj", (576, 1536), 30) == "Q4_K"
    assert t("model.layers.0.mlp.down_proj", (576, 1536), 30) == "Q6_K"
    assert t("model.layers.5.mlp.down_proj", (576, 1536), 30) == "Q6_K"
    assert t("model.layers.26.mlp.down_proj", (576, 1536), 30) == "Q6_K"
    assert t("model.layers.5.self_attn.v_proj", (192, 512), 30) == "Q6_K"
    assert t("model.layers.4.self_attn.v_proj", (192, 512), 30) == "Q4_K"
    assert t("model.layers.4.mlp.up_proj", (1536, 512), 30) == "Q4_K"


def test_straight_through_gradient_and_one_quantization_per_weight_version():
    spec = SimpleNamespace(grid="q4_k", group_size=32)
    fq = Q.FakeQuant(spec, "Q4_K")
    w = torch.nn.Parameter(torch.randn(2, 256, dtype=torch.float32))
    out = fq(w)
    np.testing.assert_array_equal(out.detach().numpy(), kgrid.on_grid(w.detach(), "Q4_K").numpy())
    c = torch.randn(2, 256)
    (out * c).sum().backward()
    torch.testing.assert_close(w.grad, c)
    cached = fq._w_hat
    assert fq(w).detach().data_ptr() != 0 and fq._w_hat is cached  # same weights: not quantized again
    with torch.no_grad():
        w.add_(0.5)  # the optimizer's in-place update
    np.testing.assert_array_equal(fq(w).detach().numpy(), kgrid.on_grid(w.detach(), "Q4_K").numpy())
    assert fq._w_hat is not cached


def _k_teacher(tmp_path):
    from distil.testing import save_tiny_model

    # rows of 256: Q4_K (and Q6_K for attn_v / ffn_down of the layers Q4_K_M favours) instead of the Q5_0 fallback
    return save_tiny_model(tmp_path / "teacher", num_hidden_layers=2, hidden_size=256, intermediate_size=256,
                           num_attention_heads=4, num_key_value_heads=2)


def test_qat_q4_k_recipe_trains_and_the_q4_k_m_export_holds_the_trained_weights(tmp_path):
    from gguf import GGUFReader, quants
    from transformers import AutoModelForCausalLM

    from distil.cli import main

    teacher = _k_teacher(tmp_path)
    recipe = {"name": "qk", "teacher": {"source": str(teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "qat"}, "qat": {"grid": "q4_k"},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": True, "batch_size": 2}, "output": {"dir": str(tmp_path / "runs")},
              "export": {"enabled": True, "quant": "Q4_K_M", "modelfile": False}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "qk"
    results = json.loads((run / "eval.json").read_text())["results"]
    assert {"student (qat)", "student (ptq, no training)"} <= set(results)
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    start = AutoModelForCausalLM.from_pretrained(teacher)
    reader = GGUFReader(str(next((run / "export").glob("*.gguf"))))
    tensors = {t.name: t for t in reader.tensors}
    seen = set()
    for name, lin in prunable(student).items():
        w = lin.weight.detach().numpy()
        t = tensors[kgrid.gguf_name(name)]
        seen.add(t.tensor_type.name)
        back = quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
        if name.endswith(("q_proj", "k_proj")):  # llama.cpp's rope layout: rows permuted head by head
            heads = student.config.num_attention_heads if name.endswith("q_proj") else 2
            w = w[permute_rows(w.shape[0], heads)]
        np.testing.assert_array_equal(back, w)  # the GGUF holds exactly the weights QAT trained
    assert {"Q4_K", "Q6_K"} <= seen
    w0 = start.model.layers[1].mlp.up_proj.weight.detach()
    assert not np.array_equal(kgrid.fake_quantize(w0, "Q4_K").numpy(),
                              student.model.layers[1].mlp.up_proj.weight.detach().numpy())  # and trained


@pytest.mark.parametrize("grid", ["q4_k"])
def test_converted_model_outputs_match_the_fake_quantized_model(grid):
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(hidden_size=256, intermediate_size=256)).eval()
    ids = torch.randint(6, 100, (2, 12))
    Q.prepare(model, SimpleNamespace(grid=grid, group_size=32))
    with torch.no_grad():
        fake = model(input_ids=ids).logits
    Q.convert(model)
    with torch.no_grad():
        converted = model(input_ids=ids).logits
    torch.testing.assert_close(converted, fake, rtol=0, atol=0)
