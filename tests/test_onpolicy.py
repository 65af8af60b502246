"""Method `onpolicy` (on-policy distillation, GKD, the sampled-token estimator): issue 9, item 5.

Golden values come from the definitions (float64, by hand), never from the code under test."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from distil.cli import main
from distil.data import IGNORE, build_examples, collate
from distil.methods.contract import count_targets
from distil.methods.onpolicy import (OnPolicySpec, Samples, build_onpolicy_loss, completion_batch, make_before_step,
                                     sample, sampled_reverse_kl)
from distil.models import freeze, load_model, student_from_teacher
from distil.recipe import DistillSpec

EOS = 2  # the char tokenizer's </s>


def _recipe(tmp_path, tiny_teacher, name="o", onpolicy=None, distill=None, train=None, data=None):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}"}) + "\n"
                          for i in range(12)))
    recipe = {"name": name, "teacher": {"source": str(tiny_teacher)},
              "student": {"source": "teacher", "layers": [0, 3]},
              "data": {"source": str(qa), "seq_len": 64, "eval_size": 2, "chat_template": False, **(data or {})},
              "distill": {"method": "onpolicy", **(distill or {})},
              "onpolicy": {"max_new_tokens": 6, **(onpolicy or {})},
              "train": {"steps": 3, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "progress": False,
                        **(train or {})},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _kill_then_resume(monkeypatch, path, at):
    """Run `path` as run 'k', interrupted at the crash point `at` (as kill -9 would), then `--resume` it."""
    import distil.trainer

    class Killed(BaseException):
        pass

    def crash(name):
        if name == at:
            raise Killed

    monkeypatch.setattr(distil.trainer, "crash_point", crash)
    with pytest.raises(Killed):
        main(["run", str(path), "name=k"])
    monkeypatch.undo()
    assert main(["run", str(path), "name=k", "--resume"]) == 0


def _rows(tmp_path, name):
    return [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def models(tiny_teacher):
    t = load_model(str(tiny_teacher))
    freeze(t.model)
    s = student_from_teacher(t, [0, 3])
    for p in s.model.parameters():
        p.requires_grad_(True)
    return t, s


def _qa_batch(tok, n=3):
    recs = [{"prompt": f"q{i}?", "response": "abc"[: i + 1]} for i in range(n)]
    return collate(build_examples(recs, tok, 64, chat_template=False), pad_id=0)


# ---- lmbda = 0 without seq_kd is method offline -----------------------------------------------------------------


@pytest.mark.parametrize("loss", ["jsd", "reverse_kl"])
def test_lmbda_0_reproduces_offline_exactly(tmp_path, tiny_teacher, loss):
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 0.0, "loss": loss, "beta": 0.3},
                   train={"grad_accum": 2})
    assert main(["run", str(path), "name=pol"]) == 0
    assert main(["run", str(path), "name=offl", "distill.method=offline", f"distill.loss={loss}",
                 "distill.beta=0.3"]) == 0
    on, off = _rows(tmp_path, "pol"), _rows(tmp_path, "offl")
    assert len(on) == len(off) == 3
    for a, b in zip(on, off):  # the same computation on the same batches: equal, not close
        assert (a["loss"], a["kd"], a["tokens"], a["grad_norm"]) == (b["loss"], b["kd"], b["tokens"], b["grad_norm"])
        assert a["student_samples"] == 0 and a["truncated"] == 0 and a["generate_s"] == 0


# ---- the divergence on completions: beta endpoints, golden value ---------------------------------------------


def _reference(t_model, s_model, batch, kind, beta, temperature=1.0):
    """sum over completion tokens of the divergence, from the definitions in float64, / their count."""
    with torch.no_grad():
        zs = s_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
        zt = t_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    total, n = 0.0, 0
    for b in range(len(batch["input_ids"])):
        for i in range(batch["input_ids"].shape[1] - 1):
            if batch["labels"][b, i + 1] == IGNORE:
                continue
            ps = F.softmax(zs[b, i] / temperature, -1)
            pt = F.softmax(zt[b, i] / temperature, -1)
            kl = lambda p, q: float((p * (p.log() - q.log())).sum())  # noqa: E731
            if kind == "forward_kl":
                d = kl(pt, ps)
            elif kind == "reverse_kl":
                d = kl(ps, pt)
            else:
                m = (1 - beta) * ps + beta * pt
                d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
            total += d * temperature**2
            n += 1
    return total / n


def _generated_batch(t, s, seed=0):
    """Completions the student sampled for three prompts (temperature 1), as the training step sees them."""
    spec = OnPolicySpec(lmbda=1.0, max_new_tokens=5, seed=seed)
    before = make_before_step(spec, t.model, [EOS], 0, echo=lambda _: None)
    return before(s.model, [_qa_batch(t.tokenizer)], 0)[0]


@pytest.mark.parametrize("kind,beta,ref_kind", [("jsd", 0.0, "forward_kl"), ("jsd", 1.0, "reverse_kl"),
                                                ("jsd", 0.5, "jsd"), ("jsd", 0.2, "jsd"),
                                                ("forward_kl", 0.5, "forward_kl")])
def test_divergence_on_the_students_completions(models, kind, beta, ref_kind, fp32):
    t, s = models
    with torch.no_grad():  # a student that differs from its teacher
        for p in s.model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    batch = _generated_batch(t, s)
    n = count_targets(batch)
    assert n == int(batch["completion_tokens"].sum()) > 0
    for fused in (False, True):
        spec = OnPolicySpec(loss=kind, beta=beta, loss_temperature=2.0)
        fn = build_onpolicy_loss(t.model, spec, DistillSpec(fused=fused), len(t.tokenizer))
        out = fn(s.model, batch, float(n))
        want = _reference(t.model, s.model, batch, ref_kind, beta, temperature=2.0)
        assert float(out.loss.detach()) == pytest.approx(want, rel=1e-4)


# ---- masking after EOS, truncation -----------------------------------------------------------------------------


class _Scripted:
    """model.generate that writes planned tokens through the real logits processor (sampler + recorder): the
    processor sees scores where only the planned token is possible, so it must pick it, with log q = 0."""

    def __init__(self, model, plans):
        self.model, self.plans = model, plans

    def __call__(self, input_ids, attention_mask, generation_config, logits_processor):
        steps = max(len(p) for p in self.plans)
        steps = min(steps, generation_config.max_new_tokens)
        ids = input_ids
        for k in range(steps):
            scores = torch.full((len(ids), 106), -1e9)
            for r, plan in enumerate(self.plans):
                scores[r, plan[k] if k < len(plan) else 0] = 0.0
            chosen = logits_processor(ids, scores).argmax(-1)
            ids = torch.cat([ids, chosen[:, None]], 1)
        return ids


def test_tokens_after_the_first_eos_are_masked_and_truncation_is_counted(models, monkeypatch):
    t, s = models
    plans = [[10, 11, EOS, 12, 13, EOS], [20, 21, 22, 23, 24, 25]]  # row 0 ends at its first EOS; row 1 never does
    monkeypatch.setattr(s.model, "generate", _Scripted(s.model, plans))
    from distil.generation.params import GenParams

    prompts = [[1, 40, 41], [1, 50]]
    got = sample(s.model, prompts, GenParams(max_new_tokens=6, temperature=1.0), [1, 2], [EOS], 0)
    assert got.completions == [[10, 11, EOS], [20, 21, 22, 23, 24, 25]]
    assert got.truncated == [False, True]
    assert got.logq == [[0.0] * 3, [0.0] * 6]
    batch = completion_batch(prompts, got, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 40, 41, 10, 11, EOS, 0, 0], [1, 50, 20, 21, 22, 23, 24, 25]]
    assert batch["labels"].tolist() == [[IGNORE] * 3 + [10, 11, EOS] + [IGNORE] * 2,
                                        [IGNORE] * 2 + [20, 21, 22, 23, 24, 25]]
    assert count_targets(batch) == 3 + 6  # the EOS is a target (where to stop), nothing after it, no prompt token
    assert batch["truncated"].tolist() == [0.0, 1.0] and batch["completion_tokens"].tolist() == [3.0, 6.0]


def test_a_student_that_never_stops_is_truncated_counted_and_warned_once(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 1.0})
    assert main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("reached onpolicy.max_new_tokens=6 without an EOS") == 1
    rows = _rows(tmp_path, "o")
    assert all(r["student_samples"] == 1.0 and r["generate_s"] > 0 for r in rows)
    # a random tiny student rarely writes </s> (1/106 a token): most completions are cut at 6 tokens
    assert all(r["truncated"] >= 0.5 and 1 <= r["length"] <= 6 for r in rows)
    assert all(r["tokens"] == sum(round(x["length"] * 2) for x in rows[: i + 1]) for i, r in enumerate(rows))


# ---- the loss does not depend on how a step is split ----------------------------------------------------------


def test_loss_invariant_to_the_number_of_accumulation_steps(tmp_path, tiny_teacher):
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 1.0}, train={"steps": 3})
    assert main(["run", str(path), "name=a1", "train.batch_size=4", "train.grad_accum=1"]) == 0
    assert main(["run", str(path), "name=a2", "train.batch_size=2", "train.grad_accum=2"]) == 0
    assert main(["run", str(path), "name=a4", "train.batch_size=1", "train.grad_accum=4"]) == 0
    ref = _rows(tmp_path, "a1")
    for name in ("a2", "a4"):
        for a, b in zip(ref, _rows(tmp_path, name)):
            assert a["tokens"] == b["tokens"] and a["length"] == pytest.approx(b["length"], rel=1e-12)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)


# ---- the sampled-token estimator --------------------------------------------------------------------------------

S_LOGITS = [[0.3, -1.0, 2.0, 0.5, 0.0], [1.5, 0.3, -0.7, 2.2, -1.0], [0.0, 0.4, 0.1, -0.3, 0.9]]
T_LOGITS = [[0.5, -0.2, 1.0, 0.9, -1.0], [2.5, 0.1, -1.7, 1.2, 0.0], [1.0, -1.0, 0.5, 0.0, 2.0]]
TOKENS = [2, 0, 4]


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _estimator(s, tokens, logq, **kw):
    t = torch.tensor([T_LOGITS], dtype=torch.float64)
    labels = torch.tensor([tokens])
    return sampled_reverse_kl(s, t, labels, torch.tensor([logq], dtype=torch.float64), **kw)


def test_estimator_on_fresh_samples_is_reinforce(fp32):
    """Ratio 1, and d loss / d z_t = -A_t (onehot(x_t) - p_S,t) / N with A_t = log p_T(x_t) - log p_S(x_t)."""
    s = torch.tensor([S_LOGITS], dtype=torch.float64, requires_grad=True)
    ps = [_softmax(z) for z in S_LOGITS]
    pt = [_softmax(z) for z in T_LOGITS]
    logq = [math.log(ps[i][x]) for i, x in enumerate(TOKENS)]  # sampled from the student itself
    out = _estimator(s, TOKENS, logq, num_items=3)
    out.loss.backward()
    adv = [math.log(pt[i][x]) - math.log(ps[i][x]) for i, x in enumerate(TOKENS)]
    assert float(out.metrics["ratio"]) == pytest.approx(1.0, rel=1e-12)  # sum of ratios / N
    assert float(out.metrics["clipped"]) == 0.0
    assert float(out.metrics["kl"]) == pytest.approx(-sum(adv) / 3, rel=1e-12)
    entropy = sum(-sum(p * math.log(p) for p in row) for row in ps) / 3
    assert float(out.metrics["entropy"]) == pytest.approx(entropy, rel=1e-12)
    assert float(out.loss.detach()) == pytest.approx(-sum(adv) / 3, rel=1e-12)  # -sum r A / N with r = 1
    want = [[-adv[i] * ((v == x) - ps[i][v]) / 3 for v in range(5)] for i, x in enumerate(TOKENS)]
    torch.testing.assert_close(s.grad[0], torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_estimator_is_unbiased_for_the_reverse_kl_gradient():
    """E_{x ~ p_S}[grad of the estimator] = grad KL(p_S || p_T) at each position (enumerating every token)."""
    for i in range(3):
        z = torch.tensor(S_LOGITS[i], dtype=torch.float64)
        ps = F.softmax(z, -1)
        expected = torch.zeros(5, dtype=torch.float64)
        for x in range(5):
            s = z.clone().reshape(1, 1, 5).requires_grad_()
            t = torch.tensor([[T_LOGITS[i]]], dtype=torch.float64)
            out = sampled_reverse_kl(s, t, torch.tensor([[x]]), torch.log(ps[x]).reshape(1, 1), num_items=1)
            out.loss.backward()
            expected += ps[x] * s.grad[0, 0]
        zt = torch.tensor(T_LOGITS[i], dtype=torch.float64)
        zs = z.clone().requires_grad_()
        kl = (F.softmax(zs, -1) * (F.log_softmax(zs, -1) - F.log_softmax(zt, -1))).sum()
        kl.backward()
        torch.testing.assert_close(expected, zs.grad, rtol=1e-10, atol=1e-12)


def test_estimator_clips_the_importance_ratio_ppo_style():
    s = torch.tensor([S_LOGITS], dtype=torch.float64, requires_grad=True)
    ps = [_softmax(z) for z in S_LOGITS]
    pt = [_softmax(z) for z in T_LOGITS]
    ratios = [1.5, 1.5, 0.9]  # stale samples: q = p_S / r
    logq = [math.log(ps[i][x]) - math.log(ratios[i]) for i, x in enumerate(TOKENS)]
    out = _estimator(s, TOKENS, logq, clip=0.2, num_items=3)
    out.loss.backward()
    adv = [math.log(pt[i][x]) - math.log(ps[i][x]) for i, x in enumerate(TOKENS)]
    # min(r A, clip(r) A): r = 1.5 > 1.2 is clipped (no gradient) when A > 0, kept when A < 0; r = 0.9 is inside
    terms, grads = [], []
    for i, x in enumerate(TOKENS):
        r, a = ratios[i], adv[i]
        clipped = min(max(r, 0.8), 1.2)
        terms.append(min(r * a, clipped * a))
        live = r * a <= clipped * a  # the unclipped branch is the minimum: its gradient r A grad log p flows
        grads.append([(-r * a * ((v == x) - ps[i][v]) / 3) if live else 0.0 for v in range(5)])
    assert float(out.loss.detach()) == pytest.approx(-sum(terms) / 3, rel=1e-12)
    assert float(out.metrics["clipped"]) == pytest.approx(2 / 3)
    assert adv[0] < 0 < adv[1]  # both branches: r A kept (A < 0), clipped (A > 0)
    torch.testing.assert_close(s.grad[0], torch.tensor(grads, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_estimator_discount_adds_future_advantages():
    s = torch.tensor([S_LOGITS], dtype=torch.float64, requires_grad=True)
    ps = [_softmax(z) for z in S_LOGITS]
    pt = [_softmax(z) for z in T_LOGITS]
    tokens = [IGNORE, TOKENS[1], TOKENS[2]]  # position 0 is a prompt token
    logq = [0.0] + [math.log(ps[i][x]) for i, x in enumerate(TOKENS) if i > 0]
    out = _estimator(s, tokens, logq, discount=0.5, num_items=2)
    out.loss.backward()
    a = {i: math.log(pt[i][TOKENS[i]]) - math.log(ps[i][TOKENS[i]]) for i in (1, 2)}
    adv = {2: a[2], 1: a[1] + 0.5 * a[2]}
    want = [[0.0] * 5] + [[-adv[i] * ((v == TOKENS[i]) - ps[i][v]) / 2 for v in range(5)] for i in (1, 2)]
    torch.testing.assert_close(s.grad[0], torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-12)


def test_estimator_ratio_is_one_on_the_students_own_fresh_samples(models):
    """Through the real sampler: log q recorded at sampling time == log p_S(x) of the training forward."""
    t, s = models
    batch = _generated_batch(t, s)
    spec = OnPolicySpec(lmbda=1.0, loss="sampled_reverse_kl")
    out = build_onpolicy_loss(t.model, spec, DistillSpec(), len(t.tokenizer))(s.model, batch, count_targets(batch))
    assert float(out.metrics["ratio"]) == pytest.approx(1.0, rel=1e-5)
    assert float(out.metrics["clipped"]) == 0.0


def test_sampled_token_estimator_end_to_end(tmp_path, tiny_teacher):
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 1.0, "loss": "sampled_reverse_kl"})
    assert main(["run", str(path)]) == 0
    rows = _rows(tmp_path, "o")
    assert len(rows) == 3
    for r in rows:
        assert {"kl", "entropy", "length", "truncated", "ratio", "clipped"} <= set(r)
        assert r["entropy"] > 0 and 0 < r["length"] <= 6
    assert rows[0]["ratio"] == pytest.approx(1.0, rel=1e-5)  # fresh samples, weights not yet updated


@pytest.mark.parametrize("loss", ["reverse_kl", "sampled_reverse_kl"])
def test_llamacpp_student_samples_match_transformers_on_fresh_snapshots(tmp_path, tiny_teacher, loss):
    """student_backend llamacpp with a snapshot every step (F32): the samples are those transformers draws from the
    same weights with the same seeds, so the run's losses are the hf run's; snapshot_age is logged."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [llamacpp] extra)")
    onpolicy = {"lmbda": 1.0, "loss": loss}
    assert main(["run", str(_recipe(tmp_path, tiny_teacher, name="hf", onpolicy=onpolicy))]) == 0
    path = _recipe(tmp_path, tiny_teacher, name="lc", onpolicy={**onpolicy, "student_backend": "llamacpp",
                                                                 "snapshot_every": 1})
    assert main(["run", str(path)]) == 0
    hf, lc = _rows(tmp_path, "hf"), _rows(tmp_path, "lc")
    assert [r["length"] for r in lc] == [r["length"] for r in hf]
    assert [r["loss"] for r in lc] == pytest.approx([r["loss"] for r in hf], rel=1e-4, abs=1e-6)
    assert [r["snapshot_age"] for r in lc] == [0.0, 0.0, 0.0]
    assert len(list((tmp_path / "runs" / "lc" / "snapshots").glob("*.gguf"))) == 1  # the newest snapshot only


def test_llamacpp_student_backend_without_the_bindings_is_one_line_at_validation(tmp_path, tiny_teacher, capsys,
                                                                                    monkeypatch):
    from distil.generation import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: False)
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 1.0, "student_backend": "llamacpp"})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onpolicy.student_backend: llamacpp: llama-cpp-python is not installed" in err
    assert not (tmp_path / "runs").exists()  # refused at validation: nothing written


def test_llamacpp_student_snapshots_are_stale_between_exports_and_resume_reuses_them(tmp_path, tiny_teacher,
                                                                                      monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the [llamacpp] extra)")
    onpolicy = {"lmbda": 1.0, "loss": "sampled_reverse_kl", "student_backend": "llamacpp", "snapshot_every": 2}
    path = _recipe(tmp_path, tiny_teacher, onpolicy=onpolicy, train={"steps": 5, "save_every": 1})
    assert main(["run", str(path), "name=ref"]) == 0
    ref = _rows(tmp_path, "ref")
    assert [r["snapshot_age"] for r in ref] == [0.0, 1.0, 0.0, 1.0, 0.0]
    # fresh samples (the snapshot of this very step): ratio 1 at fp32 precision; stale ones (the snapshot is one
    # update old): the ratio moves off 1 by far more than rounding, and that is what corrects for them
    assert ref[0]["ratio"] == pytest.approx(1.0, rel=1e-5)
    assert ref[1]["ratio"] != pytest.approx(1.0, rel=1e-3)

    # killed after step 3's checkpoint: the resumed run starts at step index 3, inside the block of step 2's snapshot
    _kill_then_resume(monkeypatch, path, "train:saved-3")
    assert [r["loss"] for r in _rows(tmp_path, "k")] == [r["loss"] for r in ref]


# ---- seq_kd: the teacher writes the completions ---------------------------------------------------------------


def test_seq_kd_steps_use_the_teachers_samples(models):
    t, s = models
    spec = OnPolicySpec(lmbda=0.0, seq_kd=True, sample_temperature=0.0, max_new_tokens=4)
    batch = _qa_batch(t.tokenizer, 2)
    out = make_before_step(spec, t.model, [EOS], 0, echo=lambda _: None)(s.model, [batch], 0)[0]
    assert float(out["student_samples"]) == 0.0
    for row in range(2):  # the teacher's greedy answer, by hand (full forward, argmax, no cache)
        n = int(batch["attention_mask"][row].sum())
        first = next(i for i in range(n) if batch["labels"][row, i] != IGNORE)
        ids = batch["input_ids"][row, :first].tolist()
        want = []
        with torch.no_grad():
            for _ in range(4):
                nxt = int(t.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                want.append(nxt)
                ids.append(nxt)
                if nxt == EOS:
                    break
        got = out["labels"][row][out["labels"][row] != IGNORE].tolist()
        assert got == want


def test_lmbda_draw_is_per_step_and_seeded(models):
    t, s = models
    spec = OnPolicySpec(lmbda=0.5, max_new_tokens=2)
    before = make_before_step(spec, t.model, [EOS], 0, echo=lambda _: None)
    draws = [float(before(s.model, [_qa_batch(t.tokenizer, 1)], step)[0]["student_samples"]) for step in range(40)]
    again = [float(before(s.model, [_qa_batch(t.tokenizer, 1)], step)[0]["student_samples"]) for step in range(40)]
    assert draws == again and 10 <= sum(draws) <= 30  # about half of the steps are on-policy


# ---- resume after a kill ---------------------------------------------------------------------------------------


def test_resume_after_kill_gives_the_same_losses(tmp_path, tiny_teacher, monkeypatch):
    path = _recipe(tmp_path, tiny_teacher, onpolicy={"lmbda": 0.5, "seq_kd": True},
                   train={"steps": 5, "save_every": 2})
    assert main(["run", str(path), "name=ref"]) == 0
    ref = _rows(tmp_path, "ref")
    assert {r["student_samples"] for r in ref} == {0.0, 1.0}  # both sources occur in 5 steps

    _kill_then_resume(monkeypatch, path, "train:step-3")
    assert [r["loss"] for r in _rows(tmp_path, "k")] == [r["loss"] for r in ref]


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_options_are_one_line(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    for override, needle in (("onpolicy.lmbda=1.5", "onpolicy.lmbda: expected a value <= 1"),
                             ("onpolicy.lmbda=-0.1", "onpolicy.lmbda: expected a value >= 0"),
                             ("onpolicy.beta=1.01", "onpolicy.beta: expected a value <= 1"),
                             ("onpolicy.beta=-1", "onpolicy.beta: expected a value >= 0"),
                             ("onpolicy.max_new_tokens=0", "onpolicy.max_new_tokens: expected a value > 0"),
                             ("onpolicy.loss=kl", "onpolicy.loss: expected one of"),
                             ("onpolicy.loss_temperature=0", "onpolicy.loss_temperature: expected a value > 0"),
                             ("onpolicy.loss=sampled_reverse_kl onpolicy.lmbda=0.5", "expected lmbda: 1"),
                             ("onpolicy.loss=sampled_reverse_kl onpolicy.lmbda=1 onpolicy.sample_temperature=0",
                              "onpolicy.sample_temperature: the sampled_reverse_kl estimator needs")):
        assert main(["validate", str(path), *override.split()]) == 2, override
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
    assert main(["validate", str(path), "onpolicy.lmbda=0", "onpolicy.beta=1"]) == 0


def test_text_data_has_no_prompts_and_is_refused(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, data={"source": "builtin:pydoc", "max_records": 6, "seq_len": 32})
    assert main(["run", str(path)]) == 2
    assert "method 'onpolicy' needs prompts" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "o").exists()
    assert main(["run", str(path), "onpolicy.lmbda=0"]) == 0  # never generates: method offline, text is fine


def test_compat_preflight_a_student_that_would_never_stop(tmp_path, tiny_teacher, capsys):
    # ChatML answers end with <|im_end|>, but the char tokenizer stops only at </s>
    path = _recipe(tmp_path, tiny_teacher, data={"chat_template": True})
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "onpolicy:" in err and "student.eos_token: '<|im_end|>'" in err
    assert not (tmp_path / "runs" / "o").exists()
    assert main(["run", str(path), "student.eos_token=<|im_end|>"]) == 0


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, tiny_teacher):
    """The same global batches on 2 CPU processes (gloo): the same samples (seeded by stream position), the same
    global completion-token count, the same losses as 1 process with twice the batch."""
    import os
    import subprocess
    import sys

    one = _recipe(tmp_path, tiny_teacher, name="one", onpolicy={"lmbda": 1.0}, train={"batch_size": 4})
    two = _recipe(tmp_path, tiny_teacher, name="two", onpolicy={"lmbda": 1.0}, train={"batch_size": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-m", "distil", "run", str(one)], check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29547", "-m", "distil", "run", str(two)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = _rows(tmp_path, "one"), _rows(tmp_path, "two")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    assert [r["length"] for r in a] == pytest.approx([r["length"] for r in b], rel=1e-12)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
