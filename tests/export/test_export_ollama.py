"""Ollama Modelfile: FROM, TEMPLATE in Go template syntax, SYSTEM, stop parameters."""

from distil.export.ollama import default_system_prompt, write_modelfile

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
           "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
          "m['content'] + '<|eot_id|>' }}{% endfor %}")


def test_chatml_modelfile(tmp_path):
    mf = write_modelfile(tmp_path / "student.gguf", SMOLLM2, eos="<|im_end|>")
    text = mf.read_text()
    assert mf == tmp_path / "student.Modelfile"
    assert "FROM ./student.gguf\n" in text
    assert 'TEMPLATE """' in text and "<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>" in text
    assert "{{ .System }}" in text and "range $i, $_ := .Messages" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1 and 'PARAMETER stop "<|im_start|>"' in text


def test_llama3_modelfile_and_explicit_stops(tmp_path):
    text = write_modelfile(tmp_path / "m.gguf", LLAMA3, stop=["<|eot_id|>"]).read_text()
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in text
    assert 'PARAMETER stop "<|eot_id|>"' in text and "<|end_header_id|>\"" not in text
    assert "SYSTEM" not in text


def test_base_model_gets_a_completion_template(tmp_path):
    text = write_modelfile(tmp_path / "m.gguf", None, eos="</s>", num_ctx=512).read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in text
    assert 'PARAMETER stop "</s>"' in text and "PARAMETER num_ctx 512" in text


def test_unrecognised_template_is_left_to_ollama(tmp_path):
    text = write_modelfile(tmp_path / "m.gguf", "{{ messages[0]['content'] }}").read_text()
    assert "TEMPLATE" not in text and "not recognised" in text


def test_system_prompt_is_only_taken_when_literal():
    assert default_system_prompt(SMOLLM2).startswith("You are a helpful AI assistant")
    assert default_system_prompt("{{ '<|im_start|>system\n' + messages[0]['content'] }}") is None
    assert default_system_prompt(None) is None


def test_export_writes_the_modelfile_next_to_the_gguf(model_dir, tmp_path):
    from distil.export import export_gguf

    res = export_gguf(model_dir(), tmp_path / "tiny.gguf", "Q8_0")
    text = res.modelfile.read_text()
    assert res.modelfile.parent == tmp_path and "FROM ./tiny.gguf" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    assert export_gguf(model_dir(), tmp_path / "bare.gguf", "Q8_0", modelfile=False).modelfile is None
