"""The Python API (distil/api.py): any nn.Module pair through THE training loop.

Golden values come from the formulas written out here in float64 (Hinton et al. 2015), not from the code.
"""

import json
import shutil

import pytest
import torch
from torch import nn

import distil
from distil import api
from distil.errors import DistilError


def _data(n=256, d=10, c=4, seed=0):
    """x ~ N(0, 1) (seeded), label = argmax of a fixed linear map of x (the same task for every seed)."""
    w = torch.randn(d, c, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x, (x @ w).argmax(1)


def _mlp(hidden, d=10, c=4, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, c))


@pytest.fixture(scope="module")
def teacher():
    x, y = _data()
    model = _mlp(64, seed=1)
    api.distill(None, model, (x, y), loss="ce", epochs=15, batch_size=32, lr=1e-2)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Golden formulas


def _hinton64(zs, zt, y, t, alpha):
    """alpha * T^2 * mean_i KL(softmax(zt_i/T) || softmax(zs_i/T)) + (1 - alpha) * mean_i CE(zs_i, y_i), float64."""
    ps, pt = torch.softmax(zs / t, -1), torch.softmax(zt / t, -1)
    kl = (pt * (pt.log() - ps.log())).sum(-1)
    ce = -torch.log_softmax(zs, -1).gather(1, y[:, None]).squeeze(1)
    return alpha * t * t * kl.mean() + (1 - alpha) * ce.mean(), kl, ce


def test_hinton_kd_matches_the_formula_and_its_gradient():
    zs = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0], [-1.5, 1.0, 0.0]], dtype=torch.float64)
    zt = torch.tensor([[1.0, 0.0, 2.0], [0.5, -0.5, 1.0], [3.0, 1.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    for t, alpha in ((1.0, 0.5), (4.0, 0.9), (20.0, 1.0)):
        s = zs.clone().requires_grad_(True)
        out = api.logit_loss(s, zt, y, loss="kd", temperature=t, alpha=alpha)
        expected, kl, ce = _hinton64(zs, zt, y, t, alpha)
        assert float(out.loss.detach()) == pytest.approx(float(expected), rel=1e-5)
        assert float(out.metrics["kd"]) == pytest.approx(float(t * t * kl.mean()), rel=1e-5)  # the T^2 factor
        assert float(out.metrics["ce"]) == pytest.approx(float(ce.mean()), rel=1e-5)
        out.loss.backward()
        # Hinton's gradient: d(T^2 KL)/dz_S = T (q - p) at temperature T; CE's: softmax(z_S) - onehot(y)
        q, p = torch.softmax(zs / t, -1), torch.softmax(zt / t, -1)
        grad = (alpha * t * (q - p) + (1 - alpha) * (torch.softmax(zs, -1) - nn.functional.one_hot(y, 3))) / 3
        # fp32 inside the loss: an error of a few ulps of the gradient's largest entry
        torch.testing.assert_close(s.grad, grad, rtol=1e-5, atol=1e-5 * float(grad.abs().max()))


def test_identical_logits_give_zero_kd_and_the_t_squared_factor():
    z = torch.tensor([[0.3, -2.0, 1.0, 0.0], [5.0, 1.0, 1.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([2, 0])
    out = api.logit_loss(z, z.clone(), y, loss="kd", temperature=4.0, alpha=0.7)
    assert float(out.metrics["kd"]) == 0.0  # the same numbers through the same operations: exactly zero on any CPU
    assert float(out.loss) == pytest.approx(0.3 * float(_hinton64(z, z, y, 1.0, 0.0)[2].mean()), rel=1e-5)
    # the same KL at T=2 and T=8, scaled by T^2: kd / T^2 is the plain KL of the softened distributions
    zt = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], dtype=torch.float64)
    for t in (2.0, 8.0):
        kd = float(api.logit_loss(z, zt, y, loss="kd", temperature=t, alpha=1.0).metrics["kd"])
        assert kd / t**2 == pytest.approx(float(_hinton64(z, zt, y, t, 1.0)[1].mean()), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# Training through the API


def test_the_api_trains_a_classifier_and_the_student_improves(teacher):
    x, y = _data()
    xe, ye = _data(n=128, seed=1)
    student = _mlp(16, seed=2)
    result = distil.distill(teacher, student, (x, y), epochs=4, batch_size=32, lr=3e-2, eval_data=(xe, ye))
    assert result.student is student and result.run_dir is None
    before, after = result.eval["student (before)"], result.eval["student"]
    assert after["kl"] < 0.5 * before["kl"] and after["accuracy"] > before["accuracy"] + 0.2
    assert [r["step"] for r in result.history] == list(range(1, 33))  # 4 epochs of 256 / 32
    assert result.history[-1]["kd"] < result.history[0]["kd"]
    assert {"loss", "kd", "ce", "lr", "grad_norm"} <= set(result.history[0])


def test_the_student_alone_and_data_as_a_list_of_dicts(teacher):
    x, y = _data(n=64)
    items = [{"x": x[i], "labels": y[i]} for i in range(64)]

    class Keyed(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp(16, seed=3)

        def forward(self, x):
            return {"logits": self.net(x)}

    model = Keyed()
    result = api.distill(None, model, items, loss="ce", steps=5, batch_size=16, lr=1e-2, eval_data=items)
    assert set(result.history[0]) >= {"ce"} and "kd" not in result.history[0]
    assert set(result.eval) == {"student (before)", "student"}


def test_resume_through_the_api_gives_the_same_losses(teacher, tmp_path):
    x, y = _data()
    from distil.features import FeaturePair

    def run(run_dir, resume=False, student=None):
        student = student or _mlp(8, seed=4)
        return api.distill(teacher, student, (x, y), steps=6, batch_size=16, lr=1e-2, run_dir=run_dir,
                           resume=resume, save_every=3, keep_last=5, seed=7, features=[FeaturePair("1", "1")])

    full = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoints" / "step-000003"))
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in full.history]
    for a, b in zip(full.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    # resume=True continues a run from its newest checkpoint; a finished run trains no further step
    again = run(tmp_path / "a", resume=True)
    assert [r["loss"] for r in again.history] == [r["loss"] for r in full.history]


def test_projections_are_in_checkpoints_and_not_in_the_student(teacher, tmp_path):
    from safetensors import safe_open

    from distil.features import FeaturePair

    x, y = _data()
    student = _mlp(8, seed=5)
    keys_before = set(student.state_dict())
    result = api.distill(teacher, student, (x, y), steps=4, batch_size=16, run_dir=tmp_path / "run",
                         features=[FeaturePair("1", "1", loss="mse", weight=0.5)],
                         relations=[api.RelationPair("rkd", "", "")])
    with safe_open(str(tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"extras.features.proj.0.weight", "extras.features.proj.0.bias"} <= keys  # 8 -> 64: a FitNets regressor
    assert {f"student.{k}" for k in keys_before} <= keys
    assert set(result.student.state_dict()) == keys_before
    row = result.history[-1]
    assert row["feature"] > 0 and row["rkd"] > 0


def test_attention_transfer_and_fsp_on_conv_maps(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(32, 1, 8, 8)
    y = torch.randint(0, 3, (32,))

    def conv(ch):
        return nn.Sequential(nn.Conv2d(1, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(ch * 64, 3))

    teacher, student = conv(8).eval(), conv(4)
    result = api.distill(teacher, student, (x, y), steps=3, batch_size=8, loss="ce",
                         features=[api.AttentionPair("3", "3", weight=2.0)],
                         relations=[api.RelationPair("fsp", [("1", "3")], [("1", "3")])])
    assert result.history[-1]["attention"] > 0 and result.history[-1]["fsp"] > 0


# ----------------------------------------------------------------------------------------------------------------
# Born-Again and mutual learning through the API


def test_ensemble_is_the_mean_of_the_probabilities():
    from distil.methods.born_again import Ensemble

    a, b = _mlp(4, seed=1).double(), _mlp(4, seed=2).double()
    x = torch.randn(5, 10, dtype=torch.float64)
    mix = torch.softmax(Ensemble([a, b])(x), -1)
    torch.testing.assert_close(mix, (torch.softmax(a(x), -1) + torch.softmax(b(x), -1)) / 2, rtol=1e-6, atol=1e-7)


def test_born_again_generations_each_have_a_row(teacher, tmp_path):
    x, y = _data()
    result = distil.born_again(_mlp(8, seed=6), (x, y), generations=2, teacher=teacher, steps=4, batch_size=16,
                               eval_data=_data(n=64, seed=2), run_dir=tmp_path / "ban")
    assert len(result.students) == 2 and result.student is result.students[-1]
    assert set(result.eval) == {"teacher", "generation 1", "generation 2", "ensemble"}
    assert sorted(p.name for p in (tmp_path / "ban").iterdir()) == ["gen-1", "gen-2"]
    # fresh students: generation 2 does not start from generation 1's weights (nor from the template's)
    assert not torch.equal(result.students[0][0].weight, result.students[1][0].weight)
    # without a teacher: generation 0 learns from the labels alone, then the born-again generations
    alone = api.born_again(_mlp(8, seed=6), (x, y), generations=1, steps=2, batch_size=16, eval_data=(x, y))
    assert set(alone.eval) == {"generation 0", "generation 1"} and "kd" not in alone.histories["gen-0"][0]
    assert "kd" in alone.histories["gen-1"][0]


def test_mutual_learning_trains_every_peer(tmp_path):
    x, y = _data()
    peers = [_mlp(8, seed=7), _mlp(8, seed=8)]
    start = [p[0].weight.detach().clone() for p in peers]
    result = distil.mutual(peers, (x, y), steps=4, batch_size=16, lr=1e-2, eval_data=(x, y), run_dir=tmp_path / "m")
    assert all(not torch.equal(p[0].weight, s) for p, s in zip(peers, start))
    assert set(result.eval) == {"peer 1", "peer 2"} and result.student is peers[0]
    assert {"ce_1", "ce_2", "mutual_1", "mutual_2"} <= set(result.history[0])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m" / "checkpoints" / "step-000004" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "student.0.weight" in keys and "extras.peer2.0.weight" in keys


def test_mutual_lr_scales_give_each_peer_its_step(tmp_path):
    """AdamW's first step moves a weight by lr * g / (|g| + eps), so the largest change is each peer's own lr."""
    x, y = _data()
    peers = [_mlp(8, seed=7), _mlp(8, seed=8)]
    start = [p[0].weight.detach().clone() for p in peers]
    distil.mutual(peers, (x, y), steps=1, batch_size=16, lr=1e-2, lr_scales=[1.0, 0.1], weight_decay=0.0,
                  run_dir=tmp_path / "m")
    moved = [float((p[0].weight.detach() - s).abs().max()) for p, s in zip(peers, start)]
    assert moved[0] == pytest.approx(1e-2, rel=1e-3) and moved[1] == pytest.approx(1e-3, rel=1e-3)


def test_mutual_with_lr_scales_resumes_to_the_uninterrupted_run(tmp_path):
    """Two optimizer groups (one per scale) are checkpointed and restored: the resumed peers equal the full run's."""
    x, y = _data()

    def run(run_dir, resume=False):
        peers = [_mlp(8, seed=7), _mlp(8, seed=8)]
        distil.mutual(peers, (x, y), steps=6, batch_size=16, lr=1e-2, lr_scales=[1.0, 0.1], run_dir=run_dir,
                      resume=resume, save_every=3, keep_last=5, seed=3)
        return peers

    full = run(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    resumed = run(tmp_path / "b", resume=str(tmp_path / "b" / "checkpoints" / "step-000003"))
    for pa, pb in zip(full, resumed):
        assert all(torch.equal(a, b) for a, b in zip(pa.parameters(), pb.parameters()))


# ----------------------------------------------------------------------------------------------------------------
# Bad input: one line, a DistilError


@pytest.mark.parametrize("call, message", [
    (lambda t, s, d: api.mutual([s], d, steps=1), r"peers: deep mutual learning trains two or more models together, "
                                                  r"found 1"),
    (lambda t, s, d: api.mutual([s, t], d, steps=1, lr_scales=[1.0]),
     r"lr_scales: expected one number > 0 per peer \(2\), found \[1.0\]"),
    (lambda t, s, d: api.mutual([s, t], d, steps=1, lr_scales=[1.0, "x"]),
     r"lr_scales: expected one number > 0 per peer \(2\), found \[1.0, 'x'\]"),
    (lambda t, s, d: api.distill(t, s, d, steps=1, batch_size=1, relations=[api.RelationPair("rkd", "", "")]),
     r"relations: RKD relates the samples of a batch: expected batch_size \(and samples\) >= 3 .* found 1"),
    (lambda t, s, d: api.distill(t, s, d, steps=1, batch_size=1,
                                 relations=[api.RelationPair("rkd", "", "", lambda_a=0.0)]),
     r"expected batch_size \(and samples\) >= 2, found 1"),
    (lambda t, s, d: api.distill(t, s, d, steps=1, batch_size=16,
                                 relations=[api.RelationPair("rkd", "", "", samples=2)]),
     r"RKD relates the samples of a batch: expected batch_size \(and samples\) >= 3 .* found 2"),
    (lambda t, s, d: api.distill(t, s, d, loss="kl"), r"loss: expected one of kd, ce, forward_kl"),
    (lambda t, s, d: api.distill(None, s, d), r"teacher: loss 'kd' needs a teacher, found None"),
    (lambda t, s, d: api.distill(t, s, d[0], steps=1), r"alpha: the data has no labels.*expected alpha=1.0"),
    (lambda t, s, d: api.distill(t, s, d, steps=1, lr=-1.0),
     r"distil\.distill: train\.lr: expected a value > 0(\.0)?, found -1\.0"),
    (lambda t, s, d: api.distill(t, s, d, resume=True), r"resume: expected a run_dir"),
    (lambda t, s, d: api.distill(t, s, [], steps=1), r"train_data: expected at least one example"),
])
def test_bad_input_is_one_clear_line(teacher, call, message):
    x, y = _data(n=32)
    with pytest.raises(DistilError, match=message) as info:
        call(teacher, _mlp(8), (x, y))
    assert "\n" not in str(info.value)


def test_unlabelled_data_needs_alpha_one(teacher):
    x, _ = _data(n=32)
    with pytest.raises(DistilError, match=r"alpha: the data has no labels"):
        api.distill(teacher, _mlp(8), [xi for xi in x], steps=1, batch_size=8)
    result = api.distill(teacher, _mlp(8), [xi for xi in x], steps=2, batch_size=8, alpha=1.0)
    assert "kd" in result.history[0] and "ce" not in result.history[0]


def test_a_feature_path_that_does_not_exist_names_the_nearest(teacher):
    from distil.features import FeaturePair

    x, y = _data(n=32)
    with pytest.raises(DistilError, match=r"'2\.weight'|nearest valid paths"):
        api.distill(teacher, _mlp(8), (x, y), steps=1, features=[FeaturePair("2.weight", "2")])


def test_metrics_file_of_a_run_dir(teacher, tmp_path):
    x, y = _data(n=64)
    api.distill(teacher, _mlp(8), (x, y), steps=2, batch_size=16, run_dir=tmp_path / "r")
    rows = [json.loads(r) for r in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and (tmp_path / "r" / "checkpoints" / "step-000002").is_dir()
