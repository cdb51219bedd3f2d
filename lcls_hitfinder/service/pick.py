"""Reference patterns picked from a run: the bank of a new sample from the sample's own first minutes.

A scientist lists events of a run with the particle counts they judged (a CSV: `event` or `timestamp`,
optionally `run`, and `n_particles` or `label`, as in the decision log and `listen --json`); the events
are read through the service's own sources and turned into photons with the service's calibration
(`Preprocessor.photons`), so the references are what `serve` will see. The result is a labelled dataset
file for `lcls-hitfinder bank build`.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lcls_hitfinder.dataset import Batch, DatasetWriter
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.labels import MAX_PARTICLES, Label, label_of_count
from lcls_hitfinder.preprocess import PEDESTAL_LEFT, Preprocessor, PreprocessSettings, all_finite
from lcls_hitfinder.protocols import Frame, Source
from lcls_hitfinder.service.binning import fitting_mask
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources.h5 import recorded_calibration

log = logging.getLogger(__name__)
KEYS = ("event", "timestamp")  # how a row names its event: the index in its run, or psana's timestamp
COUNT_OF_LABEL = {Label.BLANK.text: 0, Label.SINGLE.text: 1, Label.MULTI.text: 2}  # a multi-hit of unknown count


@dataclass(frozen=True)
class Picks:
    """The events wanted, keyed by (run or None, event index or timestamp), with their particle counts."""

    key: str
    counts: dict[tuple[int | None, int], int]

    def take(self, run: int, event: int, timestamp: int) -> int | None:
        """The count given to this event, once (None if it was not picked)."""
        k = event if self.key == "event" else timestamp
        for slot in ((run, k), (None, k)):
            if slot in self.counts:
                return self.counts.pop(slot)
        return None


def read_picks(path: Path, timestamps: bool) -> Picks:
    """Parse the CSV; every error names the file and the line.

    Rows name their events by `timestamp` where the source's timestamps are the events' own (`timestamps`:
    `Source.stamps_events`) and the file has them, else by `event`. With both `label` and `n_particles` (the decision
    log's columns: the model's label and its estimate), a row's two must agree on blank / single / multi, so a
    label corrected by eye is never overruled by the model's count left beside it; a row may leave either empty.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # spreadsheets save a byte-order mark
            reader = csv.DictReader(f)
            rows = [(reader.line_num, row) for row in reader]
            header = set(reader.fieldnames or ())
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read picks {path}: {err}") from None
    keys = [k for k in KEYS if k in header and (timestamps or k == "event")]
    key = "timestamp" if "timestamp" in keys else keys[0] if keys else None
    if key is None and "timestamp" in header and header & {"n_particles", "label"}:
        raise UserError(f"picks {path}: the source stamps its events when it reads them: pick them by event")
    if key is None or not header & {"n_particles", "label"}:
        raise UserError(
            f"picks {path}: needs a column event or timestamp, and n_particles or label (has {sorted(header)})"
        )
    counts: dict[tuple[int | None, int], int] = {}
    for line, row in rows:
        where = f"picks {path}, line {line}"
        cells = {name: (row.get(name) or "").strip() for name in ("run", key, "label", "n_particles")}
        try:
            run = int(cells["run"]) if cells["run"] else None
            k = int(cells[key])
        except ValueError:
            raise UserError(f"{where}: run and {key} must be whole numbers, not {cells}") from None
        n = _count(cells["label"], cells["n_particles"], where)
        if (run, k) in counts or (None, k) in counts or (run is None and any(c[1] == k for c in counts)):
            raise UserError(f"{where}: {key} {k} is picked twice")
        counts[(run, k)] = n
    if not counts:
        raise UserError(f"picks {path}: no events listed")
    return Picks(key, counts)


def _count(label: str, n_particles: str, where: str) -> int:
    """A row's particle count from its label and/or its count, which must agree where both are given."""
    if label and label not in COUNT_OF_LABEL:
        raise UserError(f"{where}: label {label!r} is not one of {', '.join(COUNT_OF_LABEL)}")
    n = int(n_particles) if n_particles.isdigit() else -1
    if n_particles and not 0 <= n <= MAX_PARTICLES:
        raise UserError(f"{where}: n_particles {n_particles!r} is not a count of 0-{MAX_PARTICLES}")
    if not label and not n_particles:
        raise UserError(f"{where}: neither a label nor n_particles")
    if label and n_particles and label_of_count(n).text != label:
        raise UserError(f"{where}: label {label} and n_particles {n} disagree: correct or clear one of them")
    return n if n_particles else COUNT_OF_LABEL[label]


def pick_references(
    source: Source,
    picks: Picks,
    settings: ServeSettings,
    out: Path,
    sample: str,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Read `source` (opened by the caller, who closes it) until every picked event has come; write them, in
    photons, as a labelled dataset. Returns the number written. Hits are labelled with `sample` as their
    structure (`bank build --by-structure` draws per sample); blanks with none, as the dataset format has it.
    """
    wanted = len(picks.counts)
    images: list[np.ndarray] = []
    counts: list[int] = []
    pre: Preprocessor | None = None
    mask: np.ndarray | None = None
    pedestal = 0
    settings = recorded_calibration(settings, source)
    for scanned, item in enumerate(source.frames(), start=1):
        if not isinstance(item, Frame):
            continue
        ident = item.event
        n = picks.take(ident.run, ident.event, ident.timestamp)
        if n is None:
            item.release()
            continue
        raw = item.data
        if raw.size == 0:  # how psana hands over an event without the detector
            item.release()
            raise UserError(f"event {ident.event} holds no data of the detector: pick another event")
        frame = torch.from_numpy(np.array(raw, dtype=np.float32))  # a copy: the slot goes back now
        item.release()
        if pre is None:
            if raw.dtype.kind in "iu" and "calibration" not in settings.model_fields_set:
                log.warning(
                    "the frames are integers (raw detector values?) and no [serve.calibration] is configured: "
                    "they are taken as photons, as serve would take them (pass --config if they are ADU)"
                )
            shape = tuple(frame.shape)
            pre = Preprocessor(PreprocessSettings(), fitting_mask(source.mask, shape), shape, settings.calibration)
            mask = (pre.mask[0] > 0).numpy()
        if tuple(frame.shape) != pre.frame_shape:
            raise UserError(f"event {ident.event} is {tuple(frame.shape)}, the first picked one {pre.frame_shape}")
        if not bool(all_finite(frame[None])[0]):  # serve decides such a frame `error`: no reference
            raise UserError(f"event {ident.event} holds NaN or Inf pixels: pick another event")
        photons = pre.photons(frame[None], inplace=True)
        pedestal += int(pre.pedestal_left(pre.binned(photons))[0])
        images.append(photons[0].numpy())
        counts.append(n)
        if progress is not None:
            progress(len(images), scanned)
        if not picks.counts:
            break
    if picks.counts:
        missing = ", ".join(
            f"{picks.key} {k}" + (f" of run {r}" if r is not None else "") for r, k in list(picks.counts)[:5]
        )
        raise UserError(f"{len(picks.counts)} of {wanted} picked events are not in {source.uri}: {missing}")
    if pedestal:
        log.warning(
            "%d of %d picked events look like %s. Pass --config with the detector's [serve.calibration]",
            pedestal,
            len(images),
            PEDESTAL_LEFT,
        )
    assert mask is not None
    stack = np.stack(images)
    n_particles = np.array(counts, np.int8)
    k = len(stack)
    assert pre is not None
    # the frames as read (a panel stack is stored tiled: the shape says how it was, should the tiling change)
    attrs = {
        "picked_from": source.uri,
        "calibration": settings.calibration.model_dump(),
        "frame_shape": list(pre.frame_shape),
    }
    with DatasetWriter(out, mask.shape, mask, attrs) as writer:
        writer.append(
            Batch(
                images=stack,
                n_particles=n_particles,
                structure=np.where(n_particles > 0, sample, "").astype(object),
                photons=stack.sum(axis=(1, 2)).astype(np.float32),
                orientations=np.zeros((k, MAX_PARTICLES, 4), np.float32),
                positions=np.zeros((k, MAX_PARTICLES, 3), np.float32),
            )
        )
    return k
