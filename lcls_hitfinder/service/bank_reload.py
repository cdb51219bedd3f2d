"""The bank in use, swapped without a restart when its file changes or on SIGHUP.

A new bank is only accepted if it was built for the loaded model (ReferenceBank.load raises
BankMismatch otherwise: another model's hash, or embeddings of another width) and reads cleanly; a
refused bank is logged and counted, and the old one keeps deciding. Replace the file atomically (write
elsewhere, then `mv`) so that a half-written file is never seen.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.preprocess import PhotonCalibration
from lcls_hitfinder.protocols import Embedder
from lcls_hitfinder.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


_IDENTITY = PhotonCalibration().model_dump()  # a calibration's keys, and what one that records none means


def _said(calibration: dict[str, float]) -> str:
    return ", ".join(f"{key} {float(calibration.get(key, default)):g}" for key, default in _IDENTITY.items())


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ReloadingBank:
    """Holds the current bank; `bank` is read by the pipeline, `check`/`reload` run on the monitor thread."""

    def __init__(self, path: Path, embedder: Embedder, metrics: ServiceMetrics) -> None:
        # absolute (named in the log and the metrics, read where the service's folder is unknown), but a symlink
        # stays one: `ln -sfn new.h5 current.h5` is a way to swap a bank
        self.path = Path(os.path.abspath(path))
        self.embedder = embedder
        self.metrics = metrics
        self._signature = _signature(path)
        self.calibration: PhotonCalibration | None = None  # the service's, once its source is open
        self.bank = self._load()  # at start-up a bad bank is fatal
        self._export()
        log.info("bank %s: %s", self.path, self.bank.said())

    def serve_with(self, calibration: PhotonCalibration) -> None:
        """The calibration the service turns frames into photons with: each bank taken is held against it."""
        self.calibration = calibration
        self._say_units()

    def _say_units(self) -> None:
        """References picked with another calibration than the service's are in other units than the frames
        they judge: every decision would be off, with nothing else to show it."""
        picked, serving = self.bank.picked_with, self.calibration
        if picked is None or serving is None:
            return
        if any(float(picked.get(key, default)) != getattr(serving, key) for key, default in _IDENTITY.items()):
            log.warning(
                "bank %s: its references were picked with [serve.calibration] %s; this service converts with %s: "
                "they are in other units than the frames they judge (pick them again with this calibration, or "
                "serve with theirs)",
                self.path,
                _said(picked),
                _said(serving.model_dump()),
            )

    def _load(self) -> ReferenceBank:
        e = self.embedder
        return ReferenceBank.load(self.path, expected_model_hash=e.model_hash, expected_embed_dim=e.embed_dim)

    def _export(self) -> None:
        self.metrics.set_bank_info(str(self.path), self.bank.model_hash, len(self.bank.embeddings))

    def check(self) -> bool:
        """Reload if the file changed since the last attempt; True if a new bank was taken."""
        signature = _signature(self.path)
        if signature is None or signature == self._signature:
            return False
        return self.reload()

    def reload(self) -> bool:
        """Load the file again; keep the old bank (and say why) if the new one is refused."""
        self._signature = _signature(self.path)
        try:
            bank = self._load()
        except Exception as err:  # BankMismatch, a file that does not read as a bank, or anything else: not taken
            said = str(err) if isinstance(err, UserError) else f"{self.path}: {type(err).__name__}: {err}"
            log.error("bank reload refused, keeping the previous bank: %s", said)
            self.metrics.bank_reloads.labels(result="refused").inc()
            return False
        self.bank = bank  # one reference assignment: the pipeline sees the old or the new bank, whole
        self.metrics.bank_reloads.labels(result="ok").inc()
        self._export()
        self._say_units()
        log.info("bank reloaded from %s: %s", self.path, bank.said())
        return True
