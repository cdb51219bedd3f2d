"""Triplet loss of the design study with online mining (batch-hard and semi-hard), written for its distance.

d(a, b) = sqrt( Σ_i (f(a)_i - f(b)_i)^2 / N ) over the N embedding components (bank.pairwise_distance
in numpy; here in torch with gradients), loss = max(d_p - d_n + α, 0).
"""

from __future__ import annotations

from typing import Literal

import torch

Mining = Literal["batch-hard", "semi-hard"]


def pairwise_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, N) embeddings -> (B, B) distances sqrt(mean_i (x_a,i - x_b,i)^2).

    Computed from differences (exact, no cancellation) with a zero gradient where d = 0, where the
    square root's derivative is infinite.
    """
    sq = (x[:, None, :] - x[None, :, :]).pow(2).mean(-1)
    positive = sq > 0
    return torch.where(positive, torch.where(positive, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def triplet_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    mining: Mining = "batch-hard",
    groups: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean triplet loss over the triplets mined online in this batch, and mining statistics.

    batch-hard: per anchor, its farthest positive and its nearest negative.
    semi-hard: per (anchor, positive) pair, the nearest negative farther than the positive
    (d_n > d_p); where none is, the farthest negative (FaceNet's rule, as in TF Addons).
    Anchors without a positive or without a negative contribute nothing.
    `groups` (one integer per pattern, negative for a blank) keeps each anchor's negatives to its own
    group and the blanks (a blank's: every pattern), as a bank of the sample's own references decides.
    """
    d = pairwise_distance(embeddings)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    neg = ~same
    if groups is not None:
        neg &= (groups[:, None] == groups[None, :]) | (groups[:, None] < 0) | (groups[None, :] < 0)
    inf = torch.tensor(float("inf"), device=d.device, dtype=d.dtype)
    if mining == "batch-hard":
        valid = pos.any(1) & neg.any(1)
        d_p = torch.where(pos, d, torch.zeros_like(d)).amax(1)
        d_n = torch.where(neg, d, inf).amin(1)
    elif mining == "semi-hard":
        a_idx, p_idx = pos.nonzero(as_tuple=True)
        d_ap = d[a_idx, p_idx]  # (P,)
        d_an = d[a_idx]  # (P, B)
        neg_rows = neg[a_idx]
        farther = neg_rows & (d_an > d_ap[:, None])
        nearest_farther = torch.where(farther, d_an, inf).amin(1)
        farthest = torch.where(neg_rows, d_an, -inf).amax(1)
        d_n = torch.where(farther.any(1), nearest_farther, farthest)
        d_p = d_ap
        valid = neg_rows.any(1)
    else:
        raise ValueError(f"unknown mining {mining!r}")
    losses = (d_p - d_n + alpha).clamp_min(0.0)[valid]
    if losses.numel() == 0:
        return embeddings.sum() * 0.0, {"active": 0.0, "d_p": 0.0, "d_n": 0.0}
    stats = {
        "active": float((losses > 0).float().mean().detach()),
        "d_p": float(d_p[valid].mean().detach()),
        "d_n": float(d_n[valid].mean().detach()),
    }
    return losses.mean(), stats
