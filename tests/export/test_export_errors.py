"""Bad input gets one clear DistilError, and never a half-written GGUF under the final name."""

import json
import shutil

import pytest

from distil.errors import DistilError
from distil.export import export_gguf
from distil.export import tensors as encoding


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unknown_quant_type_lists_the_valid_ones(model_dir, tmp_path):
    with pytest.raises(DistilError, match=r"quant type 'Q3_K_S' does not exist; expected one of: "
                                          r"F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q4_K_M, Q5_K_M, Q6_K"):
        export_gguf(model_dir(), tmp_path / "m.gguf", "Q3_K_S")


def test_output_directory_must_exist(model_dir, tmp_path):
    with pytest.raises(DistilError, match="output directory .*missing.* does not exist"):
        export_gguf(model_dir(), tmp_path / "missing" / "m.gguf")


def test_unsupported_architecture_lists_the_supported_ones(model_dir, tmp_path):
    d = copy_dir(model_dir(), tmp_path / "gpt2")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(DistilError, match=r"model_type 'gpt2'.*supported: llama, mistral, qwen2"):
        export_gguf(d, tmp_path / "m.gguf")


def test_pickle_only_directory_is_refused(model_dir, tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(model_dir() / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(DistilError, match=r"expected \*\.safetensors.*pytorch_model\.bin.*pickle"):
        export_gguf(d, tmp_path / "m.gguf")


def test_layers_of_different_widths_are_refused(model_dir, tmp_path):
    """A pruned student whose layer 1 kept fewer FFN channels than layer 0."""
    from safetensors.numpy import load_file, save_file

    d = copy_dir(model_dir(), tmp_path / "ragged")
    t = load_file(d / "model.safetensors")
    for name in ("gate_proj", "up_proj"):
        key = f"model.layers.1.mlp.{name}.weight"
        t[key] = t[key][:96].copy()
    t["model.layers.1.mlp.down_proj.weight"] = t["model.layers.1.mlp.down_proj.weight"][:, :96].copy()
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DistilError, match=r"layers with different widths after pruning cannot be "
                                          r"loaded by llama\.cpp"):
        export_gguf(d, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_unknown_pre_tokenizer_is_a_clear_error(model_dir, tmp_path):
    d = copy_dir(model_dir(), tmp_path / "odd-tokenizer")
    tok = json.loads((d / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(DistilError, match=r"not one distil can name for llama\.cpp.*pre_tokenizer=NAME"):
        export_gguf(d, tmp_path / "m.gguf")
    with pytest.raises(DistilError, match=r"pre_tokenizer='nonsense' is not a llama\.cpp pre-tokenizer"):
        export_gguf(d, tmp_path / "m.gguf", pre_tokenizer="nonsense")
    export_gguf(d, tmp_path / "m.gguf", "F16", pre_tokenizer="gpt-2")  # the documented way out


def test_nan_weights_are_refused(model_dir, tmp_path):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = copy_dir(model_dir(), tmp_path / "nan")
    t = load_file(d / "model.safetensors")
    t["model.layers.0.mlp.up_proj.weight"][3, 3] = np.nan
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DistilError, match="model.layers.0.mlp.up_proj.weight contains nan or inf"):
        export_gguf(d, tmp_path / "m.gguf")


def test_failure_mid_write_keeps_the_old_file_and_leaves_no_temp(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous export")
    calls = {"n": 0}
    real = encoding.quantize_tensor

    def flaky(data, qtype):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # e.g. Ctrl-C halfway through the tensors
        return real(data, qtype)

    monkeypatch.setattr(encoding, "quantize_tensor", flaky)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(model_dir(), out, "Q8_0")
    assert out.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
