"""Metric definitions on hand-made decisions, and the report's files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.evaluate import (
    REPORT_FILES,
    accuracy_by_photons,
    best_at,
    cnn_metrics,
    hit_metrics,
    markdown_table,
    pairs_called_single_by_axis,
    per_sample_decisions,
    per_sample_protocol,
    projection_2d,
    write_report,
)
from lcls_hitfinder.labels import Label, label_of_count, labels_of_counts
from lcls_hitfinder.protocols import Decisions

N = np.array([0, 1, 1, 1, 2, 3, 4, 1])
LABEL = np.array([0, 1, 1, 2, 2, 1, 2, 0])  # wrong: index 3 (single -> multi), 5 (multi -> single), 7 (single -> blank)
SCORE = np.array([-0.9, 0.8, 0.6, -0.1, -0.5, 0.7, -0.6, -0.8], np.float32)


def decisions() -> Decisions:
    return Decisions(label=LABEL, keep=LABEL == 1, score=SCORE, distance=np.zeros(8), n_particles=np.minimum(N, 2))


def test_hit_metrics_by_hand() -> None:
    m = hit_metrics(N, decisions())
    assert m["accuracy"] == pytest.approx(5 / 8)
    # hits: indices 1..7; single-or-not right for 1, 2, 4, 6 -> 4 / 7
    assert m["single_vs_multi_accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 4)
    # scores ranked: .8 S, .7 M, .6 S, -.1 S, -.5, -.6, -.8 S, -.9: recall >= .9 needs all 4 singles -> 4/7
    assert m["precision_at_recall_0.9"] == pytest.approx(4 / 7)
    assert m["recall_at_precision_0.99"] == pytest.approx(1 / 4)
    assert m["count_accuracy"] == pytest.approx(6 / 8)  # estimates 0 1 1 1 2 2 2 1: wrong at 3 and 4 particles
    assert m["confusion"] == [[1, 0, 0], [1, 2, 1], [0, 1, 2]]
    assert (m["n_blank"], m["n_single"], m["n_multi"]) == (1, 4, 3)


def test_labels_of_counts_and_best_at() -> None:
    counts = [-1, 0, 1, 2, 3, 4]  # -1: a count not known, as the log stores it
    assert labels_of_counts(np.array(counts)).tolist() == [0, 0, 1, 2, 2, 2] == [label_of_count(n) for n in counts]
    assert np.isnan(best_at(SCORE, np.zeros(8, bool), min_recall=0.9))
    # 10 singles ranked first except one multi at rank 3, and a single last: recall exactly 0.9 counts as
    # reaching 0.9 (9 of 10 singles among the first 10 patterns: precision 0.9)
    positive = np.array([True, True, False, *[True] * 7, False, True])
    scores = np.linspace(1.0, 0.0, len(positive))
    assert best_at(scores, positive, min_recall=0.9) == pytest.approx(0.9)
    assert best_at(scores, positive, min_precision=0.9) == pytest.approx(0.9)  # precision 0.9 at recall 0.9


def test_cnn_table_metrics_by_hand() -> None:
    count_true = np.array([0, 1, 2, 3, 1])
    count_pred = np.array([0, 1, 2, 1, 1])
    struct_true = np.array([-1, 0, 1, 2, 0])
    struct_pred = np.array([2, 0, 0, 2, 0])  # a blank's structure is ignored
    m = cnn_metrics(struct_pred, struct_true, count_pred, count_true)
    assert m["count_accuracy"] == pytest.approx(4 / 5)
    assert m["particle_accuracy"] == pytest.approx(3 / 4)
    assert m["test_accuracy"] == pytest.approx(3 / 5)  # blank, and the two singles


def test_accuracy_by_photons_bins() -> None:
    photons = np.array([10, 11, 1000, 1100, 0])
    correct = np.array([1, 0, 1, 1, 1], bool)
    centres, acc, counts = accuracy_by_photons(photons, correct, bins=2)
    assert counts.tolist() == [2, 2] and acc.tolist() == [0.5, 1.0]
    assert centres[0] < 100 < centres[1]


def test_markdown_and_projection() -> None:
    table = markdown_table([{"a": 0.123456, "b": "x"}], ["a", "b"])
    assert table.splitlines()[2] == "| 0.1235 | x |"
    rng = np.random.default_rng(0)
    e = rng.normal(size=(500, 8)) * np.array([10, 5, 1, 1, 1, 1, 1, 1])
    e = e @ np.linalg.qr(rng.normal(size=(8, 8)))[0]  # turned: the spread lies along no axis of the embedding
    xy = projection_2d(e)
    # the principal components: variances about 100 and 25 (what the first two columns would not give)
    assert xy.shape == (500, 2) and 80 < xy[:, 0].var() < 120 and 18 < xy[:, 1].var() < 32
    assert projection_2d(e[:1]).shape == (1, 2)  # one pattern has one component: still two columns to plot


def _report(
    out: Path, metrics: dict[str, Any], dec: Decisions, examples: np.ndarray, emb: np.ndarray | None = None
) -> None:
    """write_report of the 8 patterns of N, their photons a geometric series, the first examples shown."""
    embeddings = np.zeros((8, 4)) if emb is None else emb
    judged = {"model": "m.onnx (abc)", "data": "t.h5"}
    write_report(out, metrics, N, dec, np.geomspace(100, 1e4, 8), embeddings, examples, np.arange(4), judged)


def test_report_files(tmp_path: Path) -> None:
    dec = decisions()
    m = hit_metrics(N, dec)
    images = np.random.default_rng(0).poisson(1.0, (8, 16, 16)).astype(np.float32)
    emb = np.random.default_rng(1).normal(size=(8, 4))
    _report(tmp_path, m, dec, images[:4], emb=emb)
    for name in ("confusion", "precision_recall", "accuracy_vs_photons", "embedding", "examples"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy"] == pytest.approx(5 / 8)
    md = (tmp_path / "metrics.md").read_text()
    assert "| accuracy | 0.625 | blank / single / multi label right, at the bank's threshold" in md
    assert "| single | 1 | 2 | 1 |" in md
    assert md.startswith("# Evaluation\n\n- model: m.onnx (abc)\n- data: t.h5\n")  # what was judged
    from lcls_hitfinder.evaluate import MEANINGS

    assert set(m) - {"confusion"} <= set(MEANINGS)  # every number explained
    assert "pair's axis" not in md and not (tmp_path / "pairs_by_axis.png").exists()


def test_a_reused_report_directory_keeps_nothing_of_the_earlier_report(tmp_path: Path) -> None:
    """An evaluation with a pair plot, then one without (another test set) in the same directory: the old plot
    goes, the user's own file stays."""
    dec = decisions()
    m = hit_metrics(N, dec)
    positions = np.zeros((8, 4, 3))
    positions[4] = _pair(10)
    with_pairs = {**m, "pairs_called_single_by_axis": pairs_called_single_by_axis(N, positions, dec.label)}
    images = np.zeros((4, 16, 16), np.float32)
    (tmp_path / "notes.txt").write_text("mine")
    _report(tmp_path, with_pairs, dec, images)
    assert (tmp_path / "pairs_by_axis.png").exists()
    _report(tmp_path, m, dec, images)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*REPORT_FILES, "notes.txt"} - {"pairs_by_axis.png"})
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _pair(axis_deg: float, d: float = 20.0) -> np.ndarray:
    """Positions (4, 3) of a pair whose axis makes `axis_deg` with the beam (z), centred on the origin."""
    a = np.radians(axis_deg)
    half = 0.5 * d * np.array([np.sin(a), 0.0, np.cos(a)])
    return np.array([-half, half, np.zeros(3), np.zeros(3)])


def test_pairs_called_single_are_binned_by_the_angle_of_their_axis_to_the_beam() -> None:
    angles = [5.0, 10.0, 170.0, 20.0, 50.0, 90.0, 89.0, 0.0]  # 170 deg is 10 deg from the beam, the other way
    n = np.array([2] * len(angles) + [1, 3])
    positions = np.stack([_pair(a) for a in angles] + [np.zeros((4, 3)), _pair(80)])
    labels = np.array([1, 1, 2, 1, 2, 1, 2, 2, 1, 1])
    rows = pairs_called_single_by_axis(n, positions, labels)
    assert [r["axis_to_beam_deg"] for r in rows] == ["0-15", "15-30", "30-45", "45-60", "60-75", "75-90"]
    assert [r["pairs"] for r in rows] == [4, 1, 0, 1, 0, 2]  # the single and the 3-hit are not pairs
    assert [r["called_single"] for r in rows] == [2, 1, 0, 0, 0, 1]
    assert rows[0]["fraction"] == 0.5 and rows[2]["fraction"] is None
    assert pairs_called_single_by_axis(n, np.zeros((len(n), 4, 3)), labels) == []  # no positions recorded


def test_report_shows_pairs_by_axis_when_present(tmp_path: Path) -> None:
    dec = decisions()
    m = hit_metrics(N, dec)
    positions = np.zeros((8, 4, 3))
    positions[4] = _pair(10)
    m["pairs_called_single_by_axis"] = pairs_called_single_by_axis(N, positions, dec.label)
    images = np.zeros((4, 16, 16), np.float32)
    _report(tmp_path, m, dec, images)
    assert (tmp_path / "pairs_by_axis.png").stat().st_size > 1000
    assert "| 0-15 | 1 | 0 | 0 |" in (tmp_path / "metrics.md").read_text()


def test_per_sample_banks_judge_each_structure_by_its_own_references() -> None:
    """Structure b's singles sit where structure a's multi-hits do: one pooled bank must confuse them,
    a bank per sample (the deployment case) must not."""

    rng = np.random.default_rng(0)
    centres = {("a", 1): (0.0, 0.0), ("a", 2): (2.0, 0.0), ("b", 1): (2.0, 0.0), ("b", 2): (4.0, 0.0), ("", 0): (0, 5)}

    def draw(per: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = list(centres)
        emb = np.concatenate([rng.normal(centres[key], 0.1, (per, 2)) for key in keys]).astype(np.float32)
        n = np.repeat([key[1] for key in keys], per)
        structure = np.repeat(np.array([key[0] for key in keys], dtype=object), per)
        return emb, n, structure

    ref_emb, ref_n, ref_s = draw(10)
    emb, n, s = draw(20)
    dec = per_sample_decisions(ref_emb, ref_n, ref_s, emb, s, "m", per_class=5, k=3)
    truth = np.where(n == 0, Label.BLANK, np.where(n == 1, Label.SINGLE, Label.MULTI))
    np.testing.assert_array_equal(dec.label, truth)
    pooled = ReferenceBank(ref_emb, ref_n, "m", k=3).decide(emb)
    assert (pooled.label != truth).sum() >= 10  # b's singles and a's multi-hits share a place


def test_per_sample_banks_need_references_of_every_structure() -> None:

    emb = np.zeros((2, 2), np.float32)
    with pytest.raises(UserError, match=r"no patterns of ../c.pdb; it holds c.pdb \(structures are matched by"):
        per_sample_decisions(
            emb, np.array([1, 0]), np.array(["c.pdb", ""], object), emb, np.array(["../c.pdb", ""], object), "m", 5
        )
    with pytest.raises(UserError, match="no single hit of c: each sample's bank needs one"):
        per_sample_decisions(
            emb, np.array([2, 0]), np.array(["c", ""], object), emb, np.array(["c", ""], object), "m", 5
        )


def test_the_per_sample_protocol_says_when_a_sample_held_fewer_references() -> None:
    ref_n = np.array([0, 0, 0, 1, 1, 1, 2, 2, 1])
    ref_s = np.array(["", "", "", "a", "a", "a", "a", "a", "other"])  # "other" is not under test
    said = "per-sample banks: {} references per count and structure, threshold 0"
    assert per_sample_protocol(ref_n, ref_s, np.array(["a", ""]), 2) == said.format("2")
    assert per_sample_protocol(ref_n, ref_s, np.array(["a", ""]), 3) == said.format("up to 3 (as few as 2)")
