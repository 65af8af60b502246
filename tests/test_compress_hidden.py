"""Hidden-channel width pruning (distil/compress/prune.py: hidden_scores, slice_hidden; `prune.hidden`): the
scorer by its formula, a channel of zero importance sliced away changes nothing, the sliced model equals the full
model with the removed residual channels held at zero, tied and untied heads, save/reload, GGUF in llama.cpp."""

import json

import numpy as np
import pytest
import torch

import yaml

from distil.compress import prune as P


def _batches(vocab=106, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: never counted
    return [{"input_ids": ids, "attention_mask": mask}]


def _spec(**kw):
    from types import SimpleNamespace

    base = dict(depth=0, depth_score="block_influence", mlp=0.0, hidden=0.0, heads=0, kv_heads=0, multiple_of=1)
    return SimpleNamespace(**{**base, **kw})


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _recipe(tmp_path, tiny_teacher, prune):
    recipe = {"name": "p", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "prune"}, "prune": {"calib_examples": 8, **prune},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _model(seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(**{"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                               **overrides})
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norm weights: a scorer that ignored them would be seen
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _rms(x, w, eps):
    """RMSNorm by its formula, float64: x / sqrt(mean(x^2) + eps) * w."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * w.double()


def test_hidden_scores_are_the_l2_norms_of_every_rmsnorm_output_by_formula():
    model = _model()
    batches = _batches()
    scores = P.hidden_scores(model, batches)
    # by hand: capture each norm's INPUT, apply the RMSNorm formula in float64, sum squares over real tokens
    inputs = []
    norms = []
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    norms.append(model.model.norm)
    hooks = [n.register_forward_hook(lambda m, a, o: inputs.append((m, a[0]))) for n in norms]
    _logits(model, batches[0])
    for h in hooks:
        h.remove()
    mask = batches[0]["attention_mask"].bool()
    eps = model.config.rms_norm_eps
    want = torch.zeros(model.config.hidden_size, dtype=torch.float64)
    for module, x in inputs:
        want += _rms(x[mask].double(), module.weight, eps).pow(2).sum(0)
    assert len(inputs) == 2 * 2 + 1
    torch.testing.assert_close(scores, want.sqrt(), rtol=1e-5, atol=1e-9)


def _hold_channels_at_zero(model, channels):
    """Channels `channels` of the residual stream are 0 at every position: embedding columns and the o_proj /
    down_proj rows that write into them are zeroed (P.mask_hidden's reference, in place)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, channels] = 0.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0.0
            layer.mlp.down_proj.weight[channels] = 0.0


@pytest.mark.parametrize("tied", [True, False])
def test_a_channel_of_zero_importance_is_sliced_away_without_changing_the_outputs(tied):
    # eps ~ 0: the only term that does not scale with sqrt(H / H') (see the module docstring)
    model = _model(tie_word_embeddings=tied, rms_norm_eps=1e-12)
    zero = [5, 17, 22, 29]  # 4 channels: 28 kept is a multiple of the 4 heads (transformers requires it)
    _hold_channels_at_zero(model, zero)
    batches = _batches()
    scores = P.hidden_scores(model, batches)
    assert all(float(scores[c]) == 0.0 for c in zero) and float(scores.min()) == 0.0
    assert (scores > 0).sum() == 28
    pruned, report = P.prune(model, _spec(hidden=4 / 32), batches)
    assert report.hidden_kept == 28 and pruned.config.hidden_size == 28
    assert pruned.model.embed_tokens.weight.shape == (106, 28)
    assert pruned.lm_head.weight.shape == (106, 28)
    assert (pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()) == tied
    torch.testing.assert_close(_logits(pruned.eval(), batches[0]), _logits(model, batches[0]), rtol=1e-5, atol=1e-5)
    # without the sqrt(H / H') gain on the norm weights the outputs would move: the gain is doing the work
    raw = P.slice_hidden(model, [c for c in range(32) if c not in zero])
    with torch.no_grad():
        for name, p in raw.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.mul_((28 / 32) ** 0.5)
    assert not torch.allclose(_logits(raw.eval(), batches[0]), _logits(model, batches[0]), atol=1e-3)


def test_sliced_model_equals_the_full_model_with_the_removed_channels_at_zero():
    model = _model(rms_norm_eps=1e-12)
    batches = _batches()
    keep = P._topk_sorted(P.hidden_scores(model, batches), 20)
    sliced = P.slice_hidden(model, keep).eval()
    masked = P.mask_hidden(model, keep).eval()
    torch.testing.assert_close(_logits(sliced, batches[0]), _logits(masked, batches[0]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(masked, batches[0]), _logits(model, batches[0]), atol=1e-3)
    assert P.count_params(sliced) < P.count_params(model)


def test_qwen2_biases_and_every_width_at_once():
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        vocab_size=106, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-12)).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    batches = _batches()
    pruned, report = P.prune(model, _spec(depth=2, mlp=0.5, heads=2, kv_heads=1, hidden=0.25), batches)
    c = pruned.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.hidden_size, c.head_dim) == (2, 32, 2, 1, 24, 8)
    assert "hidden 32 -> 24" in report.summary()
    assert report.params_after == P.count_params(pruned)
    _logits(pruned.eval(), batches[0])  # runs


def test_distil_prune_hidden_saves_reloads_and_runs_in_llama_cpp(tmp_path, tiny_teacher):
    """`distil prune` with prune.hidden: a config transformers reloads, a GGUF that llama.cpp loads and whose
    logits are transformers' (cosine >= 0.9999 at every position)."""
    from transformers import AutoModelForCausalLM

    from distil.cli import main
    from distil.export import export_gguf

    path = _recipe(tmp_path, tiny_teacher, {"hidden": 0.5, "mlp": 0.5, "depth": 3})
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["hidden_before"] == 32 and report["hidden_kept"] == 16
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert (model.config.hidden_size, model.config.head_dim, model.config.num_hidden_layers) == (16, 8, 3)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    result = export_gguf(out, tmp_path / "h.gguf", "F16", modelfile=False)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=64, logits_all=True, verbose=False, n_threads=1,
                          n_batch=64)
    try:
        seq = [1] + list(range(10, 30))
        llm.eval(seq)
        got = np.array(llm.scores[:llm.n_tokens])
    finally:
        llm.close()
    with torch.no_grad():
        want = model(input_ids=torch.tensor([seq])).logits[0].numpy()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.9999, cos.min()


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_hidden_ratio_outside_0_1_exits_2_with_one_line(tmp_path, tiny_teacher, capsys, value):
    from distil.cli import main

    path = _recipe(tmp_path, tiny_teacher, {"hidden": value})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prune.hidden" in err and "\n" not in err


def test_hidden_width_rounds_to_multiple_of_and_the_heads():
    # SmolLM2-135M: hidden 576, 9 heads; transformers refuses a hidden_size that is not a multiple of the heads
    assert P.hidden_width(576, 1 / 3, 1, 9) == 378  # 384 -> 42 x 9
    assert P.hidden_width(576, 1 / 3, 1, 8) == 384
    assert P.hidden_width(576, 0.1, 256, 8) == 512
    assert P.hidden_width(576, 1 / 3, 128, 6) == 384  # lcm(128, 6) = 384
    assert P.hidden_width(576, 0.0, 256, 9) == 576  # 0 = nothing removed, whatever multiple_of says
    assert P.mlp_width(1536, 0.0, 256) == 1536
    with pytest.raises(P.DistilError, match="prune.hidden: keeping"):
        P.hidden_width(576, 0.5, 256, 9)  # a multiple of lcm(256, 9) = 2304 cannot be kept


def test_a_hidden_pruned_smollm_shaped_model_saves_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(hidden_size=36, num_attention_heads=9, num_key_value_heads=3, intermediate_size=64)
    pruned, report = P.prune(model, _spec(hidden=1 / 3), _batches())
    assert report.hidden_kept == 18  # 24 rounded down to a multiple of the 9 heads
    pruned.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert back.config.hidden_size == 18 and back.config.head_dim == 4


def test_calibration_data_shorter_than_asked_exits_2_before_anything_is_written(tmp_path, tiny_teacher, capsys):
    from distil.cli import main

    path = _recipe(tmp_path, tiny_teacher, {"hidden": 0.25, "calib_examples": 100000})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prune.calib_examples: expected 100000 calibration examples" in err and "\n" not in err
    assert not (tmp_path / "runs" / "p").exists()


def test_calibration_batches_refuses_too_few_examples():
    from distil.compress.calibration import calibration_batches
    from distil.errors import DistilError

    ex = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}] * 3
    assert len(calibration_batches(ex, 3, 2, 0)) == 2
    with pytest.raises(DistilError, match="expected 4 calibration examples .* found 3"):
        calibration_batches(ex, 4, 2, 0, "sparse.calib_examples")
