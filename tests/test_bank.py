import re
from pathlib import Path

import numpy as np
import pytest

from lcls_hitfinder.bank import BankMismatch, ReferenceBank, pairwise_distance
from lcls_hitfinder.dataset import Batch, DatasetWriter
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import Label


def test_distance_is_the_training_distance() -> None:
    a = np.array([[0.0, 0.0, 0.0, 0.0]])
    b = np.array([[1.0, 1.0, 1.0, 1.0], [2.0, 0.0, 0.0, 0.0]])
    # sqrt(sum / N): sqrt(4/4) = 1 and sqrt(4/4) = 1
    np.testing.assert_allclose(pairwise_distance(a, b), [[1.0, 1.0]], rtol=1e-6)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 8)), rng.normal(size=(7, 8))
    ref = np.sqrt(((x[:, None] - y[None]) ** 2).mean(-1))
    np.testing.assert_allclose(pairwise_distance(x, y), ref, rtol=1e-5)


def _bank(method: str = "knn") -> ReferenceBank:
    rng = np.random.default_rng(1)
    centers = {0: [0.0, 0.0], 1: [5.0, 0.0], 2: [0.0, 5.0], 3: [0.0, 6.0]}
    emb = np.concatenate([rng.normal(c, 0.3, size=(10, 2)) for c in centers.values()])
    n = np.repeat(list(centers), 10)
    return ReferenceBank(emb, n, model_hash="abc", method=method, k=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_decisions_follow_the_nearest_class(method: str) -> None:
    bank = _bank(method)
    dec = bank.decide(np.array([[5.0, 0.2], [0.1, -0.1], [0.0, 5.5]]))
    assert list(dec.label) == [Label.SINGLE, Label.BLANK, Label.MULTI]
    assert list(dec.keep) == [True, False, False]
    assert dec.score[0] > 0 > dec.score[1]
    if method == "knn":
        assert dec.n_particles[0] == 1 and dec.n_particles[1] == 0


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_one_decision_equals_its_parts_and_counts_by_majority_of_the_nearest(method: str) -> None:
    """`decide` measures each distance once; what it returns must be what the separate calls give, over
    references interleaved by class, and the particle count the majority of the k nearest (ties: fewer)."""
    rng = np.random.default_rng(2)
    n = rng.permutation(np.repeat([0, 1, 2, 3, 4], 12))  # classes interleaved in the file
    bank = ReferenceBank(rng.normal(size=(60, 6)) + n[:, None], n, "abc", method=method, k=4)  # type: ignore[arg-type]
    queries = rng.normal(size=(40, 6)) * 1.5 + rng.integers(0, 5, (40, 1))
    dec = bank.decide(queries)
    d = bank.class_distances(queries)
    for c, members in ((Label.BLANK, n == 0), (Label.SINGLE, n == 1), (Label.MULTI, n > 1)):
        refs = bank.embeddings[members]
        if method == "prototype":
            expected = pairwise_distance(queries, refs.mean(0, keepdims=True))[:, 0]
        else:
            expected = np.sort(pairwise_distance(queries, refs), axis=1)[:, :4].mean(1)
        np.testing.assert_allclose(d[:, c], expected, rtol=1e-6)
    score, d_single = bank.scores(queries)
    np.testing.assert_array_equal(dec.score, score)
    np.testing.assert_array_equal(dec.distance, d_single)
    np.testing.assert_array_equal(dec.keep, score >= bank.threshold)
    other = np.where(d[:, Label.BLANK] <= d[:, Label.MULTI], Label.BLANK, Label.MULTI)
    np.testing.assert_array_equal(dec.label, np.where(dec.keep, Label.SINGLE, other))
    nearest = np.argsort(pairwise_distance(queries, bank.embeddings), axis=1)[:, :4]
    majority = [np.bincount(n[row], minlength=5).argmax() for row in nearest]
    np.testing.assert_array_equal(dec.n_particles, majority)
    assert len(set(majority)) > 2 and len(set(dec.label.tolist())) == 3


def test_majority_ties_go_to_the_smaller_count() -> None:
    bank = ReferenceBank(np.array([[0.0], [0.1], [-0.1], [-0.2], [5.0]]), np.array([2, 1, 2, 1, 1]), "abc", k=4)
    assert bank.decide(np.array([[0.0]])).n_particles.tolist() == [1]


def test_threshold_moves_the_keep_boundary() -> None:
    bank = _bank()
    q = np.array([[2.6, 0.0]])  # about halfway between blank and single
    s = bank.scores(q)[0][0]
    bank.threshold = float(s) + 0.01
    assert not bank.decide(q).keep[0]
    bank.threshold = float(s) - 0.01
    assert bank.decide(q).keep[0]


def test_save_load_and_model_check(tmp_path: Path) -> None:
    """Everything a bank decides with comes back: references, their counts and structures, method, k, threshold."""
    bank = _bank("prototype")
    bank.threshold = 0.25
    bank.structure = np.array([f"s{i % 3}" for i in range(len(bank.n_particles))], dtype=object)
    bank.seen = np.arange(32, dtype=np.uint8).reshape(2, 16)
    bank.save(tmp_path / "b.h5")
    loaded = ReferenceBank.load(tmp_path / "b.h5", expected_model_hash="abc")
    np.testing.assert_array_equal(loaded.embeddings, bank.embeddings)
    np.testing.assert_array_equal(loaded.n_particles, bank.n_particles)
    assert loaded.structure.tolist() == bank.structure.tolist()
    assert loaded.threshold == 0.25 and loaded.k == 3 and loaded.method == "prototype"
    np.testing.assert_array_equal(loaded.seen, bank.seen)
    with pytest.raises(BankMismatch, match="built for model abc, not for the loaded model other: use the model it"):
        ReferenceBank.load(tmp_path / "b.h5", expected_model_hash="other")


@pytest.mark.parametrize("damage", ["nan", "group", "singles", "directory", "dataset", "picked_with", "newer"])
def test_a_bank_that_does_not_read_cleanly_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    """What a reload refuses and counts (UserError): NaN embeddings (every decision would be multi), a group
    where a dataset belongs; and the references a bank is built from, given in its place."""
    import h5py

    if damage == "directory":
        (tmp_path / "b.h5").mkdir()
    elif damage == "dataset":
        with DatasetWriter(tmp_path / "b.h5", (4, 4), np.ones((4, 4), bool), {}) as w:
            counts, zeros = np.array([1, 0], np.int8), np.zeros((2, 4, 4), np.float32)
            w.append(Batch(zeros + 1, counts, np.array(["s", ""], object), np.full(2, 16.0), zeros, zeros[..., :3]))
    else:
        _bank().save(tmp_path / "b.h5")
        with h5py.File(tmp_path / "b.h5", "r+") as f:
            if damage == "nan":
                f["embeddings"][3] = np.nan
            elif damage == "singles":
                f["n_particles"][...] = 1
            elif damage == "picked_with":  # JSON, but no calibration: the reload's monitor failed on it
                f.attrs["picked_with"] = "[1, 2]"
            elif damage == "newer":  # what this version cannot know it misreads
                f.attrs["format_version"] = 2
            else:
                del f["structure"]
                f.create_group("structure")
    message = {
        "nan": "cannot read bank {path}: embeddings must be finite",
        "group": "cannot read bank {path}: .*has no attribute 'asstr'",
        "singles": "bank {path}: a bank needs blank or multi-hit references beside its singles",
        "picked_with": r"cannot read bank {path}: picked_with \[1, 2\] is not a calibration \(gain, offset, ",
        "directory": "cannot read bank {path}: it is a directory; give a bank file",
        "newer": "{path} is a bank of format 2, written by a newer lcls-hitfinder",
        "dataset": "{path} is a dataset of patterns, not a bank: build one from it with `lcls-hitfinder bank build",
    }[damage]
    with pytest.raises(UserError, match="^" + message.format(path=re.escape(str(tmp_path / "b.h5")))) as err:
        ReferenceBank.load(tmp_path / "b.h5", expected_model_hash="abc")
    assert "\n" not in str(err.value)


def test_precision_recall_by_hand() -> None:
    from lcls_hitfinder.bank import precision_recall

    scores = np.array([0.9, 0.8, 0.8, 0.3, 0.1])
    single = np.array([True, True, False, True, False])
    t, p, r = precision_recall(scores, single)
    np.testing.assert_allclose(t, [0.9, 0.8, 0.3, 0.1])
    np.testing.assert_allclose(p, [1.0, 2 / 3, 3 / 4, 3 / 5])  # tied scores enter together
    np.testing.assert_allclose(r, [1 / 3, 2 / 3, 1.0, 1.0])


def test_calibrated_threshold_is_the_lowest_reaching_the_target() -> None:
    from lcls_hitfinder.bank import calibrate_threshold

    scores = np.array([0.9, 0.7, 0.6, 0.5, 0.2])
    single = np.array([True, True, True, False, True])
    assert calibrate_threshold(scores, single, 1.0) == (0.6, True)
    assert calibrate_threshold(scores, single, 0.8) == (0.2, True)  # 4/5 >= 0.8 at the lowest score
    t, reached = calibrate_threshold(np.array([0.5, 0.4]), np.array([False, True]), 0.99)
    assert not reached and t == 0.4
    # unreachable, with its best precision (0.5) at two thresholds: the one with more recall
    t, reached = calibrate_threshold(np.array([0.9, 0.8, 0.7, 0.6]), np.array([False, True, False, True]), 0.99)
    assert not reached and t == 0.6
    with pytest.raises(UserError, match="single hits"):
        calibrate_threshold(scores, np.zeros(5, bool), 0.9)


def test_precision_at_another_share_of_singles_is_that_of_the_patterns_in_that_share() -> None:
    """Picked references come in the shares someone picked (half singles, say), a run in its own (a few %):
    calibrated for the run's share, the threshold and its precision are those of a calibration set that came in
    that share, here the same patterns with every other pattern counted three times (singles a quarter)."""
    from lcls_hitfinder.bank import at_single_fraction, calibrate_threshold, precision_recall

    rng = np.random.default_rng(0)
    single = np.repeat([True, False], 40)
    scores = np.where(single, rng.normal(0.5, 0.3, 80), rng.normal(0.0, 0.3, 80))
    as_run = np.r_[scores, scores[~single], scores[~single]], np.r_[single, np.zeros(80, bool)]
    _, measured, _ = precision_recall(scores, single)
    _, expected, _ = precision_recall(*as_run)
    np.testing.assert_allclose(at_single_fraction(measured, single, 0.25), expected)
    for target in (0.8, 0.9, 0.95):
        assert calibrate_threshold(scores, single, target, 0.25) == calibrate_threshold(*as_run, target)
        assert calibrate_threshold(scores, single, target, 0.25)[0] > calibrate_threshold(scores, single, target)[0]
    with pytest.raises(UserError, match="singles and other patterns"):
        at_single_fraction(measured, np.ones(80, bool), 0.25)


def test_the_threshold_itself_keeps_and_a_query_at_no_distance_from_every_class_scores_0() -> None:
    """keep = score >= threshold: a calibrated threshold is one of the calibration set's own scores, and the
    pattern that set it is kept. A query at distance 0 from every class (all references one point) has score 0."""
    bank = _bank()
    query = np.array([[4.0, 1.0], [0.5, 0.5]], np.float32)
    scores, _ = bank.scores(query)
    bank.threshold = float(scores[0])
    decided = bank.decide(query)
    assert decided.keep.tolist() == [True, False] and decided.label[0] == Label.SINGLE
    same = ReferenceBank(np.zeros((4, 2)), np.array([0, 1, 1, 2]), model_hash="abc", k=1)
    assert same.scores(np.zeros((1, 2), np.float32))[0].tolist() == [0.0]


def test_the_score_is_the_relative_margin_between_single_and_the_nearer_other_class() -> None:
    """score = (d_other - d_single) / (d_other + d_single), d_other the nearer of blank and multi: one reference
    per class on a line (1-d: the distance is |a - b|), worked by hand."""
    bank = ReferenceBank(np.array([[0.0], [4.0], [10.0]]), np.array([0, 1, 2]), model_hash="abc", k=1)
    score, d_single = bank.scores(np.array([[3.0], [4.0], [8.0]], np.float32))
    # at 3: single 1, blank 3 -> (3 - 1) / 4; at 4: single 0 -> 1; at 8: single 4, multi 2 -> (2 - 4) / 6
    np.testing.assert_allclose(score, [0.5, 1.0, -1 / 3], rtol=1e-6)
    np.testing.assert_allclose(d_single, [1.0, 0.0, 4.0], rtol=1e-6)


@pytest.mark.parametrize("method", ["knn", "prototype"])
def test_an_embedding_that_is_not_finite_is_an_error_not_a_tie(method: str) -> None:
    """A NaN or Inf embedding is at no finite distance from any class: an error, never kept, even where the
    threshold would keep a score of 0 (what a NaN score used to become)."""
    bank = _bank(method)
    bank.threshold = -0.5
    dec = bank.decide(np.array([[np.nan, np.nan], [np.inf, 0.0], [5.0, 0.2]], np.float32))
    assert dec.label.tolist() == [Label.ERROR, Label.ERROR, Label.SINGLE]
    assert dec.keep.tolist() == [False, False, True]
    assert dec.n_particles[:2].tolist() == [-1, -1]


def test_references_are_drawn_per_count_and_structure() -> None:
    from lcls_hitfinder.bank import select_references

    n = np.array([0, 0, 0, 1, 1, 1, 1, 2, 3, 4, 1, 1])
    s = np.array(["", "", "", "a", "a", "a", "b", "a", "a", "a", "b", "b"], dtype=object)
    idx = select_references(n, None, 2, seed=1)
    assert sorted(np.bincount(n[idx]).tolist()) == [1, 1, 1, 2, 2]
    idx = select_references(n, s, 2, seed=1)
    picked = {(int(a), str(b)) for a, b in zip(n[idx], s[idx], strict=True)}
    assert (1, "a") in picked and (1, "b") in picked and len(idx) == 2 + 2 + 2 + 3
    assert np.array_equal(idx, np.sort(idx))
    for seed in range(20):  # never one pattern twice: as many as there are, each once
        idx = select_references(n, None, 3, seed=seed)
        assert len(set(idx.tolist())) == len(idx) == 3 + 3 + 1 + 1 + 1


def test_a_bank_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service reloads its bank when the file changes: a save that fails half way (here: at the last
    dataset) leaves the previous bank readable and no temporary file beside it."""
    import h5py

    path = tmp_path / "bank.h5"
    old = _bank()
    old.save(path)
    create = h5py.Group.create_dataset

    def fail_at_structure(self: h5py.Group, name: str, *args: object, **kwargs: object) -> object:
        if name == "structure":
            raise OSError("disk full")
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_at_structure)
    new = ReferenceBank(old.embeddings + 1.0, old.n_particles, model_hash="another")
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    monkeypatch.undo()
    kept = ReferenceBank.load(path)
    assert kept.model_hash == old.model_hash and np.array_equal(kept.embeddings, old.embeddings)
    assert [p.name for p in tmp_path.iterdir()] == ["bank.h5"]
    new.save(path)
    assert ReferenceBank.load(path).model_hash == "another"
