"""The one training loop: exact resume, accumulation invariance, divergence, atomic checkpoints."""

import json
import math

import pytest
import torch

from distil.data import build_examples
from distil.errors import DistilError
from distil.losses import LossOutput
from distil.methods import build_hard_labels, build_offline
from distil.models import freeze, load_model, student_from_teacher
from distil.recipe import DistillSpec, TrainSpec
from distil.trainer import TrainingDiverged, list_checkpoints, lr_at, train


@pytest.fixture(scope="module")
def setup(tiny_teacher):
    t = load_model(str(tiny_teacher))
    freeze(t.model)
    recs = [{"prompt": "q" * (1 + i % 5), "response": "abcdefg"[: 2 + i % 6]} for i in range(24)]
    examples = build_examples(recs, t.tokenizer, 64)  # variable lengths and masks
    return t, examples


def _student(t):
    s = student_from_teacher(t, [0, 3]).model
    for p in s.parameters():
        p.requires_grad_(True)
    return s


def _spec(**kw):
    base = dict(steps=6, batch_size=2, lr=1e-2, warmup_steps=2, progress=False, save_every=2, keep_last=10)
    base.update(kw)
    return TrainSpec(**base)


def _losses(run_dir):
    return [json.loads(ln)["loss"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_lr_schedule_warmup_then_cosine():
    spec = TrainSpec(steps=12, lr=1.0, warmup_steps=2, min_lr_ratio=0.1)
    assert lr_at(0, spec) == 0.5 and lr_at(1, spec) == 1.0
    assert lr_at(2, spec) == pytest.approx(1.0)
    assert lr_at(7, spec) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(12, spec) == pytest.approx(0.1)


def test_resume_continues_exactly(tmp_path, setup):
    t, examples = setup
    fn = build_offline(t.model, DistillSpec(), len(t.tokenizer))
    full = tmp_path / "full"
    train(_student(t), fn, examples, _spec(), run_dir=full, seed=0, pad_id=0)

    calls = {"n": 0}

    def crashing(model, batch, n):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6, after the step-4 checkpoint and the step-5 metrics line
            raise KeyboardInterrupt
        return fn(model, batch, n)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(_student(t), crashing, examples, _spec(), run_dir=part, seed=0, pad_id=0)
    assert [p.name for p in list_checkpoints(part / "checkpoints")] == ["step-000002", "step-000004"]
    # A fresh process would rebuild the student from the recipe: same init, then the checkpoint.
    train(_student(t), fn, examples, _spec(), run_dir=part, seed=0, pad_id=0, resume="latest")
    assert _losses(part) == _losses(full)  # bit-identical, step for step
    assert len(_losses(full)) == 6


def test_gradient_accumulation_does_not_change_the_update(tmp_path, setup):
    t, examples = setup
    fn = build_offline(t.model, DistillSpec(alpha=0.5), len(t.tokenizer))
    a, b = _student(t), _student(t)
    train(a, fn, examples, _spec(steps=2, batch_size=4, grad_accum=1, save_every=0), run_dir=tmp_path / "a",
          seed=0, pad_id=0)
    train(b, fn, examples, _spec(steps=2, batch_size=1, grad_accum=4, save_every=0), run_dir=tmp_path / "b",
          seed=0, pad_id=0)
    for x, y in zip(a.parameters(), b.parameters()):
        # AdamW divides by sqrt(v): rounding differences of the accumulated gradients (another summation order)
        # come out amplified where gradients are tiny; a real accumulation bug moves weights by ~lr = 1e-2
        torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4)
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la == pytest.approx(lb, rel=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, setup):
    t, examples = setup
    fn = build_offline(t.model, DistillSpec(), len(t.tokenizer))
    calls = {"n": 0}

    def poisoned(model, batch, n):
        calls["n"] += 1
        out = fn(model, batch, n)
        if calls["n"] == 3:
            return LossOutput(out.loss * float("nan"), out.metrics, out.n_tokens)
        return out

    run = tmp_path / "nan"
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: loss is nan; last good checkpoint: .*step-000002"):
        train(_student(t), poisoned, examples, _spec(), run_dir=run, seed=0, pad_id=0)
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]
    assert len(_losses(run)) == 2


def test_keep_last_and_no_temp_dirs_left(tmp_path, setup):
    t, examples = setup
    fn = build_hard_labels(None, DistillSpec(), len(t.tokenizer))
    run = tmp_path / "k"
    train(_student(t), fn, examples, _spec(keep_last=2), run_dir=run, seed=0, pad_id=0)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000004", "step-000006"]


def test_resume_from_missing_or_half_written_checkpoint(tmp_path, setup):
    t, examples = setup
    fn = build_hard_labels(None, DistillSpec(), len(t.tokenizer))
    with pytest.raises(DistilError, match="no complete checkpoint"):
        train(_student(t), fn, examples, _spec(), run_dir=tmp_path / "none", seed=0, pad_id=0, resume="latest")
    with pytest.raises(DistilError, match="checkpoint directory not found"):
        train(_student(t), fn, examples, _spec(), run_dir=tmp_path / "none", seed=0, pad_id=0,
              resume=str(tmp_path / "nope"))
    run = tmp_path / "half"
    train(_student(t), fn, examples, _spec(steps=2), run_dir=run, seed=0, pad_id=0)
    ckpt = run / "checkpoints" / "step-000002"
    (ckpt / "trainer_state.json").unlink()  # as if the process died before the last file
    with pytest.raises(DistilError, match="incomplete \\(half-written\\) checkpoint, missing trainer_state.json"):
        train(_student(t), fn, examples, _spec(), run_dir=run, seed=0, pad_id=0, resume=str(ckpt))
    # ... and 'latest' never picks a checkpoint without its completion marker.
    with pytest.raises(DistilError, match="no complete checkpoint"):
        train(_student(t), fn, examples, _spec(), run_dir=run, seed=0, pad_id=0, resume="latest")


def test_metrics_are_strict_json_without_clipping(tmp_path, setup):
    t, examples = setup
    fn = build_hard_labels(None, DistillSpec(), len(t.tokenizer))
    train(_student(t), fn, examples, _spec(steps=2, max_grad_norm=0.0, save_every=0), run_dir=tmp_path, seed=0,
          pad_id=0)

    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name} in metrics.jsonl")

    rows = [json.loads(ln, parse_constant=refuse) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_norm"] for r in rows] == [None, None]


def _dropout_student(t, p=0.3):
    s = _student(t)
    for layer in s.model.layers:
        layer.self_attn.attention_dropout = p  # dropout draws from the torch RNG on every training step
    return s


def test_resume_restores_the_rng_so_dropout_continues_exactly(tmp_path, setup):
    """With dropout, the losses after a resume match only if the RNG state is restored from the checkpoint
    (the data order has its own generator, so without dropout a lost RNG state would go unnoticed)."""
    t, examples = setup
    fn = build_hard_labels(vocab=len(t.tokenizer))
    full = tmp_path / "full"
    train(_dropout_student(t), fn, examples, _spec(), run_dir=full, seed=0, pad_id=0)
    no_dropout = tmp_path / "nodrop"
    train(_student(t), fn, examples, _spec(), run_dir=no_dropout, seed=0, pad_id=0)
    assert _losses(full)[1:] != _losses(no_dropout)[1:]  # the dropout really draws random numbers

    calls = {"n": 0}

    def crashing(model, batch, n):
        calls["n"] += 1
        if calls["n"] == 6:  # dies during step 6, after the step-4 checkpoint
            raise KeyboardInterrupt
        return fn(model, batch, n)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(_dropout_student(t), crashing, examples, _spec(), run_dir=part, seed=0, pad_id=0)
    torch.manual_seed(12345)  # a fresh process: whatever state the RNG is in, the checkpoint's must win
    train(_dropout_student(t), fn, examples, _spec(), run_dir=part, seed=0, pad_id=0, resume="latest")
    assert _losses(part) == _losses(full)  # bit-identical, step for step


def test_finite_loss_with_non_finite_gradients_stops_before_the_step(tmp_path, setup):
    t, examples = setup
    fn = build_hard_labels(vocab=len(t.tokenizer))
    calls = {"n": 0}

    def poisoned(model, batch, n):
        calls["n"] += 1
        out = fn(model, batch, n)
        if calls["n"] == 3:
            p = next(q for q in model.parameters() if q.requires_grad)
            # value sqrt(0) = 0 (the loss stays finite), derivative 1 / (2 sqrt(0)) = inf -> NaN/inf gradients
            out = LossOutput(out.loss + torch.sqrt((p - p.detach()).abs().sum()), out.metrics, out.n_tokens)
            assert math.isfinite(float(out.loss.detach()))
        return out

    run = tmp_path / "poisoned"
    student = _student(t)
    with pytest.raises(TrainingDiverged, match=r"diverged at step 3: the loss is finite .* but the gradients are not"):
        train(student, poisoned, examples, _spec(max_grad_norm=0.0), run_dir=run, seed=0, pad_id=0)
    assert all(torch.isfinite(p).all() for p in student.parameters())  # the poisoned step was never taken
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000002"]


def test_trained_module_comes_back_without_the_autocast_wrapper(tmp_path, setup):
    """Under bf16 mixed precision accelerate wraps the model's forward in autocast; the trained module handed
    back for evaluation must not keep it, or its eval row runs at another precision than the `before` row."""
    from distil.methods.contract import Trainable
    from distil.trainer import make_accelerator

    from accelerate.state import AcceleratorState

    t, examples = setup
    module = Trainable(_student(t))
    AcceleratorState._reset_state(reset_partial_state=True)  # the state is a per-process singleton
    try:
        res = train(module, build_hard_labels(vocab=len(t.tokenizer)), examples, _spec(steps=1, save_every=0),
                    run_dir=tmp_path / "bf16", seed=0, pad_id=0, accelerator=make_accelerator("bf16"))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert res.model is module
    twin = _student(t)
    twin.load_state_dict(module.student.state_dict())
    ids = torch.tensor([examples[0]["input_ids"]])
    with torch.no_grad():
        mine, ref = res.model(input_ids=ids).logits, twin(input_ids=ids).logits
    assert torch.equal(mine, ref)  # fp32 both: under a kept bf16 autocast wrapper they differ by ~1e-2


def test_a_part_in_its_own_group_is_clipped_on_its_own(tmp_path, setup):
    """A Trainable part named in lr_scale (an online teacher, a peer) is clipped to max_grad_norm by itself: a part
    with huge gradients leaves the student's clipped step, hence its weights, exactly as when trained alone."""
    from distil.methods.contract import Trainable

    t, examples = setup
    fn = build_offline(t.model, DistillSpec(), len(t.tokenizer))

    def with_big(model, batch, n):  # the student's loss + a part whose gradient norm is ~1e4
        out = fn(model, batch, n)
        big = getattr(model, "module", model).extras["big"]
        return LossOutput(out.loss + 1e3 * big.weight.pow(2).sum(), out.metrics, out.n_tokens)

    alone = _student(t)
    train(Trainable(alone), fn, examples, _spec(steps=3), run_dir=tmp_path / "a", seed=0, pad_id=0)
    results = {}
    for scale in (None, {"big": 1.0}):
        student, big = _student(t), torch.nn.Linear(8, 8)
        torch.nn.init.constant_(big.weight, 3.0)
        train(Trainable(student, {"big": big}, lr_scale=scale), with_big, examples, _spec(steps=3),
              run_dir=tmp_path / str(scale is None), seed=0, pad_id=0)
        results[scale is None] = all(torch.equal(a, b) for a, b in zip(alone.parameters(), student.parameters()))
    assert results == {False: True, True: False}  # own group: the student's path is untouched; one group: it is not
