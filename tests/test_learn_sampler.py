"""Batches for the triplet loss: balanced classes, and whole structures when classes are split by structure."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from lcls_hitfinder.learn.settings import TrainSettings
from lcls_hitfinder.learn.train import BalancedSampler, class_labels

N = np.array([0, 1, 2, 3, 4] * 40)
S = np.array([""] * 200, dtype=object)
S[N > 0] = np.array([f"p{(i // 5) % 10}" for i in range(200)], dtype=object)[N > 0]


def test_count_classes_are_balanced() -> None:
    labels = class_labels(N, S, TrainSettings(classes="count"))
    idx = BalancedSampler(labels)(100, np.random.default_rng(0))
    assert len(idx) == 100 and np.bincount(labels[idx]).tolist() == [20] * 5


def test_hit_classes_merge_multi_hits() -> None:
    np.testing.assert_array_equal(class_labels(N, S, TrainSettings(classes="hit")), np.minimum(N, 2))


def test_per_structure_batches_hold_all_counts_of_each_structure() -> None:
    settings = TrainSettings(classes="count", per_structure=True)
    labels = class_labels(N, S, settings)
    assert len(np.unique(labels)) == 1 + 4 * 10  # blanks share one class
    idx = BalancedSampler(labels, np.asarray(S, dtype=str))(64, np.random.default_rng(1))
    structures = {str(s) for s in S[idx] if s}
    assert 2 <= len(structures) < 10
    for name in structures:  # every drawn structure brings its singles and its multi-hits
        assert set(N[idx][S[idx] == name]) == {1, 2, 3, 4}


def test_a_small_batch_still_holds_two_classes_with_two_members_each() -> None:
    """A batch smaller than classes x 4 drew one class before: no anchor had a negative, the loss was 0."""
    labels = class_labels(N, S, TrainSettings(classes="hit"))
    for size in (4, 5, 6, 7):
        idx = BalancedSampler(labels)(size, np.random.default_rng(size))
        counts = np.bincount(labels[idx])
        assert (counts >= 2).sum() >= 2, (size, counts.tolist())


def test_own_structure_negatives_need_classes_split_by_structure() -> None:
    with pytest.raises(ValidationError, match="per_structure"):
        TrainSettings(negatives="own-structure")
    assert TrainSettings(negatives="own-structure", per_structure=True).negatives == "own-structure"


def test_batches_hold_about_batch_size_patterns_with_few_structures_or_many() -> None:
    """Classes split by structure: a new sample's data (one structure and blanks) fills its batches with more
    members per class, as many structures fill them with more classes."""
    rng = np.random.default_rng(0)
    settings = TrainSettings(classes="hit", per_structure=True)
    for n_structures in (1, 2, 300):
        counts = rng.integers(0, 3, 6000)
        structure = np.where(counts > 0, rng.integers(0, n_structures, 6000).astype(str), "").astype(object)
        sampler = BalancedSampler(class_labels(counts, structure, settings), structure)
        for size in (32, 96, 128):
            assert 0.8 * size <= len(sampler(size, rng)) <= 1.2 * size, (n_structures, size)
