"""Structured pruning (distil/compress/prune.py, method `prune`, `distil prune`): Block Influence by hand, the
sliced model equals the masked full model, GQA stays valid, save/reload, GGUF export, one recipe prunes and
recovers, bad input is one line."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml

from distil.cli import main
from distil.compress import prune as P
from distil.errors import DistilError


def _tiny(seed=0, **overrides):
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    torch.manual_seed(seed)
    cfg = tiny_llama_config(**{"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                               **overrides})
    return AutoModelForCausalLM.from_config(cfg).eval()


def _batches(vocab=106, n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (n, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding: never counted
    return [{"input_ids": ids, "attention_mask": mask}]


def _spec(**kw):
    base = dict(depth=0, depth_score="block_influence", mlp=0.0, heads=0, kv_heads=0, multiple_of=1)
    return SimpleNamespace(**{**base, **kw})


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# ----------------------------------------------------------------------------------------------
# Depth


def test_block_influence_by_hand_and_an_identity_layer_goes_first():
    model = _tiny()
    with torch.no_grad():  # layer 2 adds nothing to the residual stream: its output is its input, BI = 0
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    batches = _batches()
    bi = P.block_influence(model, batches)
    # by hand: capture every layer's input and output, cos in float64 over the real tokens only
    ins, outs = [], []

    def capture(module, args, kwargs, output):
        ins.append(args[0] if args else kwargs["hidden_states"])
        outs.append(output)

    hooks = [layer.register_forward_hook(capture, with_kwargs=True) for layer in model.model.layers]
    _logits(model, batches[0])
    for h in hooks:
        h.remove()
    mask = batches[0]["attention_mask"].bool()
    for i in range(4):
        x, y = ins[i][mask].double(), outs[i][mask].double()
        cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
        assert bi[i] == pytest.approx(float(1 - cos.mean()), rel=1e-9, abs=1e-12)
    assert bi[2] == pytest.approx(0.0, abs=1e-12)
    assert P.choose_layers(bi, 3) == sorted(sorted(range(4), key=lambda i: -bi[i])[:3])
    assert 2 not in P.choose_layers(bi, 3)


def test_choose_layers_uniform_and_ties():
    assert P.choose_layers([0.0] * 30, 10, "uniform") == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert P.choose_layers([0.5, 0.1, 0.5, 0.3], 2) == [0, 2]  # ties keep the earlier layer
    assert P.choose_layers([0.5, 0.1, 0.4, 0.3], 3) == [0, 2, 3]
    with pytest.raises(DistilError, match="prune.depth"):
        P.choose_layers([0.1] * 4, 5)


def test_depth_pruned_model_equals_the_kept_layers_of_the_original():
    from distil.models import Loaded, student_from_teacher

    model = _tiny()
    batches = _batches()
    pruned, report = P.prune(model, _spec(depth=2), batches)
    assert pruned.config.num_hidden_layers == 2 and len(report.layers_kept) == 2
    reference = student_from_teacher(Loaded(model, None, "x", "x"), report.layers_kept).model.eval()
    torch.testing.assert_close(_logits(pruned.eval(), batches[0]), _logits(reference, batches[0]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Width


def test_mlp_scores_are_activation_norms_by_hand():
    model = _tiny()
    batches = _batches()
    scores = P.width_scores(model, batches)
    seen = {}
    layer = model.model.layers[1]
    h = layer.post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.setdefault("x", o))
    _logits(model, batches[0])
    h.remove()
    x = seen["x"][batches[0]["attention_mask"].bool()].double()
    a = torch.nn.functional.silu(x @ layer.mlp.gate_proj.weight.double().T) * (x @ layer.mlp.up_proj.weight.double().T)
    torch.testing.assert_close(scores.mlp[1], a.pow(2).sum(0).sqrt(), rtol=1e-6, atol=1e-9)


def test_choose_heads_keeps_gqa_groups():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.2, 0.3, 0.3, 0.8, 0.1], dtype=torch.float64)  # 2 groups of 4
    # group sums 1.7 and 1.5: group 0 stays; its two best heads are 1 (0.9) and 2 (0.5)
    assert P.choose_heads(scores, 2, 2, 1) == ([1, 2], [0])
    # both groups, two heads each: group 1's best are 6 (0.8) and the tie 4/5 -> 4
    assert P.choose_heads(scores, 2, 4, 2) == ([1, 2, 4, 6], [0, 1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("spec", [dict(mlp=0.5), dict(heads=2), dict(heads=2, kv_heads=1), dict(kv_heads=1),
                                  dict(mlp=0.25, heads=2, kv_heads=2)])
def test_sliced_model_equals_the_masked_original(arch, spec):
    if arch == "qwen2":
        from transformers import AutoModelForCausalLM, Qwen2Config

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(Qwen2Config(
            vocab_size=106, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)).eval()
        with torch.no_grad():  # nonzero q/k/v biases: they must be sliced with their rows
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    else:
        model = _tiny()
    batches = _batches()
    s = _spec(**spec)
    plan = P.width_plan(model, P.width_scores(model, batches), s)
    sliced = P.slice_width(model, plan).eval()
    masked = P.mask_width(model, plan).eval()
    new_i, new_h, new_kv = plan["sizes"]
    assert sliced.model.layers[0].mlp.gate_proj.out_features == new_i
    assert sliced.model.layers[0].self_attn.q_proj.out_features == new_h * 8
    assert sliced.model.layers[0].self_attn.k_proj.out_features == new_kv * 8
    assert P.count_params(sliced) < P.count_params(model)
    torch.testing.assert_close(_logits(sliced, batches[0]), _logits(masked, batches[0]), rtol=1e-5, atol=1e-5)
    # the masked model really differs from the full one (the test would see a no-op slicer)
    assert not torch.allclose(_logits(masked, batches[0]), _logits(model, batches[0]), atol=1e-4)


def test_bad_counts_are_one_line():
    cfg = _tiny().config
    with pytest.raises(DistilError, match="multiple of the 2 KV groups"):
        P.head_counts(cfg, 3, 0)
    with pytest.raises(DistilError, match="at most 2 query heads"):
        P.head_counts(cfg, 4, 1)
    with pytest.raises(DistilError, match=r"\[0, 1\)"):
        P.mlp_width(64, 1.0)
    assert P.mlp_width(1536, 0.5, 256) == 768 and P.mlp_width(1536, 0.6, 256) == 512


def test_an_architecture_the_slicer_does_not_know_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(DistilError, match="found 'gpt2'"):
        P.prune(model, _spec(depth=1), _batches(vocab=50))


# ----------------------------------------------------------------------------------------------
# End to end: distil prune (save, reload, export) and one recipe that prunes and recovers


def _recipe(tmp_path, tiny_teacher, prune, **extra):
    recipe = {"name": "p", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "prune"}, "prune": {"calib_examples": 8, **prune},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}, **extra}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_distil_prune_saves_a_model_that_reloads_and_exports(tmp_path, tiny_teacher):
    import gguf
    from transformers import AutoModelForCausalLM

    from distil.export import export_gguf

    path = _recipe(tmp_path, tiny_teacher, {"depth": 3, "mlp": 0.5, "heads": 2, "kv_heads": 1})
    out = tmp_path / "pruned"
    assert main(["prune", str(path), "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["layers_before"] == 4 and len(report["layers_kept"]) == 3 and len(report["block_influence"]) == 4
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    c = model.config
    assert (c.num_hidden_layers, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == \
        (3, 32, 2, 1, 8)
    assert sum(p.numel() for p in model.parameters()) == report["params_after"]
    result = export_gguf(out, tmp_path / "p.gguf", "F16", modelfile=False)
    reader = gguf.GGUFReader(str(result.path))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight"] == (32, 16) and shapes["blk.0.ffn_up.weight"] == (32, 32)
    assert "blk.3.attn_q.weight" not in shapes
    # an existing output directory is not clobbered
    assert main(["prune", str(path), "--out", str(out)]) == 2


def test_one_recipe_prunes_then_distils(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, {"depth": 2, "mlp": 0.5},
                   eval={"enabled": True, "batch_size": 2})
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "p"
    config = json.loads((run / "student" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["intermediate_size"] == 32
    results = json.loads((run / "eval.json").read_text())["results"]
    assert {"student (before)", "student (prune)", "student (pruned, no recovery)"} <= set(results)
    assert (run / "prune.json").is_file()
    assert "pruned: layers 4 -> 2" in capsys.readouterr().out


@pytest.mark.parametrize("prune,message", [
    ({"mlp": 1.0}, "prune.mlp"),
    ({"mlp": -0.1}, "prune.mlp"),
    ({}, "expected something to prune"),
    ({"heads": 3, "kv_heads": 2}, "multiple of prune.kv_heads"),
])
def test_bad_recipes_exit_2_with_one_line(tmp_path, tiny_teacher, capsys, prune, message):
    path = _recipe(tmp_path, tiny_teacher, prune)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_head_count_the_model_cannot_group_exits_2(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, {"heads": 3})  # 2 KV groups: 3 heads cannot be split evenly
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "prune.heads" in err and "\n" not in err
    assert not (tmp_path / "runs" / "p").exists()  # refused before the run directory is written


def test_pruned_model_runs_in_llama_cpp_with_the_same_logits(tmp_path):
    """Depth + MLP + heads + KV groups pruned (head_dim no longer hidden / heads): llama.cpp's F16 logits are
    transformers' logits (cosine >= 0.9999 at every position)."""
    import numpy as np

    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from distil.export import export_gguf
    from distil.testing import char_tokenizer, save_tiny_model

    src = save_tiny_model(tmp_path / "src", num_hidden_layers=4, hidden_size=64, intermediate_size=128)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    pruned, _ = P.prune(model, _spec(depth=3, mlp=0.5, heads=2, kv_heads=1), _batches())
    pruned.save_pretrained(tmp_path / "pruned")
    char_tokenizer().save_pretrained(tmp_path / "pruned")
    export_gguf(tmp_path / "pruned", tmp_path / "m.gguf", "F16", modelfile=False)
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, n_batch=64)
    try:
        seq = [1] + list(range(10, 30))
        llm.eval(seq)
        got = np.array(llm.scores[:llm.n_tokens])
    finally:
        llm.close()
    with torch.no_grad():
        want = pruned.eval()(input_ids=torch.tensor([seq])).logits[0].numpy()
    cos = (got * want).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(want, axis=-1)
    assert cos.min() >= 0.9999, cos.min()
