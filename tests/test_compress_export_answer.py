"""The export stage's llama.cpp answer (distil/generate.py: llamacpp_answer, export_prompt_block): the answer with
llama.cpp's own timings (tokens/s), the teacher's row beside the student's when the teacher is a GGUF, and which
teacher sources are GGUFs."""

from pathlib import Path

import pytest

from distil.generate import LlamaCppAnswer, teacher_gguf


def test_decode_speed_times_the_tokens_asked_for_even_past_the_end_of_turn(tmp_path):
    pytest.importorskip("llama_cpp")
    import llama_cpp

    from distil.export import export_gguf
    from distil.generate import llamacpp_decode_speed
    from distil.testing import save_tiny_model

    gguf = export_gguf(save_tiny_model(tmp_path / "m"), tmp_path / "m.gguf", "F16", modelfile=False).path
    seen = {}
    real = llama_cpp.llama_perf_context

    def spy(ctx):
        seen["perf"] = real(ctx)
        return seen["perf"]

    llama_cpp.llama_perf_context = spy
    try:
        tps = llamacpp_decode_speed(gguf, "hi", 9, n_threads=1)
    finally:
        llama_cpp.llama_perf_context = real
    assert seen["perf"].n_eval == 8  # 9 tokens: the prompt's decode gives the first, 8 more decodes
    assert tps == pytest.approx(1000.0 * 8 / seen["perf"].t_eval_ms)


def test_tokens_per_s_is_decoded_tokens_over_decode_time():
    a = LlamaCppAnswer(text="x", prompt_tokens=20, tokens=8, prompt_ms=100.0, decode_ms=350.0, decoded=7,
                       wall_s=0.5, threads=1)
    assert a.tokens_per_s == pytest.approx(7 / 0.35)
    assert a.prompt_tokens_per_s == pytest.approx(200.0)
    assert "20.0 tokens/s generating" in a.speed() and "1 thread" in a.speed()
    none = LlamaCppAnswer(text="", prompt_tokens=0, tokens=0, prompt_ms=0.0, decode_ms=0.0, decoded=0, wall_s=0.0,
                          threads=2)
    assert none.tokens_per_s is None and none.prompt_tokens_per_s is None and "2 threads" in none.speed()


def test_teacher_gguf_sources(tmp_path):
    f = tmp_path / "t.gguf"
    f.write_bytes(b"GGUF")
    assert teacher_gguf(str(f)) == f
    assert teacher_gguf(str(tmp_path / "missing.gguf")) is None
    assert teacher_gguf(str(tmp_path)) is None  # a Hugging Face directory: no GGUF to ask
    assert teacher_gguf(None) is None


def test_export_prompt_block_gives_the_student_and_the_gguf_teacher_with_tokens_per_s(tmp_path):
    pytest.importorskip("llama_cpp")
    from distil.export import export_gguf
    from distil.generate import export_prompt_block
    from distil.testing import save_tiny_model

    student = save_tiny_model(tmp_path / "s", num_hidden_layers=2)
    teacher = save_tiny_model(tmp_path / "t", seed=1, num_hidden_layers=3)
    s = export_gguf(student, tmp_path / "s.gguf", "F16", modelfile=False).path
    t = export_gguf(teacher, tmp_path / "t.gguf", "F16", modelfile=False).path
    text, record = export_prompt_block(s, "F16", "hi", 6, str(t), n_threads=1)
    assert text.splitlines()[0] == "llama.cpp> hi"
    assert "[F16 student," in text and "[teacher (t.gguf)," in text and "student / teacher generation speed" in text
    for label in ("F16 student", "teacher (t.gguf)"):
        a = record["answers"][label]
        assert a["threads"] == 1 and a["bytes"] == Path(a["file"]).stat().st_size
        assert a["tokens_per_s"] > 0  # timed over 6 tokens whatever the answer's length
    assert record["speedup"] == pytest.approx(record["answers"]["F16 student"]["tokens_per_s"]
                                              / record["answers"]["teacher (t.gguf)"]["tokens_per_s"])
    # a teacher that is not a GGUF: the student's row only
    text, record = export_prompt_block(s, "F16", "hi", 4, str(student), n_threads=1)
    assert list(record["answers"]) == ["F16 student"] and "teacher" not in text
