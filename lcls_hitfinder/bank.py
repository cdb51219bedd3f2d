"""The reference bank: embeddings of known patterns and the decision they make, defined once.

Training (threshold calibration, evaluation) and serving use this same class. Distances are the
twin network's training distance d(a, b) = sqrt(mean_i (a_i - b_i)^2).

Decision for an embedding e:
  d_c    = mean distance from e to its k nearest references of class c (blank, single, multi),
           or to the class prototype (mean embedding) with method "prototype";
  score  = (d_not_single - d_single) / (d_not_single + d_single), in [-1, 1], higher = more single-like;
  keep   = score >= threshold (calibrated on held-out data for a target single-hit precision);
  label  = single when kept, otherwise the nearer of blank and multi.

File (HDF5): /embeddings float32 (K, D), /n_particles int8 (K,), /structure str (K,);
attrs model_hash, method, k, threshold, format_version, picked_with (JSON: the [serve.calibration] that
`bank pick` read its references with; absent for simulated references) and taken (JSON: how the references
were taken, `dataset.taken`: frame shape and, where recorded, geometry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import h5py
import numpy as np

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import Label, labels_of_counts
from lcls_hitfinder.paths import replaced
from lcls_hitfinder.protocols import Decisions

BANK_FORMAT_VERSION = 1
Method = Literal["knn", "prototype"]
METHODS: tuple[Method, ...] = get_args(Method)
DEFAULT_K = 5  # nearest references averaged per class (knn)
DEFAULT_PER_CLASS = 10  # references per particle count drawn for a bank, or for each sample's


class BankMismatch(UserError):
    """The bank was built with a different model than the one it is asked to serve."""


def pairwise_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """d(a_i, b_j) = sqrt(mean((a_i - b_j)^2)) for all pairs: (Na, D), (Nb, D) -> (Na, Nb)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0) / a.shape[1]).astype(np.float32)


def _scores(class_distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 3) class distances -> single-hit score in [-1, 1] and the distance to the single class."""
    d_single = class_distances[:, Label.SINGLE]
    d_other = np.minimum(class_distances[:, Label.BLANK], class_distances[:, Label.MULTI])
    with np.errstate(invalid="ignore", divide="ignore"):
        score = np.where(np.isinf(d_other), 1.0, (d_other - d_single) / (d_other + d_single))
    return np.nan_to_num(score, nan=0.0).astype(np.float32), d_single


@dataclass
class ReferenceBank:
    embeddings: np.ndarray
    n_particles: np.ndarray
    model_hash: str
    method: Method = "knn"
    k: int = DEFAULT_K
    threshold: float = 0.0
    structure: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    # the [serve.calibration] (gain, offset, threshold) its references were picked with; None: simulated ones
    picked_with: dict[str, float] | None = None
    # (K, 16) digests of the patterns it was built from, references and calibration set (dataset.pattern_digests):
    # `evaluate` says when the data under test are among them
    seen: np.ndarray = field(default_factory=lambda: np.zeros((0, 16), np.uint8))
    # how its references were taken (dataset.taken: frame shape, geometry); None for banks before 2026-12-08
    taken: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.embeddings = np.asarray(self.embeddings, np.float32)
        self.n_particles = np.asarray(self.n_particles, np.int64)
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.n_particles):
            raise ValueError("embeddings must be (K, D) with one n_particles per row")
        if not np.isfinite(self.embeddings).all():  # a NaN reference is nearest to nothing: every call multi
            raise ValueError("embeddings must be finite")
        if self.method not in METHODS or self.k < 1 or not np.isfinite(self.threshold):
            raise ValueError(f"method {self.method!r}, k {self.k}, threshold {self.threshold}: not a bank's")
        picked = self.picked_with
        if picked is not None and not (
            isinstance(picked, dict)
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in picked.values())
        ):
            raise ValueError(f"picked_with {picked!r} is not a calibration (gain, offset, threshold)")
        self._class = labels_of_counts(self.n_particles)
        if not (self._class == Label.SINGLE).any():
            raise UserError("a bank needs at least one single-hit reference")
        if (self._class == Label.SINGLE).all():  # a score is a distance to the others: nothing to weigh it against
            raise UserError("a bank needs blank or multi-hit references beside its singles")
        # each class's rows of `embeddings`, or its prototype (mean embedding)
        self._members: dict[int, np.ndarray] = {}
        self._prototypes: dict[int, np.ndarray] = {}
        for c in (Label.BLANK, Label.SINGLE, Label.MULTI):
            rows = np.flatnonzero(self._class == c)
            if len(rows):
                self._members[int(c)] = rows
                self._prototypes[int(c)] = self.embeddings[rows].mean(0, keepdims=True)

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def said(self) -> str:
        """What an operator needs to know of the bank in use, in one line."""
        counts = ", ".join(
            f"{int((self._class == c).sum())} {c.text}" for c in (Label.BLANK, Label.SINGLE, Label.MULTI)
        )
        how = f"{self.method} (k {self.k})" if self.method == "knn" else self.method
        n = len(self.embeddings)
        return f"{n} references ({counts}), {how}, threshold {self.threshold:g}, model {self.model_hash}"

    def class_distances(self, embeddings: np.ndarray) -> np.ndarray:
        """(B, 3) mean distance to the k nearest references of blank, single, multi (inf if none)."""
        return self._class_distances(embeddings, pairwise_distance(embeddings, self.embeddings))

    def _class_distances(self, embeddings: np.ndarray, to_all: np.ndarray) -> np.ndarray:
        """`class_distances`, given the (B, K) distances to every reference."""
        out = np.full((len(to_all), 3), np.inf, np.float32)
        for c, rows in self._members.items():
            d = pairwise_distance(embeddings, self._prototypes[c]) if self.method == "prototype" else to_all[:, rows]
            k = min(self.k, d.shape[1])
            out[:, c] = np.partition(d, k - 1, axis=1)[:, :k].mean(1) if k < d.shape[1] else d.mean(1)
        return out

    def scores(self, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Single-hit score in [-1, 1] and the distance to the single class, per embedding."""
        return _scores(self.class_distances(embeddings))

    def _n_particles(self, to_all: np.ndarray) -> np.ndarray:
        """Majority particle count among the k nearest references (of all classes); ties go to the smaller."""
        k = min(self.k, to_all.shape[1])
        counts = self.n_particles[np.argpartition(to_all, k - 1, axis=1)[:, :k]]  # (B, k)
        votes = (counts[:, :, None] == np.arange(max(5, int(self.n_particles.max()) + 1))).sum(1)
        return votes.argmax(1).astype(np.int64)

    def decide(self, embeddings: np.ndarray) -> Decisions:
        """Labels, keep, scores, distances and particle counts, from one distance to every reference. An
        embedding that is not finite (a frame whose values overflow float32 on their way to the thumbnail) is
        nearest to nothing: labelled error, not kept, rather than scored as a tie."""
        with np.errstate(invalid="ignore"):  # Inf - Inf in a non-finite embedding's distances: NaN, and an error
            to_all = pairwise_distance(embeddings, self.embeddings)
            d = self._class_distances(embeddings, to_all)
        score, d_single = _scores(d)
        keep = score >= self.threshold
        other = np.where(d[:, Label.BLANK] <= d[:, Label.MULTI], Label.BLANK, Label.MULTI)
        label = np.where(keep, Label.SINGLE, other).astype(np.int8)
        n_particles = self._n_particles(to_all)
        bad = ~np.isfinite(embeddings).all(1)
        label[bad], keep[bad], score[bad], n_particles[bad] = Label.ERROR, False, np.nan, -1
        return Decisions(label=label, keep=keep, score=score, distance=d_single, n_particles=n_particles)

    def save(self, path: Path | str) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with replaced(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("embeddings", data=self.embeddings)
            f.create_dataset("n_particles", data=self.n_particles.astype(np.int8))
            structure = self.structure if len(self.structure) == len(self.embeddings) else [""] * len(self.embeddings)
            f.create_dataset("structure", data=np.asarray(structure, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("seen", data=np.asarray(self.seen, np.uint8).reshape(-1, 16))
            f.attrs.update(
                format_version=BANK_FORMAT_VERSION,
                model_hash=self.model_hash,
                method=self.method,
                k=self.k,
                threshold=self.threshold,
            )
            if self.picked_with is not None:
                f.attrs["picked_with"] = json.dumps(self.picked_with)
            if self.taken is not None:
                f.attrs["taken"] = json.dumps(self.taken)

    @classmethod
    def load(
        cls, path: Path | str, expected_model_hash: str | None = None, expected_embed_dim: int | None = None
    ) -> ReferenceBank:
        """Read a bank; refuse it (BankMismatch) if it was built for another model or holds embeddings of
        another width, and (UserError) if it does not read as a bank: a bad file never reaches a decision."""
        if Path(path).is_dir():
            raise UserError(f"cannot read bank {path}: it is a directory; give a bank file")
        try:
            with h5py.File(path, "r") as f:
                if "embeddings" not in f and "images" in f:
                    raise UserError(
                        f"{path} is a dataset of patterns, not a bank: build one from it with `lcls-hitfinder bank "
                        f"build --model MODEL.onnx --data {path} --out BANK.h5`"
                    )
                a = dict(f.attrs)
                if int(a.get("format_version", BANK_FORMAT_VERSION)) > BANK_FORMAT_VERSION:
                    raise UserError(
                        f"{path} is a bank of format {a['format_version']}, written by a newer lcls-hitfinder (this "
                        f"one reads format {BANK_FORMAT_VERSION}): update it, or build the bank again with this one"
                    )
                bank = cls(
                    embeddings=f["embeddings"][()],
                    n_particles=f["n_particles"][()],
                    structure=np.asarray(f["structure"].asstr()[()], dtype=object),
                    model_hash=str(a["model_hash"]),
                    method=_method(str(a["method"])),
                    k=int(a["k"]),
                    threshold=float(a["threshold"]),
                    picked_with=json.loads(a["picked_with"]) if "picked_with" in a else None,
                    seen=f["seen"][()] if "seen" in f else np.zeros((0, 16), np.uint8),  # banks before 2026-12-07
                    taken=json.loads(a["taken"]) if "taken" in a else None,
                )
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as err:  # AttributeError: a group
            raise UserError(f"cannot read bank {path}: {' '.join(str(err).split())}") from None  # one line
        except UserError as err:  # read, but not a bank that can decide (or a dataset)
            raise UserError(err if str(err).startswith(str(path)) else f"bank {path}: {err}") from None
        if expected_model_hash is not None and bank.model_hash != expected_model_hash:
            raise BankMismatch(
                f"bank {path} was built for model {bank.model_hash}, not for the loaded model {expected_model_hash}: "
                "use the model it was built for, or build a bank with this one (lcls-hitfinder bank build --model ...)"
            )
        if expected_embed_dim is not None and bank.embed_dim != expected_embed_dim:
            raise BankMismatch(
                f"bank {path} holds {bank.embed_dim}-d embeddings, the loaded model makes {expected_embed_dim}-d"
            )
        return bank


def _method(name: str) -> Method:
    """A bank file's method, as the Literal (refused by ValueError if it is none)."""
    for method in METHODS:
        if name == method:
            return method
    raise ValueError(f"method {name!r} is not one of {', '.join(METHODS)}")


def precision_recall(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of `score >= t` for every distinct score t (descending): the PR curve.

    Returns (thresholds, precision, recall), one entry per distinct score, thresholds decreasing.
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(positive, bool)
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(p)[last]
    kept = last + 1
    return s[last], tp / kept, tp / max(int(positive.sum()), 1)


def at_single_fraction(precision: np.ndarray | float, is_single: np.ndarray, single_fraction: float | None) -> Any:
    """Precision as it would be among patterns of which `single_fraction` are singles, from one measured where
    `is_single` has its own share: precision depends on how common singles are (picked references come in the
    shares someone picked, not the run's). The singles kept and the others kept are each scaled by how much
    more common their kind is there: p' = r p / (r p + 1 - p), r the ratio of the two odds."""
    if single_fraction is None:
        return precision
    share = float(np.mean(is_single))
    if not 0 < share < 1:
        raise UserError(
            "--single-fraction: precision at another share of singles needs singles and other patterns to calibrate on"
        )
    r = (single_fraction / (1 - single_fraction)) / (share / (1 - share))
    p = np.asarray(precision, np.float64)
    return r * p / (r * p + 1 - p)


def calibrate_threshold(
    scores: np.ndarray, is_single: np.ndarray, target_precision: float, single_fraction: float | None = None
) -> tuple[float, bool]:
    """The lowest score threshold whose kept set reaches `target_precision` single hits: most recall at that precision.
    `single_fraction`: the precision is that among patterns of which this share are singles (`at_single_fraction`).

    Returns (threshold, reached). Where no threshold reaches the target, the one of highest precision
    (and reached=False), so the caller can say so.
    """
    if len(scores) == 0 or not np.any(is_single):
        raise UserError("threshold calibration needs held-out patterns including single hits")
    t, measured, _ = precision_recall(scores, is_single)
    precision = at_single_fraction(measured, is_single, single_fraction)
    ok = np.nonzero(precision >= target_precision)[0]
    if len(ok):
        return float(t[ok[-1]]), True
    best = np.flatnonzero(precision == precision.max())[-1]  # of the thresholds tied at it, the most recall
    return float(t[best]), False


def select_references(
    n_particles: np.ndarray, structure: np.ndarray | None, per_class: int, seed: int = 0
) -> np.ndarray:
    """Sorted indices of up to `per_class` random patterns per particle count (and per structure if given)."""
    rng = np.random.default_rng(seed)
    keys = np.asarray(n_particles).astype(str)
    if structure is not None:
        keys = np.char.add(np.char.add(keys, "|"), np.asarray(structure, dtype=str))
    chosen = [
        rng.choice(np.nonzero(keys == key)[0], size=min(per_class, int((keys == key).sum())), replace=False)
        for key in np.unique(keys)
    ]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
