"""Class labels, defined once: what a pattern is (by particle count) and what the service says about it."""

from enum import IntEnum

import numpy as np
from numpy.typing import ArrayLike

MAX_PARTICLES = 4
# the single-hit precision a bank's threshold is calibrated for unless asked otherwise: 0.99 rests on the last
# few of a few hundred held-out singles and keeps a fraction of the singles (MODEL_CARD.md)
TARGET_PRECISION = 0.9


class Label(IntEnum):
    """Decision labels. ERROR marks a frame that could not be classified (bad shape, NaN, ...)."""

    BLANK = 0
    SINGLE = 1
    MULTI = 2
    ERROR = 3

    @property
    def text(self) -> str:
        return self.name.lower()


def label_of_count(n_particles: int) -> Label:
    """Blank for 0 particles, single for 1, multi for 2 to 4."""
    if n_particles <= 0:
        return Label.BLANK
    return Label.SINGLE if n_particles == 1 else Label.MULTI


def labels_of_counts(n_particles: ArrayLike) -> np.ndarray:
    """`label_of_count` of each count (int64 label codes), for arrays."""
    return np.clip(np.asarray(n_particles, np.int64), Label.BLANK, Label.MULTI)
