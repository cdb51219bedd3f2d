"""The triplet loss and its online mining against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lcls_hitfinder.bank import pairwise_distance as bank_distance
from lcls_hitfinder.learn.triplet import pairwise_distance, triplet_loss

# four points on a line, classes 0 0 1 1; each coordinate repeated so N = 2 (the /N must cancel)
X = torch.tensor([[0.0, 0.0], [1.0, 1.0], [3.0, 3.0], [7.0, 7.0]])
Y = torch.tensor([0, 0, 1, 1])


def test_distance_is_the_design_studys() -> None:
    d = pairwise_distance(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert d[0, 1].item() == pytest.approx(np.sqrt((9 + 16) / 2))  # sqrt(Σ / N), not sqrt(Σ)
    assert d[0, 0].item() == 0.0
    x = np.random.default_rng(0).normal(size=(9, 16)).astype(np.float32)
    np.testing.assert_allclose(pairwise_distance(torch.from_numpy(x)).numpy(), bank_distance(x, x), atol=1e-5)


def test_batch_hard_by_hand() -> None:
    # anchor 0: hardest positive 1, nearest negative 3 -> max(1 - 3 + .5, 0) = 0
    # anchor 1: 1, 2 -> 0;  anchor 2: 4, 2 -> 2.5;  anchor 3: 4, 6 -> 0.   mean 2.5 / 4
    loss, stats = triplet_loss(X, Y, alpha=0.5, mining="batch-hard")
    assert loss.item() == pytest.approx(0.625)
    assert stats["active"] == pytest.approx(0.25)
    assert triplet_loss(X, Y, alpha=0.0)[0].item() == pytest.approx(2.0 / 4)


def test_semi_hard_by_hand() -> None:
    # (0,1): d_p 1, negatives 3, 7 -> nearest farther 3 -> 0;  (1,0): 1, {2, 6} -> 2 -> 0
    # (2,3): d_p 4, negatives {3, 2} none farther -> farthest 3 -> 1.5;  (3,2): 4, {7, 6} -> 6 -> 0
    loss, _ = triplet_loss(X, Y, alpha=0.5, mining="semi-hard")
    assert loss.item() == pytest.approx(1.5 / 4)


def test_anchors_without_positive_or_negative_are_skipped() -> None:
    """With a margin large enough that every counted anchor is active, the mean shows which were counted."""
    x = torch.tensor([[0.0], [1.0], [5.0]])
    # batch-hard: anchor 2 has no positive; anchors 0 and 1 give 1-5+10 = 6 and 1-4+10 = 7 (with anchor 2: 6.33)
    loss, _ = triplet_loss(x, torch.tensor([0, 0, 1]), alpha=10.0)
    assert loss.item() == pytest.approx(6.5)
    # semi-hard, negatives kept to the anchor's group: anchor 3 (alone in group 1) has none, so the pair (3, 2)
    # is skipped; (0,1), (1,0), (2,3) give 6, 7, 7 (counting (3, 2) would make the loss infinite)
    x = torch.tensor([[0.0], [1.0], [5.0], [6.0]])
    labels, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])
    loss, _ = triplet_loss(x, labels, alpha=10.0, mining="semi-hard", groups=groups)
    assert loss.item() == pytest.approx(20 / 3)


def test_batch_hard_skips_an_anchor_whose_group_holds_no_negative() -> None:
    """Anchor 3 is alone in group 1 with no blank: no negative, so it is left out of the mean (counted, its
    clamped loss of 0 would dilute it: 5 instead of 20/3). Anchors 0, 1, 2 give 1-5+10, 1-4+10, 1-4+10."""
    x = torch.tensor([[0.0], [1.0], [5.0], [6.0]])
    labels, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1])
    loss, _ = triplet_loss(x, labels, alpha=10.0, mining="batch-hard", groups=groups)
    assert loss.item() == pytest.approx(20 / 3)


def test_semi_hard_negatives_are_strictly_farther_than_the_positive() -> None:
    """A negative exactly as far as the positive is not semi-hard (d_n > d_p): (0, 1) takes the negative at 3,
    not the one at 1, and gives 0. The others: (1, 0) 0; (-1, -3) none farther than 2, the farthest 2: 0.5;
    (-3, -1) 0. Mean 0.5 / 4 (0.25 with the tie taken)."""
    x = torch.tensor([[0.0], [1.0], [-1.0], [-3.0]])
    loss, _ = triplet_loss(x, torch.tensor([0, 0, 1, 1]), alpha=0.5, mining="semi-hard")
    assert loss.item() == pytest.approx(0.125)


@pytest.mark.parametrize("mining", ["batch-hard", "semi-hard"])
def test_gradient_is_finite_at_coincident_points_and_pulls_classes_apart(mining: str) -> None:
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.1, 0.0], [0.1, 0.1]], requires_grad=True)
    loss, _ = triplet_loss(x, Y, alpha=0.5, mining=mining)  # type: ignore[arg-type]
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        moved = x - 0.1 * x.grad
    assert triplet_loss(moved, Y, alpha=0.5, mining=mining)[0] < loss  # type: ignore[arg-type]


def test_unknown_mining_is_refused() -> None:
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(X, Y, 0.1, mining="easy")  # type: ignore[arg-type]


def test_groups_keep_negatives_to_the_anchors_own_group_and_the_blanks() -> None:
    # 1-d embeddings (N = 1, d = |x - y|), semi-hard, α = 0.5; group -1 marks a blank
    x = torch.tensor([[0.0], [1.0], [1.1], [1.2]])
    labels = torch.tensor([0, 0, 1, 9])  # a pair of class 0, a class of another structure, a blank
    groups = torch.tensor([0, 0, 1, -1])
    # without groups: (0,1): nearest farther negative class 1 at 1.1 -> 0.4; (1,0): none farther, farthest 0.2 -> 1.3
    assert triplet_loss(x, labels, 0.5, "semi-hard")[0].item() == pytest.approx(1.7 / 2)
    # with groups only the blank is a negative: (0,1): 1 - 1.2 + .5 -> 0.3; (1,0): 1 - .2 + .5 -> 1.3
    assert triplet_loss(x, labels, 0.5, "semi-hard", groups)[0].item() == pytest.approx(1.6 / 2)
    # a blank anchor's negatives are every hit, of whatever group
    x = torch.tensor([[0.0], [1.0], [1.2], [5.0]])
    labels, groups = torch.tensor([9, 9, 0, 1]), torch.tensor([-1, -1, 0, 1])
    # (0,1): nearest farther 1.2 -> 0.3; (1,0): nearest farther 4 -> 0 (with no negatives: no loss at all)
    assert triplet_loss(x, labels, 0.5, "semi-hard", groups)[0].item() == pytest.approx(0.3 / 2)
