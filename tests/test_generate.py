"""Generation (distil/generation/): greedy = a hand-rolled argmax loop, batching and left padding change
nothing, stop strings / EOS / max_new_tokens, seeds, n samples, resume after a kill, identity, prompt files,
the CLI, and the llama.cpp backend on a tiny exported GGUF."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distil.cli import main
from distil.errors import DistilError
from distil.generation import GenParams, generate, read_prompts, sample_seed
from distil.generation import hf as hfb
from distil.generation import llamacpp as lcb
from distil.generation.store import meta_path

PROMPTS = ["Hi", "What is a Python list?", "x = 1 + 2", "Tell me a story about a cat and a dog."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from distil.testing import save_tiny_model

    # untied, larger init: a tied tiny model with the default init repeats its last input token forever,
    # which would make every greedy comparison trivially true
    return save_tiny_model(tmp_path_factory.mktemp("gen-model"), seed=3, tie_word_embeddings=False,
                           initializer_range=0.2)


@pytest.fixture
def lm(model_dir):
    """A fresh (model, tokenizer) per test: some tests change the generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def run(lm, prompts=PROMPTS, out=None, **kw):
    model, tok = lm
    batch_size = kw.pop("batch_size", 8)
    return generate(model, tok, prompts, GenParams(**kw), out, batch_size=batch_size, model_name="tiny")


def argmax_loop(model, ids, max_new, eos):
    """Greedy decoding by hand: the whole sequence through the model at every step, no cache."""
    out = []
    with torch.no_grad():
        for _ in range(max_new):
            t = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if t in eos:
                return out, "stop"
            out.append(t)
    return out, "length"


def decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ------------------------------------------------------------------------------------------------
# decoding


def test_greedy_equals_argmax_loop(lm):
    model, tok = lm
    recs = run(lm, max_new_tokens=16).records
    assert [(r["prompt_index"], r["sample_index"]) for r in recs] == [(i, 0) for i in range(len(PROMPTS))]
    for r, prompt in zip(recs, PROMPTS):
        ids = hfb.render(tok, prompt, True)
        assert ids == tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False)
        want, reason = argmax_loop(model, ids, 16, hfb.eos_ids(model, tok))
        assert r["completion"] == decode(tok, want)
        assert (r["finish_reason"], r["completion_tokens"], r["prompt_tokens"]) == (reason, len(want), len(ids))


def test_batch_with_left_padding_equals_one_at_a_time(lm):
    for kw in (dict(max_new_tokens=12), dict(max_new_tokens=12, temperature=1.0, n=3, seed=5)):
        batched = run(lm, batch_size=8, **kw).records
        single = run(lm, batch_size=1, **kw).records
        assert batched == single
        assert len({len(hfb.render(lm[1], p, True)) for p in PROMPTS}) == len(PROMPTS)  # padding was needed


def test_stop_strings_cut_the_completion(lm):
    base = run(lm, max_new_tokens=24, chat=False).records
    r0 = next(r for r in base if len(r["completion"]) >= 10)
    stop = r0["completion"][4:6]
    cut = run(lm, [r0["prompt"]], max_new_tokens=24, chat=False, stop=(stop, "\x00never")).records[0]
    assert cut["completion"] == r0["completion"][:r0["completion"].find(stop)]
    assert cut["finish_reason"] == "stop" and cut["params"]["stop"] == [stop, "\x00never"]
    assert len(cut["completion"]) + len(stop) <= cut["completion_tokens"] <= r0["completion_tokens"]
    # two stop strings: the earlier one in the text wins
    early, late = r0["completion"][2:4], r0["completion"][6:8]
    both = run(lm, [r0["prompt"]], max_new_tokens=24, chat=False, stop=(late, early)).records[0]
    assert both["completion"] == r0["completion"][:min(r0["completion"].find(early), r0["completion"].find(late))]


def test_eos_stops_and_max_new_tokens_is_length(lm):
    model, tok = lm
    base = run(lm, max_new_tokens=3).records
    assert all(r["finish_reason"] == "length" and r["completion_tokens"] == 3 for r in base)
    ids, reason = argmax_loop(model, hfb.render(tok, PROMPTS[1], True), 20, hfb.eos_ids(model, tok))
    assert reason == "length"
    model.generation_config.eos_token_id = ids[5]  # the model's turn-end token, as instruct models declare it
    k = ids.index(ids[5])
    cut = run(lm, [PROMPTS[1]], max_new_tokens=20).records[0]
    assert (cut["completion"], cut["finish_reason"], cut["completion_tokens"]) == (decode(tok, ids[:k]), "stop", k)


def test_beam_search_finds_the_best_two_token_continuation(lm):
    """num_beams=k, 2 new tokens: the answer is max over the k most likely first tokens t1 of
    log p(t1) + max_t2 log p(t2 | t1) (a beam keeps exactly those k prefixes after step 1), computed by hand."""
    model, tok = lm
    k, beaten, checked = 3, 0, 0
    eos = hfb.eos_ids(model, tok)
    for prompt in PROMPTS + [f"{a} {b}" for a in ("one", "Two", "3 x") for b in ("cats", "?", "zz", "q")]:
        ids = hfb.render(tok, prompt, True)
        with torch.no_grad():
            lp1 = model(torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
            best, best_seq = -float("inf"), None
            for t1 in lp1.topk(k).indices.tolist():
                lp2 = model(torch.tensor([ids + [t1]])).logits[0, -1].double().log_softmax(-1)
                score = float(lp1[t1] + lp2.max())
                if score > best:
                    best, best_seq = score, [t1, int(lp2.argmax())]
        if any(t in eos for t in best_seq) or any(t in eos for t in lp1.topk(2 * k).indices.tolist()):
            continue  # a finished hypothesis would be ranked by its own length: not this formula's case
        beam = run(lm, [prompt], max_new_tokens=2, num_beams=k).records[0]
        greedy = run(lm, [prompt], max_new_tokens=2).records[0]
        assert beam["completion"] == decode(tok, best_seq) and beam["params"]["num_beams"] == k
        beaten += beam["completion"] != greedy["completion"]
        checked += 1
        assert "num_beams" not in greedy["params"]  # identities written before beam search existed stay valid
    assert checked >= 8 and beaten >= 1  # on at least one prompt the beam found a better sequence than greedy


def test_sampling_filters_golden():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda **kw: torch.isfinite(hfb.filter_logits(logits, GenParams(temperature=1.0, **kw)))[0].tolist()  # noqa: E731
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert kept(top_p=0.85) == [True, True, True, False]
    assert kept(min_p=0.2) == [True, True, True, False]  # 0.05 < 0.2 * 0.5
    assert kept(top_p=0.1) == [True, False, False, False]  # the top token is always kept
    t2 = hfb.filter_logits(logits, GenParams(temperature=2.0)).softmax(-1)
    torch.testing.assert_close(t2, (logits / 2).softmax(-1))


def test_row_sampler_draws_from_the_filtered_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    sampler = hfb.RowSampler(GenParams(temperature=1.0, top_k=3), seeds=list(range(4000)))
    out = sampler(None, torch.log(probs).expand(4000, 4).clone())
    counts = torch.bincount(out.argmax(-1), minlength=4).double() / 4000
    want = torch.tensor([0.5, 0.3, 0.15, 0.0], dtype=torch.float64) / 0.95
    assert counts[3] == 0 and torch.allclose(counts, want, atol=0.03)  # 4000 draws: std <= 0.008


def test_seeds_are_reproducible_and_per_sample(lm):
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=40, top_p=0.95, min_p=0.01, n=3, seed=7)
    a, b = run(lm, **kw).records, run(lm, **kw).records
    assert a == b and len(a) == 3 * len(PROMPTS)
    assert [r["seed"] for r in a] == [sample_seed(7, p, s) for p in range(len(PROMPTS)) for s in range(3)]
    assert len({r["completion"] for r in a if r["prompt_index"] == 1}) > 1  # n samples differ
    other = run(lm, **{**kw, "seed": 8}).records
    assert [r["completion"] for r in other] != [r["completion"] for r in a]
    # a sample does not depend on its batch-mates: other batches give the same samples
    other_batches = generate(lm[0], lm[1], PROMPTS, GenParams(**kw), batch_size=5).records
    assert [r["completion"] for r in other_batches] == [r["completion"] for r in a]


def test_bad_params_are_one_line():
    for kw, word in [(dict(top_p=0.0), "top_p"), (dict(temperature=-1.0), "temperature"), (dict(n=2), "greedy"),
                     (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=("",)), "stop"),
                     (dict(num_beams=0), "num_beams"), (dict(num_beams=2, temperature=0.7), "num_beams")]:
        with pytest.raises(DistilError, match=word):
            GenParams(**kw).check()


# ------------------------------------------------------------------------------------------------
# output file: streaming, resume, identity


SAMPLED = dict(max_new_tokens=10, temperature=1.0, n=2, seed=11)


def test_resume_after_a_kill_regenerates_exactly_the_missing_samples(lm, tmp_path):
    full = tmp_path / "full.jsonl"
    run(lm, out=full, batch_size=3, **SAMPLED)
    lines = full.read_bytes().splitlines(keepends=True)
    assert len(lines) == 2 * len(PROMPTS)
    assert json.loads(meta_path(full).read_text())["params"]["temperature"] == 1.0

    part = tmp_path / "part.jsonl"
    shutil.copy(meta_path(full), meta_path(part))
    # samples 1 and 4 lost, and the last line half-written (kill -9 mid-write)
    part.write_bytes(b"".join(lines[i] for i in (0, 2, 3, 5, 6)) + lines[7][:len(lines[7]) // 2])
    result = run(lm, out=part, batch_size=2, **SAMPLED)
    assert (result.kept, result.generated) == (5, 3)
    assert part.read_bytes() == full.read_bytes()
    again = run(lm, out=part, batch_size=2, **SAMPLED)  # complete: nothing to do
    assert (again.kept, again.generated) == (8, 0) and part.read_bytes() == full.read_bytes()


def test_identity_mismatch_and_foreign_files_are_refused(lm, tmp_path, model_dir):
    out = tmp_path / "o.jsonl"
    run(lm, out=out, **SAMPLED)
    before = out.read_bytes()
    with pytest.raises(DistilError, match=r"params.temperature: the file has 1.0, this run 0.5"):
        run(lm, out=out, **{**SAMPLED, "temperature": 0.5})
    with pytest.raises(DistilError, match="prompts.count"):
        run(lm, PROMPTS[:2], out=out, **SAMPLED)
    foreign = tmp_path / "f.jsonl"
    foreign.write_text('{"a": 1}\n')
    with pytest.raises(DistilError, match="meta.json"):
        run(lm, out=foreign, **SAMPLED)
    # a damaged complete line in the middle is not a kill: refused, not silently dropped
    damaged = tmp_path / "d.jsonl"
    shutil.copy(meta_path(out), meta_path(damaged))
    lines = before.splitlines(keepends=True)
    damaged.write_bytes(lines[0] + b"garbage\n" + lines[1])
    with pytest.raises(DistilError, match=r"d.jsonl:2: expected a JSON sample record"):
        run(lm, out=damaged, **SAMPLED)
    lm[0].model.layers[0].mlp.up_proj.weight.data.mul_(1.01)  # another model under the same name
    with pytest.raises(DistilError, match="weights"):
        run(lm, out=out, **SAMPLED)
    assert out.read_bytes() == before  # nothing lost


def test_overwrite_starts_again(lm, tmp_path):
    out = tmp_path / "o.jsonl"
    run(lm, out=out, **SAMPLED)
    result = generate(lm[0], lm[1], PROMPTS, GenParams(**{**SAMPLED, "temperature": 0.5}), out, overwrite=True)
    assert result.generated == 8 and json.loads(out.read_text().splitlines()[0])["params"]["temperature"] == 0.5


def test_kill_9_during_the_cli_then_resume(model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8", "--temperature", "1", "-n", "2",
            "--batch-size", "2", "--no-progress"]
    full = tmp_path / "full.jsonl"
    assert main(["generate", *args, "--out", str(full)]) == 0
    out = tmp_path / "o.jsonl"
    env = {**os.environ, "DISTIL_TEST_KILL_AT": "generate:batch-1"}
    proc = subprocess.run([sys.executable, "-m", "distil", "generate", *args, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert len(out.read_text().splitlines()) == 4  # two batches of two written before the kill
    assert main(["generate", *args, "--out", str(out)]) == 0
    assert out.read_bytes() == full.read_bytes()


# ------------------------------------------------------------------------------------------------
# prompt files and the CLI


def test_prompt_files_skip_and_count_malformed_lines(tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a"}\n\nnot json\n{"prompt": ""}\n{"text": "b"}\n'
                 '{"messages": [{"role": "user", "content": "c"}]}\n{"messages": [{"role": "user"}]}\n[1]\n')
    got = read_prompts(p)
    assert got.prompts == ["a", [{"role": "user", "content": "c"}]]
    assert (got.skipped, got.first_bad) == (5, [3, 4, 5])
    assert "skipped 5 malformed line(s)" in got.report()
    t = tmp_path / "p.txt"
    t.write_text("one\n\n  two  \n")
    assert read_prompts(t).prompts == ["one", "  two  "] and read_prompts(t).skipped == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n{}\n")
    with pytest.raises(DistilError, match=r"bad.jsonl: no usable prompt: .* found 2 malformed line\(s\), first at line 1"):
        read_prompts(bad)
    for name, match in [("p.csv", "expected a .jsonl or .txt"), ("missing.jsonl", "not found")]:
        if name == "p.csv":
            (tmp_path / name).write_text("a\n")
        with pytest.raises(DistilError, match=match):
            read_prompts(tmp_path / name)


def test_cli_generates_and_exits_2_on_bad_input(model_dir, tmp_path, capsys, make_recipe):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Hello"}\nbroken\n{"messages": [{"role": "user", "content": "Hi"}]}\n')
    out = tmp_path / "o.jsonl"
    base = ["generate", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "5", "--no-progress"]
    assert main([*base, "--out", str(out), "--stop", "zz"]) == 0
    said = capsys.readouterr()
    assert "skipped 1 malformed line(s) (first: line 2)" in said.err and "wrote" in said.out
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in recs] == [0, 1] and recs[1]["prompt"][0]["content"] == "Hi"
    assert {r["backend"] for r in recs} == {"hf"} and recs[0]["model"] == str(model_dir)
    assert set(recs[0]) == {"prompt_index", "sample_index", "prompt", "completion", "finish_reason", "prompt_tokens",
                            "completion_tokens", "seed", "params", "backend", "model"}

    def fails(argv, match):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err

    fails([*base, "--out", str(out), "--temperature", "0.5"], "made by a different generation run")
    fails([*base, "--out", str(tmp_path / "o.txt")], "expected a .jsonl file path")
    fails([*base, "--out", str(tmp_path / "nodir" / "o.jsonl")], "does not exist")
    fails([*base, "--out", str(tmp_path / "x.jsonl"), "--top-p", "2"], "top_p")
    fails(["generate", str(tmp_path / "nomodel"), "--prompts", str(prompts), "--out", str(tmp_path / "y.jsonl")],
          "nomodel")
    empty = tmp_path / "e.jsonl"
    empty.write_text("{}\n")
    fails([*base[:2], "--prompts", str(empty), "--out", str(tmp_path / "z.jsonl")], "no usable prompt")
    fails([*base, "--out", str(tmp_path / "w.jsonl"), "--no-chat"], "needs a chat template")  # a messages prompt
    fails(["generate", str(model_dir), "--out", str(out)], "--prompts")  # argparse: required option

    # a recipe means its teacher
    recipe = make_recipe()
    out2 = tmp_path / "r.jsonl"
    assert main(["generate", str(recipe), "--prompts", str(prompts), "--out", str(out2), "--max-new-tokens", "3",
                 "--no-progress"]) == 0
    teacher = json.loads(out2.read_text().splitlines()[0])["model"]
    import yaml

    assert teacher == yaml.safe_load(recipe.read_text())["teacher"]["source"]


def test_cli_llamacpp_missing_is_one_line(model_dir, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("Hello\n")
    monkeypatch.setattr(lcb, "available", lambda: False)
    assert main(["generate", str(model_dir), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--backend", "llamacpp"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install" in err and "llamacpp" in err


# ------------------------------------------------------------------------------------------------
# llama.cpp backend


def test_llamacpp_backend_on_a_tiny_exported_gguf(model_dir, tmp_path, monkeypatch, lm):
    sys.path.insert(0, str(Path(__file__).parent / "export"))
    from helpers_export import LLAMA_CPP, require

    require(*LLAMA_CPP)  # skips locally when missing; in CI (CI=true) a missing llama_cpp fails
    monkeypatch.setenv("DISTIL_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "o.jsonl"
    args = ["generate", str(model_dir), "--prompts", str(prompts), "--backend", "llamacpp", "--max-new-tokens", "8",
            "--temperature", "0.8", "-n", "2", "--seed", "3", "--no-progress", "--threads", "1"]
    assert main([*args, "--out", str(out)]) == 0
    assert len(list((tmp_path / "cache" / "gguf").glob("*-F16.gguf"))) == 1  # exported once, cached
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 8 and {r["backend"] for r in recs} == {"llamacpp"}
    assert [r["seed"] for r in recs] == [sample_seed(3, p, s) for p in range(4) for s in range(2)]
    # the prompt ids are the hf backend's (rendered by the model's HF tokenizer)
    assert [r["prompt_tokens"] for r in recs[::2]] == [len(hfb.render(lm[1], p, True)) for p in PROMPTS]
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["completion_tokens"] <= 8 for r in recs)
    # greedy: llama.cpp on the F16 export writes what transformers writes
    greedy = tmp_path / "g.jsonl"
    assert main([*args[:6], "--max-new-tokens", "12", "--no-progress", "--out", str(greedy)]) == 0
    want = generate(lm[0], lm[1], PROMPTS, GenParams(max_new_tokens=12)).records
    got = [json.loads(line) for line in greedy.read_text().splitlines()]
    assert [(r["completion"], r["finish_reason"]) for r in got] == [(r["completion"], r["finish_reason"]) for r in want]
    assert len({r["completion"] for r in got}) == len(PROMPTS)
    # beam search is the transformers backend's only: one line, exit 2, nothing written
    assert main([*args[:6], "--num-beams", "3", "--no-progress", "--out", str(tmp_path / "b.jsonl")]) == 2
    assert not (tmp_path / "b.jsonl").exists()
    # reproducible from the per-sample seeds, and resumable
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:3]) + lines[3][:10])
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes() == b"".join(lines)
