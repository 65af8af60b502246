"""Student samples from llama.cpp (distil/generation/snapshot.py): an F32 GGUF snapshot of the student samples what
transformers samples from the same weights (same per-row seeds), with the same log q; snapshots are made once per
block of `every` steps and a resumed run reuses the block's file."""

import pytest

from distil.errors import DistilError
from distil.generation.params import GenParams
from distil.testing import char_tokenizer, save_tiny_model

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [llamacpp] extra)")


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from distil.models import load_model

    path = save_tiny_model(tmp_path_factory.mktemp("student") / "m", seed=3, tokenizer=char_tokenizer())
    loaded = load_model(str(path))
    return loaded.model.eval(), loaded.tokenizer


def _prompts(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in ("12+3=", "hello", "a")]


@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 20)])
def test_snapshot_samples_what_transformers_samples(student, tmp_path, temperature, top_k):
    from distil.generation.snapshot import GGUFSnapshot
    from distil.methods.onpolicy import sample

    model, tok = student
    params = GenParams(max_new_tokens=12, temperature=temperature, top_k=top_k).check()
    prompts, seeds, eos = _prompts(tok), [11, 22, 33], [tok.eos_token_id]
    want = sample(model, prompts, params, seeds, eos, tok.pad_token_id)
    snap = GGUFSnapshot(tmp_path / "snap", every=4, tokenizer=tok, threads=1)
    try:
        assert snap.ensure(model, 0) == 0
        completions, logq, truncated = snap.sample(prompts, params, seeds, eos)
    finally:
        snap.close()
    assert completions == want.completions and truncated == want.truncated
    for got, ref in zip(logq, want.logq):
        assert got == pytest.approx(ref, rel=1e-4, abs=1e-5)


def test_one_export_per_block_and_a_resumed_run_reuses_it(student, tmp_path, monkeypatch):
    from distil.generation import snapshot as S

    model, tok = student
    exports = []
    real = S.GGUFSnapshot._export
    monkeypatch.setattr(S.GGUFSnapshot, "_export", lambda self, m, p: (exports.append(p.name), real(self, m, p)))
    snap = S.GGUFSnapshot(tmp_path, every=4, tokenizer=tok, threads=1)
    try:
        assert [snap.ensure(model, s) for s in range(6)] == [0, 0, 0, 0, 4, 4]
    finally:
        snap.close()
    assert exports == ["student-0000000.gguf", "student-0000004.gguf"]
    assert sorted(p.name for p in tmp_path.glob("*.gguf")) == ["student-0000004.gguf"]  # the newest only
    resumed = S.GGUFSnapshot(tmp_path, every=4, tokenizer=tok, threads=1)  # a new process, resuming at step 6
    try:
        assert resumed.ensure(model, 6) == 4
    finally:
        resumed.close()
    assert len(exports) == 2  # the block's file was reused, not re-exported


def test_bad_settings_are_one_line(tmp_path, student):
    from distil.generation.snapshot import GGUFSnapshot

    _, tok = student
    with pytest.raises(DistilError, match="snapshot: every: expected an integer >= 1, found 0"):
        GGUFSnapshot(tmp_path, every=0, tokenizer=tok)
    with pytest.raises(DistilError, match="snapshot: quant: expected one of F32, F16, found 'Q4_K_M'"):
        GGUFSnapshot(tmp_path, every=2, tokenizer=tok, quant="Q4_K_M")
    with pytest.raises(DistilError, match="before ensure"):
        GGUFSnapshot(tmp_path, every=2, tokenizer=tok).sample([[1]], GenParams(max_new_tokens=1), [0], [2])
