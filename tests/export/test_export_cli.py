"""`distil export` on a run directory, its bad input, and a GGUF file as a model source."""

import pytest
import torch

from distil.cli import main
from distil.models import load_model


def test_export_a_run_directory_and_load_it_back_as_a_source(make_recipe, tmp_path, capsys, model_dir, fp32):
    assert main(["run", str(make_recipe())]) == 0
    out = tmp_path / "student.gguf"
    assert main(["export", str(tmp_path / "runs" / "t"), "--gguf", str(out), "--quant", "Q8_0"]) == 0
    assert out.is_file() and out.with_suffix(".Modelfile").is_file()
    assert "wrote" in capsys.readouterr().out

    # A GGUF file is itself a model source (transformers dequantizes, distil rebuilds a plain model).
    src = model_dir(arch="llama", tied=True, tok="gpt2")
    f32 = tmp_path / "f32.gguf"
    assert main(["export", str(src), "--gguf", str(f32), "--quant", "F32", "--no-modelfile"]) == 0
    a, b = load_model(str(src)), load_model(str(f32))
    x = torch.randint(0, len(a.tokenizer), (1, 16))
    with torch.no_grad():  # F32 holds the weights exactly: the same logits to fp32 precision
        fp32.assert_close(b.model(x).logits, a.model(x).logits, terms=a.model.config.intermediate_size)
    b.model.save_pretrained(tmp_path / "rebuilt")  # the rebuilt model saves like any other
    assert (tmp_path / "rebuilt" / "model.safetensors").is_file()


@pytest.mark.parametrize("out,quant,needle", [
    ("o.gguf", "Q3_X", "Q4_K_M"),  # the message lists the valid names
    ("/nonexistent/dir/x.gguf", "Q8_0", "/nonexistent/dir"),
])
def test_export_bad_input_one_line_exit_2(model_dir, tmp_path, capsys, out, quant, needle):
    src = model_dir(arch="llama", tied=True, tok="gpt2")
    assert main(["export", str(src), "--gguf", str(tmp_path / out), "--quant", quant]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind
