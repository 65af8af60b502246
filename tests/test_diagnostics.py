"""Dark knowledge (distil/eval/diagnostics.py) against hand computations in float64."""

import math

import pytest
import torch

from distil.errors import DistilError
from distil.eval import diagnostics as dg


def _softmax(zs, t=1.0):
    e = [math.exp(z / t) for z in zs]
    return [x / sum(e) for x in e]


def test_tempered_softmax_entropy_and_outside_top1_by_hand():
    z = [2.0, 1.0, 0.0, -1.0]
    for t in (1.0, 2.0, 4.0):
        p = _softmax(z, t)
        got = dg.tempered_softmax(torch.tensor(z), t)
        assert got.dtype == torch.float64
        assert got.tolist() == pytest.approx(p, rel=1e-12)
        assert float(dg.entropy(got)) == pytest.approx(-sum(q * math.log(q) for q in p), rel=1e-12)
        assert float(dg.mass_outside_top1(got)) == pytest.approx(1 - max(p), rel=1e-12)
    # a higher temperature flattens: more entropy, more mass outside the top-1
    hs = [float(dg.entropy(dg.tempered_softmax(torch.tensor(z), t))) for t in (1, 2, 4)]
    assert hs[0] < hs[1] < hs[2] < math.log(4)


def test_limits_one_hot_and_uniform():
    onehot = torch.tensor([0.0, 1.0, 0.0])
    assert float(dg.entropy(onehot)) == 0.0 and float(dg.mass_outside_top1(onehot)) == 0.0
    uniform = torch.full((8,), 1 / 8, dtype=torch.float64)
    assert float(dg.entropy(uniform)) == pytest.approx(math.log(8), rel=1e-14)
    assert float(dg.mass_outside_top1(uniform)) == pytest.approx(7 / 8, rel=1e-14)
    with pytest.raises(DistilError, match="temperature"):
        dg.tempered_softmax(torch.zeros(3), 0.0)


def test_kl_per_position_by_hand():
    p = torch.tensor([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.25, 0.5], [0.2, 0.6, 0.2]], dtype=torch.float64)
    want = [0.5 * math.log(2) + 0.25 * math.log(0.5), math.log(1 / 0.6)]
    assert dg.kl_per_position(p, q).tolist() == pytest.approx(want, rel=1e-14)
    assert float(dg.kl_per_position(p[0], p[0])) == 0.0
    assert math.isinf(float(dg.kl_per_position(torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]))))


def test_top_k_order_and_ties():
    ids, probs = dg.top_k(torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1]), 3)
    assert ids == [1, 2, 3] and probs == pytest.approx([0.3, 0.3, 0.2])
    ids, _ = dg.top_k(torch.tensor([0.5, 0.5]), 5)
    assert ids == [0, 1]  # k larger than the vocabulary: all of it


def test_inspect_positions_and_disagreement_by_hand():
    t = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 1.0]])
    s = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.5, 1.0], [1.0, 1.0, 1.0]])  # not a permutation: KL is not symmetric
    views = dg.inspect_positions([5, 6, 7], {"teacher": t, "student": s}, [1, 2], [1.0, 2.0], 2)
    v = views[0]
    assert (v.position, v.token, v.next_token) == (1, 6, 7) and views[1].next_token is None
    assert v.argmax_differs and not views[1].argmax_differs
    for temp in (1.0, 2.0):
        pt, ps = _softmax([0.0, 2.0, 1.0], temp), _softmax([2.0, 0.5, 1.0], temp)
        want = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        assert v.kl[temp] == pytest.approx(want, rel=1e-12)
        st = v.models["teacher"][[1.0, 2.0].index(temp)]
        assert st.ids == [1, 2] and st.probs == pytest.approx([pt[1], pt[2]], rel=1e-12)
        assert st.entropy == pytest.approx(-sum(x * math.log(x) for x in pt), rel=1e-12)
        assert st.outside_top1 == pytest.approx(1 - pt[1], rel=1e-12)
    kl, differs = dg.disagreement(t, s)
    assert kl[0] == 0.0 and kl[2] == 0.0 and kl[1] > 0 and differs.tolist() == [False, True, False]
    assert dg.most_disagreeing(kl, differs, 2) == [1, 0]
