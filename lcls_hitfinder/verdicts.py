"""What each frame of a batch is decided: the one assembly of the frame checks, the blank pre-filter and the
bank's decisions, shared by `serve` (service/pipeline.py) and `classify`, so both give one answer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from lcls_hitfinder.labels import Label
from lcls_hitfinder.protocols import Decisions

NONFINITE = "nonfinite: NaN or Inf pixels"
OVERFLOW = "nonfinite: values beyond float32's range (the thumbnail is not finite)"
PREFILTER = "prefilter"  # the reason of a blank the pre-filter decided: the model never saw it


@dataclass
class Verdicts:
    """Per-frame results of one batch, as arrays in the decision log's dtypes; `reason` is "" where none."""

    label: np.ndarray
    keep: np.ndarray
    score: np.ndarray
    distance: np.ndarray
    n_particles: np.ndarray
    reason: np.ndarray

    @classmethod
    def errors(cls, n: int, reason: str = "") -> Verdicts:
        return cls(
            label=np.full(n, Label.ERROR, np.int8),
            keep=np.zeros(n, bool),
            score=np.full(n, np.nan, np.float32),
            distance=np.full(n, np.nan, np.float32),
            n_particles=np.full(n, -1, np.int8),
            reason=np.full(n, reason, dtype=object),
        )

    def __getitem__(self, rows: slice) -> Verdicts:
        return Verdicts(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})

    def judge(self, rows: np.ndarray, finite: np.ndarray, blank: np.ndarray, decisions: Decisions | None) -> None:
        """Decide `rows` (indices of frames that passed the shape and dtype checks): those not `finite` are
        errors, the finite ones the pre-filter calls `blank` are blanks it decided, and the rest take the bank's
        `decisions`, in order (None where no row is left for the model); a non-finite embedding (pixels beyond
        float32's range) is the bank's error."""
        blank = blank & finite
        self.reason[rows[~finite]] = NONFINITE
        dim = rows[blank]
        self.label[dim] = Label.BLANK
        self.score[dim] = -1.0
        self.n_particles[dim] = 0
        self.reason[dim] = PREFILTER
        model = rows[finite & ~blank]
        if decisions is None:
            assert not len(model), "frames for the model, and no decisions"
            return
        self.label[model] = decisions.label
        self.keep[model] = decisions.keep
        self.score[model] = decisions.score
        self.distance[model] = decisions.distance
        self.n_particles[model] = decisions.n_particles
        self.reason[model] = np.where(decisions.label == Label.ERROR, OVERFLOW, "")
