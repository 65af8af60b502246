"""distil/relations.py: RKD (Park et al. 2019) and FSP (Yim et al. 2017) against their formulas, written out with
loops in float64 on small hand-made tensors (not the vectorised code under test)."""

import itertools
import math

import pytest
import torch

from distil.errors import DistilError
from distil.relations import fsp_loss, fsp_matrix, rkd_angle, rkd_distance, rkd_loss


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def huber(x):
    """Smooth L1 with delta 1 (the paper's l_delta)."""
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def dist(a, b):
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))


def ref_rkd_distance(es, et):
    """psi_D(i, j) = ||e_i - e_j|| / mu, mu = mean over pairs i < j; mean Huber over those pairs."""
    s, t = es.tolist(), et.tolist()
    pairs = list(itertools.combinations(range(len(s)), 2))
    mu_s = sum(dist(s[i], s[j]) for i, j in pairs) / len(pairs)
    mu_t = sum(dist(t[i], t[j]) for i, j in pairs) / len(pairs)
    return sum(huber(dist(s[i], s[j]) / mu_s - dist(t[i], t[j]) / mu_t) for i, j in pairs) / len(pairs)


def cos_at(e, i, j, k):
    """cos of the angle at e_j between e_i and e_k."""
    u = [a - b for a, b in zip(e[i], e[j])]
    v = [a - b for a, b in zip(e[k], e[j])]
    return sum(a * b for a, b in zip(u, v)) / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def ref_rkd_angle(es, et):
    s, t = es.tolist(), et.tolist()
    triplets = list(itertools.permutations(range(len(s)), 3))
    return sum(huber(cos_at(s, i, j, k) - cos_at(t, i, j, k)) for i, j, k in triplets) / len(triplets)


def ref_fsp(f1, f2):
    """G[b, i, j] = sum_{h,w} F1[b,i,h,w] F2[b,j,h,w] / (H W), as nested lists."""
    b, c1, h, w = f1.shape
    c2 = f2.shape[1]
    return [[[sum(f1[n, i, y, x].item() * f2[n, j, y, x].item() for y in range(h) for x in range(w)) / (h * w)
              for j in range(c2)] for i in range(c1)] for n in range(b)]


def ref_fsp_loss(pairs_s, pairs_t, normalize):
    terms = []
    for (s1, s2), (t1, t2) in zip(pairs_s, pairs_t):
        gs, gt = ref_fsp(s1, s2), ref_fsp(t1, t2)
        per = []
        for ms, mt in zip(gs, gt):
            ns = math.sqrt(sum(x * x for row in ms for x in row)) if normalize else 1.0
            nt = math.sqrt(sum(x * x for row in mt for x in row)) if normalize else 1.0
            per.append(sum((a / ns - b / nt) ** 2 for ra, rb in zip(ms, mt) for a, b in zip(ra, rb)))
        terms.append(sum(per) / len(per))
    return sum(terms) / len(terms)


def test_rkd_distance_and_angle_match_the_paper():
    es, et = _rand(5, 3, seed=1), _rand(5, 7, seed=2) * 4  # widths and scales of the two spaces differ
    assert float(rkd_distance(es, et)) == pytest.approx(ref_rkd_distance(es, et), rel=1e-12)
    assert float(rkd_angle(es, et)) == pytest.approx(ref_rkd_angle(es, et), rel=1e-12)
    assert float(rkd_loss(es, et)) == pytest.approx(ref_rkd_distance(es, et) + 2 * ref_rkd_angle(es, et), rel=1e-12)
    assert float(rkd_loss(es, et, 0.5, 0.0)) == pytest.approx(0.5 * ref_rkd_distance(es, et), rel=1e-12)
    # Huber's linear part is reached: large relative distances differ by more than 1
    far = torch.cat([es, 50 * torch.ones(1, 3, dtype=torch.float64)])
    assert float(rkd_distance(far, _rand(6, 7, seed=3))) == \
        pytest.approx(ref_rkd_distance(far, _rand(6, 7, seed=3)), rel=1e-12)


def test_rkd_is_zero_for_the_same_relations_and_blind_to_scale_and_rotation():
    es = _rand(4, 3, seed=4)
    q, _ = torch.linalg.qr(_rand(3, 3, seed=5))
    et = 3.0 * es @ q + 1.0  # scaled, rotated, shifted: the same distances (up to scale) and angles
    assert float(rkd_distance(es, et)) == pytest.approx(0.0, abs=1e-12)
    assert float(rkd_angle(es, et)) == pytest.approx(0.0, abs=1e-12)
    x = es.clone().requires_grad_(True)
    rkd_loss(x, es.clone()).backward()
    assert torch.isfinite(x.grad).all()


def test_rkd_angle_holds_for_fp32_maps_far_from_the_origin_and_duplicate_samples():
    """The angle term works from the Gram matrix (sums that cancel): fp32 activations with a large common offset
    (ReLU maps) and near-duplicate samples still give the difference-vector formula's cosines, and an exact
    duplicate sample (zero distance) gives finite gradients."""
    base = _rand(6, 40, seed=7)
    es = (base + 1000.0).float()
    es[5] = es[4] + 1e-2  # near-duplicate pair
    et = (_rand(6, 9, seed=8) + 300.0).float()
    assert float(rkd_angle(es, et)) == pytest.approx(ref_rkd_angle(es.double(), et.double()), rel=1e-5)
    dup = torch.cat([base[:4], base[3:4]]).float().requires_grad_(True)  # samples 3 and 4 are the same
    rkd_loss(dup, _rand(5, 9, seed=9).float()).backward()
    assert torch.isfinite(dup.grad).all()


def test_rkd_batch_too_small_is_one_line():
    for fn, b, need in ((rkd_distance, 1, 2), (rkd_angle, 2, 3), (rkd_loss, 2, 3)):
        with pytest.raises(DistilError) as err:
            fn(_rand(b, 3), _rand(b, 3))
        assert f"at least {need} samples" in str(err.value) and f"found {b}" in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(DistilError, match=r"one batch for student and teacher, found 3 and 4"):
        rkd_distance(_rand(3, 2), _rand(4, 2))
    with pytest.raises(DistilError, match=r"embeddings \[B, D\]"):
        rkd_distance(_rand(3, 2, 2), _rand(3, 2))


def test_fsp_matrix_and_loss_match_the_paper():
    f1, f2 = _rand(2, 3, 2, 3, seed=6), _rand(2, 4, 2, 3, seed=7)
    g = fsp_matrix(f1, f2)
    assert g.shape == (2, 3, 4)
    torch.testing.assert_close(g, torch.tensor(ref_fsp(f1, f2), dtype=torch.float64), rtol=1e-12, atol=1e-14)
    # sequences [B, T, D]: the sum is over T
    s1, s2 = _rand(2, 5, 3, seed=8), _rand(2, 5, 2, seed=9)
    as_map = fsp_matrix(s1.transpose(1, 2)[..., None], s2.transpose(1, 2)[..., None])  # T as an H x 1 map
    torch.testing.assert_close(fsp_matrix(s1, s2), as_map, rtol=1e-12, atol=1e-14)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    torch.testing.assert_close(fsp_matrix(s1, s2, mask)[0], fsp_matrix(s1[:1, :3], s2[:1, :3])[0], rtol=1e-12,
                               atol=1e-14)

    pairs_s = [(f1, f2), (f2, f1)]
    pairs_t = [(_rand(2, 3, 2, 3, seed=10), _rand(2, 4, 2, 3, seed=11)), (_rand(2, 4, 2, 3, seed=12), f1 * 3)]
    for normalize in (True, False):
        assert float(fsp_loss(pairs_s, pairs_t, normalize)) == \
            pytest.approx(ref_fsp_loss(pairs_s, pairs_t, normalize), rel=1e-12)
    assert float(fsp_loss(pairs_s, pairs_s)) == pytest.approx(0.0, abs=1e-12)
    # normalised: each term is at most 4, whatever the activations' scale
    big = [(f1 * 1e3, f2 * 1e3)]
    assert float(fsp_loss(big, [(f1, -f2)])) <= 4.0 + 1e-12
    assert float(fsp_loss(big, [(f1, -f2)], normalize=False)) > 1e5


def test_fsp_bad_shapes():
    with pytest.raises(DistilError, match=r"one batch and spatial size.*\[2, 3, 2, 3\].*\[2, 4, 3, 3\]"):
        fsp_matrix(_rand(2, 3, 2, 3), _rand(2, 4, 3, 3))
    with pytest.raises(DistilError, match=r"pair 0: student FSP matrix \[2, 3, 4\] and teacher \[2, 3, 5\]"):
        fsp_loss([(_rand(2, 3, 2, 2), _rand(2, 4, 2, 2))], [(_rand(2, 3, 2, 2), _rand(2, 5, 2, 2))])
    with pytest.raises(DistilError, match=r"as many student as teacher layer pairs"):
        fsp_loss([], [])
