"""Relation-based distillation: the student learns how the teacher relates things, not the things themselves.

- RKD (Park et al. 2019, "Relational Knowledge Distillation"): relations between the samples of a batch. The
  distance term matches the pairwise distances of the embeddings (each model's normalised by its own mean
  distance, so the widths and scales of the two embedding spaces need not agree); the angle term matches the
  angles the samples form in triplets. Both through the Huber (smooth-L1, delta = 1) loss.
- FSP (Yim et al. 2017, "A Gift from Knowledge Distillation"): relations between two layers of one model, the
  "flow of solution procedure" matrix G = F1^T F2 / (H*W); the student learns the teacher's G for matched layer
  pairs.

The teacher's inputs are targets: compute them under `torch.no_grad()` (or detach them); these functions do not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distil.errors import DistilError


def _wide(x: Tensor) -> Tensor:
    """At least fp32 (bf16/fp16 activations are upcast; float64 stays float64, e.g. in golden tests)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------------------------------
# RKD


def _check_embeddings(es: Tensor, et: Tensor, need: int, what: str) -> None:
    if es.dim() != 2 or et.dim() != 2:
        raise DistilError(f"{what}: expected embeddings [B, D], found student {list(es.shape)} and teacher "
                          f"{list(et.shape)}")
    if es.shape[0] != et.shape[0]:
        raise DistilError(f"{what}: expected one batch for student and teacher, found {es.shape[0]} and "
                          f"{et.shape[0]} samples")
    if es.shape[0] < need:
        raise DistilError(f"{what}: needs a batch of at least {need} samples (relations between samples), found "
                          f"{es.shape[0]}")


def _pair_distances(e: Tensor) -> Tensor:
    """||e_i - e_j||_2 for the distinct pairs i < j, [B(B-1)/2], each divided by their mean (mu in the paper)."""
    i, j = torch.triu_indices(e.shape[0], e.shape[0], offset=1, device=e.device)
    d = (e[i] - e[j]).pow(2).sum(-1).clamp_min(1e-12).sqrt()  # clamp: a duplicate pair gets no NaN gradient
    return d / d.mean().clamp_min(1e-12)


def rkd_distance(es: Tensor, et: Tensor) -> Tensor:
    """RKD distance loss: mean over distinct pairs i < j of Huber(psi_S(i, j) - psi_T(i, j)), where
    psi(i, j) = ||e_i - e_j|| / mu and mu is the mean of ||e_i - e_j|| over those pairs (per model).
    Huber = smooth-L1 with delta 1: 0.5 x^2 for |x| < 1, |x| - 0.5 beyond. es [B, Ds], et [B, Dt], B >= 2.
    (Park et al.'s code averages over all B^2 entries of the distance matrix, diagonal zeros included; the mean
    over distinct pairs here is that value times B / (B - 1).)"""
    _check_embeddings(es, et, 2, "RKD distance")
    return F.smooth_l1_loss(_pair_distances(_wide(es)), _pair_distances(_wide(et)), beta=1.0)


def _triplet_cosines(e: Tensor) -> Tensor:
    """cos of the angle at e_j between e_i and e_k, for every ordered triplet of distinct (i, j, k): [n].

    From the Gram matrix G = E E^T rather than the [B, B, D] difference vectors (B^2 D + B^3 work and memory instead
    of B^3 D: the angle term of 64 samples of 2,560-wide maps is 40x cheaper):
        <e_i - e_j, e_k - e_j> = G_ik - G_ij - G_jk + G_jj,   ||e_i - e_j||^2 = G_ii + G_jj - 2 G_ij.
    In float64, since the sums cancel when samples are close (the result is cast back to the input's dtype)."""
    b = e.shape[0]
    e64 = e.double()
    g = e64 @ e64.T
    sq = g.diagonal()
    # norm[j, i] = ||e_i - e_j||, at least 1e-12 as F.normalize's eps (the clamp keeps i = j finite, masked below)
    norm = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(1e-24).sqrt()
    dot = g[None, :, :] - g[:, :, None] - g[:, None, :] + sq[:, None, None]  # [j, i, k] = <e_i - e_j, e_k - e_j>
    cos = dot / (norm[:, :, None] * norm[:, None, :])
    idx = torch.arange(b, device=e.device)
    distinct = (idx[:, None, None] != idx[None, :, None]) & (idx[:, None, None] != idx[None, None, :]) & \
        (idx[None, :, None] != idx[None, None, :])
    return cos[distinct].to(e.dtype)


def rkd_angle(es: Tensor, et: Tensor) -> Tensor:
    """RKD angle loss: mean over ordered triplets of distinct samples (i, j, k) of Huber(cos_S - cos_T), where
    cos = <(e_i - e_j)/||e_i - e_j||, (e_k - e_j)/||e_k - e_j||> is the cosine of the angle at e_j.
    es [B, Ds], et [B, Dt], B >= 3. (Park et al.'s code averages over all B^3 entries, degenerate triplets
    included.)"""
    _check_embeddings(es, et, 3, "RKD angle")
    return F.smooth_l1_loss(_triplet_cosines(_wide(es)), _triplet_cosines(_wide(et)), beta=1.0)


def rkd_loss(es: Tensor, et: Tensor, lambda_d: float = 1.0, lambda_a: float = 2.0) -> Tensor:
    """lambda_d * rkd_distance + lambda_a * rkd_angle (the paper's weights: 1 and 2). A zero weight skips its
    term (so lambda_a = 0 works on a batch of 2)."""
    _check_embeddings(es, et, 3 if lambda_a else 2, "RKD")
    total = torch.zeros((), device=es.device)
    if lambda_d:
        total = total + lambda_d * rkd_distance(es, et)
    if lambda_a:
        total = total + lambda_a * rkd_angle(es, et)
    return total


# ----------------------------------------------------------------------------------------------------------------
# FSP


def fsp_matrix(f1: Tensor, f2: Tensor, mask: Tensor | None = None) -> Tensor:
    """The FSP matrix G [B, C1, C2] of two feature maps of one model (fp32):

        conv maps  f1 [B, C1, H, W], f2 [B, C2, H, W]:   G_ij = sum_{h,w} f1[i,h,w] f2[j,h,w] / (H * W)
        sequences  f1 [B, T, D1],    f2 [B, T, D2]:      G_ij = sum_t f1[t,i] f2[t,j] / T
                   (with `mask` [B, T]: over the real tokens only, divided by their count)

    The two maps must have the same spatial size / length (Yim et al. pool the larger one first)."""
    if f1.dim() == 4 and f2.dim() == 4:
        if f1.shape[0] != f2.shape[0] or f1.shape[2:] != f2.shape[2:]:
            raise DistilError(f"FSP matrix: expected conv maps of one batch and spatial size, found {list(f1.shape)} "
                              f"and {list(f2.shape)}")
        a, b = _wide(f1).flatten(2), _wide(f2).flatten(2)  # [B, C, HW]
        return torch.einsum("bin,bjn->bij", a, b) / a.shape[-1]
    if f1.dim() == 3 and f2.dim() == 3:
        if f1.shape[:2] != f2.shape[:2]:
            raise DistilError(f"FSP matrix: expected sequences [B, T, D] of one batch and length, found "
                              f"{list(f1.shape)} and {list(f2.shape)}")
        a, b = _wide(f1), _wide(f2)
        if mask is None:
            return torch.einsum("bti,btj->bij", a, b) / a.shape[1]
        m = mask.to(a.dtype)
        return torch.einsum("bti,btj->bij", a * m[..., None], b) / m.sum(1).clamp_min(1.0)[:, None, None]
    raise DistilError(f"FSP matrix: expected two conv maps [B, C, H, W] or two sequences [B, T, D], found "
                      f"{list(f1.shape)} and {list(f2.shape)}")


def fsp_loss(pairs_s: list[tuple[Tensor, Tensor]], pairs_t: list[tuple[Tensor, Tensor]], normalize: bool = True,
             mask: Tensor | None = None) -> Tensor:
    """FSP loss (Yim et al. 2017): mean over the layer pairs and the batch of ||G_S - G_T||_F^2, where each pair
    (f1, f2) of the student is matched with the teacher's pair at the same position (the matrices must have one
    shape: the student keeps the teacher's channel counts at those layers, or the caller projects).

    Guards against FSP's known instability (its matrices grow with the activations' scale, squared, and the loss
    with their square: early training blows up): with `normalize` (default) each G is divided by its own Frobenius
    norm per sample, so every term lies in [0, 4]; all in fp32; a zero matrix stays zero (norm floored at 1e-12).
    Clip the gradients too: the training loop does it with train.max_grad_norm (default 1.0). normalize=False is
    the paper's raw loss. The paper's per-pair weights lambda_i are all equal; here lambda_i = 1 / (number of pairs)
(a mean), so adding a pair does not rescale the others."""
    if len(pairs_s) != len(pairs_t) or not pairs_s:
        raise DistilError(f"FSP loss: expected as many student as teacher layer pairs (at least one), found "
                          f"{len(pairs_s)} and {len(pairs_t)}")
    terms = []
    for n, ((s1, s2), (t1, t2)) in enumerate(zip(pairs_s, pairs_t)):
        gs, gt = fsp_matrix(s1, s2, mask), fsp_matrix(t1, t2, mask)
        if gs.shape != gt.shape:
            raise DistilError(f"FSP loss: pair {n}: student FSP matrix {list(gs.shape)} and teacher "
                              f"{list(gt.shape)}: expected one shape (matched channel counts)")
        if normalize:
            gs = gs / torch.linalg.matrix_norm(gs).clamp_min(1e-12)[:, None, None]
            gt = gt / torch.linalg.matrix_norm(gt).clamp_min(1e-12)[:, None, None]
        terms.append((gs - gt).pow(2).sum((1, 2)).mean())
    return torch.stack(terms).mean()
