"""distil/features.py: hooks by module path, and each feature loss against its formula written out with loops in
float64 on small hand-made tensors (not the vectorised code under test)."""

import math

import pytest
import torch
from torch import nn

from distil.errors import DistilError
from distil.features import (FeatureMatcher, FeaturePair, attention_map_loss, attention_transfer, capture,
                             feature_loss, make_projection, resolve)


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _norm(v):
    return math.sqrt(sum(x * x for x in v))


# ------------------------------------------------------------------------------------------------ references (loops)


def ref_feature_loss(s, t, kind, mask=None):
    """Per item: mse = mean_d (s-t)^2; cosine = 1 - s.t/(|s||t|); nmse = mean_d (s/|s| - t/|t|)^2. Mean over the
    selected items."""
    s2, t2 = s.reshape(-1, s.shape[-1]).tolist(), t.reshape(-1, t.shape[-1]).tolist()
    keep = [True] * len(s2) if mask is None else [bool(x) for x in mask.reshape(-1).tolist()]
    vals = []
    for a, b, k in zip(s2, t2, keep):
        if not k:
            continue
        d = len(a)
        if kind == "mse":
            vals.append(sum((x - y) ** 2 for x, y in zip(a, b)) / d)
        elif kind == "cosine":
            vals.append(1 - sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b)))
        else:
            na, nb = _norm(a), _norm(b)
            vals.append(sum((x / na - y / nb) ** 2 for x, y in zip(a, b)) / d)
    return sum(vals) / len(vals)


def ref_attention_transfer(fs, ft, p=2):
    """Zagoruyko & Komodakis eq. (2): Q_j = vec(sum_c |A_c|^p); mean over the batch of || Q_s/|Q_s| - Q_t/|Q_t| ||_2."""
    total = 0.0
    b, _, h, w = fs.shape
    for n in range(b):
        qs = [sum(abs(fs[n, c, y, x].item()) ** p for c in range(fs.shape[1])) for y in range(h) for x in range(w)]
        qt = [sum(abs(ft[n, c, y, x].item()) ** p for c in range(ft.shape[1])) for y in range(h) for x in range(w)]
        ns, nt = _norm(qs), _norm(qt)
        total += _norm([a / ns - b_ / nt for a, b_ in zip(qs, qt)])
    return total / b


def ref_attention_map(attn_s, attn_t, mask, heads):
    """KL(teacher row || student row) per query row, heads averaged (or mapped), mean over real query rows."""
    b, hs, tl, _ = attn_s.shape
    vals = []
    for n in range(b):
        for q in range(tl):
            if mask is not None and not bool(mask[n, q]):
                continue
            if heads == "mean":
                s_row = [sum(attn_s[n, h, q, k].item() for h in range(hs)) / hs for k in range(tl)]
                t_row = [sum(attn_t[n, h, q, k].item() for h in range(attn_t.shape[1])) / attn_t.shape[1]
                         for k in range(tl)]
                vals.append(sum(t * math.log(t / s) for t, s in zip(t_row, s_row) if t > 0))
            else:
                kls = []
                for i, j in enumerate(heads):
                    t_row = [attn_t[n, j, q, k].item() for k in range(tl)]
                    s_row = [attn_s[n, i, q, k].item() for k in range(tl)]
                    kls.append(sum(t * math.log(t / s) for t, s in zip(t_row, s_row) if t > 0))
                vals.append(sum(kls) / len(kls))
    return sum(vals) / len(vals)


def _causal_probs(b, h, t, seed):
    logits = _rand(b, h, t, t, seed=seed)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("kind", ["mse", "cosine", "nmse"])
def test_feature_losses_match_their_formulas(kind):
    s, t = _rand(2, 3, 5, seed=1), _rand(2, 3, 5, seed=2)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    assert float(feature_loss(s, t, kind)) == pytest.approx(ref_feature_loss(s, t, kind), rel=1e-12)
    masked = float(feature_loss(s, t, kind, mask))
    assert masked == pytest.approx(ref_feature_loss(s, t, kind, mask), rel=1e-12)
    # a masked-out item changes nothing, whatever it holds
    s2 = s.clone()
    s2[0, 1] += 100.0
    assert float(feature_loss(s2, t, kind, mask)) == pytest.approx(masked, rel=1e-12)
    assert float(feature_loss(s, t, kind, mask, reduction="sum")) == pytest.approx(masked * 4, rel=1e-12)
    assert float(feature_loss(s, s.clone(), kind)) == pytest.approx(0.0, abs=1e-12)


def test_nmse_is_the_cosine_loss_on_another_scale():
    s, t = _rand(4, 8, seed=3), _rand(4, 8, seed=4)
    assert float(feature_loss(s, t, "nmse")) == pytest.approx(2 * float(feature_loss(s, t, "cosine")) / 8, rel=1e-12)
    # blind to the scale of either vector, unlike mse
    assert float(feature_loss(3 * s, t, "nmse")) == pytest.approx(float(feature_loss(s, t, "nmse")), rel=1e-12)
    assert float(feature_loss(3 * s, t, "mse")) != pytest.approx(float(feature_loss(s, t, "mse")), rel=1e-3)


def test_feature_loss_bad_input():
    with pytest.raises(DistilError, match=r"one shape, found \(2, 3\) and \(2, 4\)"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(DistilError, match=r"expected one of mse, cosine, nmse, found 'l1'"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(DistilError, match=r"mask over the leading dims \(2,\)"):
        feature_loss(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3, dtype=torch.bool))


def test_attention_transfer_matches_the_paper():
    fs, ft = _rand(2, 3, 2, 3, seed=5), _rand(2, 4, 2, 3, seed=6)  # channel counts may differ
    assert float(attention_transfer(fs, ft)) == pytest.approx(ref_attention_transfer(fs, ft), rel=1e-12)
    assert float(attention_transfer(fs, ft, p=1)) == pytest.approx(ref_attention_transfer(fs, ft, p=1), rel=1e-12)
    assert float(attention_transfer(fs, 2.5 * fs)) == pytest.approx(0.0, abs=1e-12)  # scale-free
    x = fs.clone().requires_grad_(True)
    attention_transfer(x, fs.clone()).backward()
    assert torch.isfinite(x.grad).all()  # the norm at 0 has a finite (zero) gradient
    with pytest.raises(DistilError, match=r"equal batch and spatial sizes.*\[2, 3, 2, 3\].*\[2, 3, 4, 3\]"):
        attention_transfer(fs, _rand(2, 3, 4, 3))
    with pytest.raises(DistilError, match=r"conv maps \[B, C, H, W\]"):
        attention_transfer(_rand(2, 3, 4), _rand(2, 3, 4))


def test_attention_map_loss_matches_kl_per_query_row():
    a_s, a_t = _causal_probs(2, 3, 4, seed=7), _causal_probs(2, 5, 4, seed=8)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    got = float(attention_map_loss(a_s, a_t, mask))
    assert got == pytest.approx(ref_attention_map(a_s, a_t, mask, "mean"), rel=1e-10)
    heads = [4, 0, 2]
    assert float(attention_map_loss(a_s, a_t, mask, heads=heads)) == \
        pytest.approx(ref_attention_map(a_s, a_t, mask, heads), rel=1e-10)
    # padded query rows are excluded
    a_s2 = a_s.clone()
    a_s2[0, :, 3] = torch.tensor([0.97, 0.01, 0.01, 0.01], dtype=torch.float64)
    assert float(attention_map_loss(a_s2, a_t, mask)) == pytest.approx(got, rel=1e-12)
    assert float(attention_map_loss(a_t, a_t.clone(), mask)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DistilError, match=r"heads: expected 3 teacher head indices in 0\.\.4"):
        attention_map_loss(a_s, a_t, heads=[0, 1])
    with pytest.raises(DistilError, match=r"equal B and T"):
        attention_map_loss(a_s, _causal_probs(2, 3, 5, seed=1))


# ------------------------------------------------------------------------------------------------ hooks and paths


class Net(nn.Module):
    def __init__(self, width=4, out=3):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(3)])
        self.head = nn.Linear(width, out)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


class TupleOut(nn.Module):
    def forward(self, x):
        return None, x * 2, x * 3


def test_capture_reads_the_outputs_and_removes_its_hooks():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(2, 4)
    with capture(net, ["layers.1", "head"]) as feats:
        y = net(x)
    torch.testing.assert_close(net.layers[1](torch.tanh(net.layers[0](x))), feats["layers.1"])  # before tanh
    assert torch.equal(feats["head"], y) and feats["layers.1"].requires_grad
    assert all(not m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):  # removed on an exception too
        with capture(net, ["layers.0"]):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in net.modules())
    # a tuple output gives its first tensor, or the index asked for
    wrap = nn.Sequential(TupleOut())
    with capture(wrap, ["0"]) as first, capture(wrap, ["0"], index=2) as third:
        wrap(torch.ones(1))
    assert float(first["0"]) == 2.0 and float(third["0"]) == 3.0


def test_resolve_and_bad_paths_name_the_nearest_valid_paths():
    net = Net()
    assert resolve(net, "layers.2") is net.layers[2] and resolve(net, "") is net
    with pytest.raises(DistilError) as err:
        resolve(net, "layer.2")
    msg = str(err.value)
    assert "\n" not in msg and "'layer.2'" in msg and "nearest valid paths: layers.2" in msg
    with pytest.raises(DistilError, match=r"'layers\.7'.*nearest valid paths: layers\."):
        with capture(net, ["layers.0", "layers.7"]):
            pass
    assert all(not m._forward_hooks for m in net.modules())  # nothing registered before the bad path was found


def test_projection_and_matcher():
    lin = make_projection(4, 4)
    x = torch.randn(3, 4)
    torch.testing.assert_close(lin(x), x)  # equal widths start as the identity
    conv = make_projection(3, 5, conv=True)
    assert isinstance(conv, nn.Conv2d) and conv(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)
    assert make_projection(3, 6)(torch.randn(2, 3)).shape == (2, 6)

    pairs = [FeaturePair("layers.0", "layers.1", "mse", 0.5), FeaturePair("head", "head", "cosine", 2.0)]
    m = FeatureMatcher(pairs, {"layers.0": (2, 4), "head": (2, 3)}, {"layers.1": (2, 6), "head": (2, 3)})
    assert set(m.proj) == {"0"}  # widths differ for pair 0 only
    s = {"layers.0": torch.randn(2, 4), "head": torch.randn(2, 3)}
    t = {"layers.1": torch.randn(2, 6), "head": torch.randn(2, 3)}
    expected = 0.5 * feature_loss(m.proj["0"](s["layers.0"]), t["layers.1"]) + \
        2.0 * feature_loss(s["head"], t["head"], "cosine")
    torch.testing.assert_close(m(s, t), expected)
    with pytest.raises(DistilError) as err:
        FeatureMatcher([FeaturePair("layers.0", "layers.1", project=False)], {"layers.0": (2, 4)},
                       {"layers.1": (2, 6)})
    assert "'layers.0' [2, 4]" in str(err.value) and "'layers.1' [2, 6]" in str(err.value)


def test_matcher_probe_on_conv_maps():
    s_net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1))
    t_net = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 5, 3, padding=1))
    x = torch.randn(2, 1, 4, 4)
    m = FeatureMatcher.probe([FeaturePair("2", "2")], s_net, t_net, x)
    assert isinstance(m.proj["0"], nn.Conv2d) and m.proj["0"].out_channels == 5
    with capture(s_net, ["2"]) as fs, capture(t_net, ["2"]) as ft:
        s_net(x), t_net(x)
    loss = m(fs, ft)
    loss.backward()
    assert m.proj["0"].weight.grad is not None and float(loss.detach()) > 0
