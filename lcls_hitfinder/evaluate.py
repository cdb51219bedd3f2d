"""Metrics, tables and plots of a classifier on a labelled dataset, defined once.

Training's per-epoch validation, `lcls-hitfinder evaluate`, the sweeps and the model card all use
these definitions:
  accuracy                 blank / single / multi label correct
  single_vs_multi_accuracy among true hits (1-4 particles): single-or-not decided correctly (a
                           multi-hit labelled blank counts as right: it is not kept)
  precision, recall        of single-hit selection (keep) at the bank's threshold (calibrated with
                           --bank; 0 with --refs)
  precision_at_recall_0.9  best single-hit precision with recall >= 0.9 (over all thresholds)
  recall_at_precision_0.99 best recall with precision >= 0.99
  count_accuracy           particle count (0-4) estimated correctly
  pairs_called_single_by_axis  2-particle hits labelled single, by the angle between the pair's axis
                           and the beam (simulated files record the particles' positions)
and, for the multi-output CNN baselines (the design study's table): count_accuracy,
particle_accuracy (structure right, over hits) and test_accuracy (both right).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lcls_hitfinder import strict_json
from lcls_hitfinder.bank import DEFAULT_K, ReferenceBank, precision_recall, select_references
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import Label, labels_of_counts
from lcls_hitfinder.plots import pattern_grid
from lcls_hitfinder.protocols import Decisions

LABELS = [Label.BLANK, Label.SINGLE, Label.MULTI]


def best_at(
    scores: np.ndarray, positive: np.ndarray, min_recall: float | None = None, min_precision: float | None = None
) -> float:
    """Highest precision at recall >= min_recall, or highest recall at precision >= min_precision (0 if none)."""
    if not np.any(positive):
        return float("nan")
    _, precision, recall = precision_recall(scores, positive)
    if min_recall is not None:
        ok = recall >= min_recall
        return float(precision[ok].max()) if ok.any() else 0.0
    ok = precision >= (min_precision or 0.0)
    return float(recall[ok].max()) if ok.any() else 0.0


def hit_metrics(n_particles: np.ndarray, decisions: Decisions) -> dict[str, Any]:
    """The twin classifier's metrics (see the module docstring) for true counts and the bank's decisions."""
    truth = labels_of_counts(n_particles)
    pred = np.asarray(decisions.label, np.int64)
    single = truth == Label.SINGLE
    hits = truth != Label.BLANK
    keep = np.asarray(decisions.keep, bool)
    tp = int((keep & single).sum())
    confusion = np.array([[int(((truth == t) & (pred == p)).sum()) for p in LABELS] for t in LABELS])
    return {
        "n": len(truth),
        "n_blank": int((truth == Label.BLANK).sum()),
        "n_single": int(single.sum()),
        "n_multi": int((truth == Label.MULTI).sum()),
        "accuracy": float((pred == truth).mean()) if len(truth) else float("nan"),
        "single_vs_multi_accuracy": float(((pred[hits] == Label.SINGLE) == single[hits]).mean())
        if hits.any()
        else float("nan"),
        "precision": tp / int(keep.sum()) if keep.any() else float("nan"),  # undefined, not 0: nothing kept
        "recall": tp / int(single.sum()) if single.any() else float("nan"),
        "precision_at_recall_0.9": best_at(decisions.score, single, min_recall=0.9),
        "recall_at_precision_0.99": best_at(decisions.score, single, min_precision=0.99),
        "count_accuracy": float((np.asarray(decisions.n_particles) == np.asarray(n_particles)).mean()),
        "confusion": confusion.tolist(),
    }


def per_sample_decisions(
    ref_embeddings: np.ndarray,
    ref_n_particles: np.ndarray,
    ref_structure: np.ndarray,
    embeddings: np.ndarray,
    structure: np.ndarray,
    model_hash: str,
    per_class: int,
    k: int = DEFAULT_K,
) -> Decisions:
    """Decisions as in deployment, where one sample is measured at a time: the patterns of each structure
    are judged by a bank of that structure's own references (`per_class` per particle count, plus as many
    blanks) at the plain nearer-class threshold 0. Blanks carry no structure and are shared out among the
    samples in turn."""
    ref_structure = np.asarray(ref_structure, dtype=object)
    structure = np.asarray(structure, dtype=object)
    species = sorted({str(s) for s in structure if s})
    held = sorted({str(s) for s in ref_structure if s})
    missing = sorted(set(species) - set(held))
    if missing:  # structures are told by the name `simulate` was given: another path to one PDB file is another
        raise UserError(
            f"the reference file has no patterns of {', '.join(missing[:3])}; it holds {', '.join(held[:5]) or 'none'}"
            f"{' ...' if len(held) > 5 else ''} (structures are matched by the name given to simulate)"
        )
    singles = {str(s) for s, c in zip(ref_structure, ref_n_particles, strict=True) if c == 1}
    no_single = [s for s in species if s not in singles]
    if no_single:  # each sample's bank needs one; say which sample rather than "a bank needs ..."
        raise UserError(
            f"the reference file has no single hit of {', '.join(no_single[:3])}: each sample's bank needs one "
            "(simulate or pick more references of it)"
        )
    blank_refs = np.nonzero(ref_structure == "")[0]
    blank_refs = blank_refs[select_references(ref_n_particles[blank_refs], None, per_class)]
    blanks = np.nonzero(structure == "")[0]
    n = len(embeddings)
    out = Decisions(
        label=np.zeros(n, np.int8),
        keep=np.zeros(n, bool),
        score=np.zeros(n, np.float32),
        distance=np.zeros(n, np.float32),
        n_particles=np.zeros(n, np.int64),
    )
    for j, name in enumerate(species):
        own = np.nonzero(ref_structure == name)[0]
        refs = np.r_[own[select_references(ref_n_particles[own], None, per_class)], blank_refs]
        bank = ReferenceBank(ref_embeddings[refs], ref_n_particles[refs], model_hash, k=k)
        idx = np.r_[np.nonzero(structure == name)[0], blanks[j :: len(species)]]
        d = bank.decide(embeddings[idx])
        for field in ("label", "keep", "score", "distance", "n_particles"):
            getattr(out, field)[idx] = getattr(d, field)
    return out


def per_sample_protocol(
    ref_n_particles: np.ndarray, ref_structure: np.ndarray, structure: np.ndarray, per_class: int
) -> str:
    """How `per_sample_decisions` judged `structure`'s patterns, for the metrics: `per_class` references per
    count and structure, or as few as the reference file held of one (3 four-particle hits are not 10)."""
    ref_structure = np.asarray(ref_structure, dtype=str)
    used = np.isin(ref_structure, [*{str(s) for s in structure}, ""])  # the samples under test, and blanks
    keys = np.char.add(np.asarray(ref_n_particles)[used].astype(str), ref_structure[used])
    fewest = min(per_class, int(np.unique(keys, return_counts=True)[1].min())) if len(keys) else 0
    drawn = f"{per_class}" if fewest == per_class else f"up to {per_class} (as few as {fewest})"
    return f"per-sample banks: {drawn} references per count and structure, threshold 0"


def cnn_metrics(
    structure_pred: np.ndarray, structure_true: np.ndarray, count_pred: np.ndarray, count_true: np.ndarray
) -> dict[str, float]:
    """The design study's table: test accuracy (both right), count accuracy, particle (structure) accuracy.

    Structure is judged on hits only (a blank has none); a blank is right when its count is.
    """
    count_ok = np.asarray(count_pred) == np.asarray(count_true)
    hits = np.asarray(count_true) > 0
    struct_ok = np.asarray(structure_pred) == np.asarray(structure_true)
    return {
        "test_accuracy": float((count_ok & (struct_ok | ~hits)).mean()),
        "count_accuracy": float(count_ok.mean()),
        "particle_accuracy": float(struct_ok[hits].mean()) if hits.any() else float("nan"),
    }


def accuracy_by_photons(
    photons: np.ndarray, correct: np.ndarray, bins: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy in log-spaced bins of photons per pattern: (bin centres, accuracy, counts). Patterns without
    photons (the blanks: a dataset records the particles' noise-free photons) are left out."""
    p = np.asarray(photons, np.float64)
    ok = p > 0
    if not ok.any():
        return np.zeros(0), np.zeros(0), np.zeros(0, np.int64)
    edges = np.geomspace(p[ok].min(), p[ok].max() * 1.0001, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    counts = np.bincount(idx[ok], minlength=bins)
    hits = np.bincount(idx[ok], weights=np.asarray(correct, np.float64)[ok], minlength=bins)
    centres = np.sqrt(edges[:-1] * edges[1:])
    keep = counts > 0
    return centres[keep], hits[keep] / counts[keep], counts[keep]


PAIR_AXIS_EDGES_DEG = (0, 15, 30, 45, 60, 75, 90)


def pairs_called_single_by_axis(
    n_particles: np.ndarray, positions: np.ndarray, labels: np.ndarray
) -> list[dict[str, Any]]:
    """2-particle hits labelled single, in bins of the angle (degrees) between the pair's axis and the beam.

    A pair lined up with the beam (z) projects to a short separation on the detector and gives few fringes:
    this shows whether a model's pairs-called-single are those. Random orientations put a share
    cos(lo) - cos(hi) of the pairs in each bin. Empty without pairs or recorded positions.
    """
    pairs = np.asarray(n_particles) == 2
    pair_positions = np.asarray(positions, np.float64)[pairs]
    sep = pair_positions[:, 1] - pair_positions[:, 0]
    length = np.linalg.norm(sep, axis=1)
    ok = length > 0
    if not ok.any():
        return []
    angle = np.degrees(np.arccos(np.clip(np.abs(sep[ok, 2]) / length[ok], 0.0, 1.0)))
    called = np.asarray(labels)[pairs][ok] == Label.SINGLE
    edges = np.asarray(PAIR_AXIS_EDGES_DEG, np.float64)
    idx = np.clip(np.digitize(angle, edges) - 1, 0, len(edges) - 2)
    rows = []
    for b, (lo, hi) in enumerate(itertools.pairwise(PAIR_AXIS_EDGES_DEG)):
        m = idx == b
        rows.append(
            {
                "axis_to_beam_deg": f"{lo}-{hi}",
                "pairs": int(m.sum()),
                "called_single": int(called[m].sum()),
                "fraction": float(called[m].mean()) if m.any() else None,  # null in JSON, not NaN
            }
        )
    return rows


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A markdown table; floats to 4 significant digits."""

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def projection_2d(embeddings: np.ndarray) -> np.ndarray:
    """First two principal components (an embedding of dimension 2 is returned as is); always (N, 2), also for
    a single pattern, which has fewer components."""
    e = np.asarray(embeddings, np.float64)
    if e.shape[1] <= 2:
        return e
    centred = e - e.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    return np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))


# what each number of a report means: metrics.md says it beside the table (`hit_metrics` and `evaluate` make them)
MEANINGS = {
    "n": "patterns judged",
    "n_blank": "true blanks among them",
    "n_single": "true single hits",
    "n_multi": "true multi-hits (2-4 particles)",
    "accuracy": "blank / single / multi label right, at the bank's threshold (the per-sample protocol: "
    "threshold 0, the nearer class; MODEL_CARD.md's figures are those)",
    "single_vs_multi_accuracy": "among true hits, single-or-not decided right (a multi-hit labelled blank: right)",
    "precision": "single-hit precision of the kept patterns (kept: label single, score >= threshold)",
    "recall": "single-hit recall: true singles kept",
    "precision_at_recall_0.9": "best single-hit precision over all thresholds whose recall is >= 0.9",
    "recall_at_precision_0.99": "best single-hit recall over all thresholds whose precision is >= 0.99",
    "count_accuracy": "particle count (0-4) estimated exactly",
    "threshold": "the bank's calibrated threshold, at which accuracy, precision and recall are taken",
    "accuracy_at_threshold_0": "the same at threshold 0, the nearer-class decision (MODEL_CARD.md's figures)",
    "photons_per_single_hit": "median photons of the single hits",
    "patterns_the_bank_was_built_from": "patterns judged that the bank was built from: they judge themselves",
    "protocol": "how each pattern was judged (evaluate --refs: a bank of its own sample's references)",
    "references_taken_otherwise": "how the references and these patterns were taken differently (frame shape, "
    "geometry): the decisions are not those the bank was calibrated for",
}


REPORT_FILES = (  # all that an evaluation may write into its report directory
    "metrics.json",
    "metrics.md",
    "confusion.png",
    "precision_recall.png",
    "accuracy_vs_photons.png",
    "pairs_by_axis.png",
    "embedding.png",
    "examples.png",
)


def _meaning(metric: str) -> str:
    """MEANINGS' line for a metric; the `_at_threshold_0` twins of the thresholded ones say so."""
    if metric in MEANINGS:
        return MEANINGS[metric]
    base = metric.removesuffix("_at_threshold_0")
    return f"{base} at threshold 0, the nearer-class decision" if base in MEANINGS else ""


def clear_stale(out: Path, written: Iterable[str]) -> None:
    """Remove what an earlier evaluation left in a reused report directory and this one did not write again (a
    CNN's metrics beside a twin's plots, another test set's pair plot would read as one report); files that
    are not a report's are the user's and stay."""
    for name in set(REPORT_FILES) - set(written):
        (out / name).unlink(missing_ok=True)


def write_report(
    out: Path,
    metrics: dict[str, Any],
    n_particles: np.ndarray,
    decisions: Decisions,
    photons: np.ndarray,
    embeddings: np.ndarray,
    examples: np.ndarray,
    example_index: np.ndarray,
    judged: dict[str, str],
) -> None:
    """metrics.json, metrics.md (headed by what was `judged`: model, bank or references, data; each number with
    its meaning) and the plots: confusion matrix, precision-recall, accuracy vs photons, 2-hits labelled single
    by pair axis (when the metrics have it), a 2-D projection of the embeddings and a grid of examples titled
    "prediction / truth"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(strict_json.dumps(metrics, indent=2) + "\n")
    columns = [k for k, v in metrics.items() if isinstance(v, int | float | str)]
    names = [lab.text for lab in LABELS]
    conf = np.asarray(metrics["confusion"])
    conf_md = markdown_table(
        [
            {"truth \\ prediction": names[i], **dict(zip(names, map(int, row), strict=True))}
            for i, row in enumerate(conf)
        ],
        ["truth \\ prediction", *names],
    )
    pair_rows = metrics.get("pairs_called_single_by_axis", [])
    pair_md = (
        "\n## 2-particle hits labelled single, by the angle of the pair's axis to the beam\n\n"
        + markdown_table(pair_rows, list(pair_rows[0]))
        if pair_rows
        else ""
    )
    rows = [{"metric": c, "value": metrics[c], "meaning": _meaning(c)} for c in columns]
    (out / "metrics.md").write_text(
        "# Evaluation\n\n"
        + "".join(f"- {what}: {value}\n" for what, value in judged.items())
        + "\n"
        + markdown_table(rows, ["metric", "value", "meaning"])
        + "\n## Confusion matrix\n\n"
        + conf_md
        + pair_md
    )
    truth = labels_of_counts(n_particles)
    correct = np.asarray(decisions.label) == truth

    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(conf / np.maximum(conf.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(conf):
        ax.text(j, i, str(v), ha="center", va="center")
    ax.set(xticks=range(3), yticks=range(3), xticklabels=names, yticklabels=names, xlabel="prediction", ylabel="truth")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 3.6))
    if np.any(truth == Label.SINGLE):
        _, precision, recall = precision_recall(decisions.score, truth == Label.SINGLE)
        ax.plot(recall, precision)
        where = f"threshold {metrics['threshold']:.3g}" if "threshold" in metrics else "threshold 0"
        ax.plot([metrics["recall"]], [metrics["precision"]], "o", label=where)
        ax.legend(loc="lower left")
    ax.set(xlabel="single-hit recall", ylabel="single-hit precision", xlim=(0, 1.01), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "precision_recall.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    centres, acc, counts = accuracy_by_photons(photons, correct)
    ax.semilogx(centres, acc, "o-")
    for x, y, c in zip(centres, acc, counts, strict=True):  # how much each point rests on
        ax.annotate(str(c), (x, y), textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    ax.set(
        xlabel="noise-free photons per pattern (all its particles)",
        ylabel="label accuracy of hits (blank/single/multi)",
        ylim=(0, 1.01),
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_photons.png", dpi=120)
    plt.close(fig)

    if pair_rows:
        fig, ax = plt.subplots(figsize=(4.5, 3.6))
        mids = [float(np.mean(edge)) for edge in itertools.pairwise(PAIR_AXIS_EDGES_DEG)]
        ax.bar(mids, [r["fraction"] or 0.0 for r in pair_rows], width=12)
        for x, r in zip(mids, pair_rows, strict=True):
            ax.text(x, 1.02, str(r["pairs"]), ha="center", fontsize=7)
        ax.set(xlabel="angle of the pair's axis to the beam (deg)", ylabel="2-hits labelled single", ylim=(0, 1.1))
        ax.set_title("number above a bar: pairs in the bin", fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        fig.tight_layout()
        fig.savefig(out / "pairs_by_axis.png", dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 4))
    xy = projection_2d(embeddings)
    for n in np.unique(n_particles):
        sel = np.asarray(n_particles) == n
        ax.scatter(xy[sel, 0], xy[sel, 1], s=4, alpha=0.6, label=f"{n} particles")
    ax.legend(markerscale=3, fontsize=8)
    ax.set(title="embeddings (first two principal components)" if embeddings.shape[1] > 2 else "embeddings")
    fig.tight_layout()
    fig.savefig(out / "embedding.png", dpi=120)
    plt.close(fig)

    titles = [
        f"{Label(int(decisions.label[i])).text} / {Label(int(truth[i])).text} ({int(n_particles[i])})"
        for i in example_index
    ]
    pattern_grid(list(examples), titles, out / "examples.png", suptitle="prediction / truth (particles)")
    clear_stale(out, [name for name in REPORT_FILES if name != "pairs_by_axis.png" or pair_rows])
