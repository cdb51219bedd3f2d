"""The bank in use, swapped without a restart when its file changes or on SIGHUP.

A new bank is only accepted if it was built for the loaded model (ReferenceBank.load raises
BankMismatch otherwise) and reads cleanly; a refused bank is logged and counted, and the old one
keeps deciding. Replace the file atomically (write elsewhere, then `mv`) so that a half-written file
is never seen.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lcls_hitfinder.bank import ReferenceBank
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class ReloadingBank:
    """Holds the current bank; `bank` is read by the pipeline, `check`/`reload` run on the monitor thread."""

    def __init__(self, path: Path, model_hash: str, metrics: ServiceMetrics) -> None:
        self.path = path
        self.model_hash = model_hash
        self.metrics = metrics
        self._signature = _signature(path)
        self.bank = ReferenceBank.load(path, expected_model_hash=model_hash)  # at start-up a bad bank is fatal
        self._export()

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
            bank = ReferenceBank.load(self.path, expected_model_hash=self.model_hash)
        except UserError as err:  # BankMismatch or an unreadable file
            log.error("bank reload refused, keeping the previous bank: %s", err)
            self.metrics.bank_reloads.labels(result="refused").inc()
            return False
        self.bank = bank  # one reference assignment: the pipeline sees the old or the new bank, whole
        self.metrics.bank_reloads.labels(result="ok").inc()
        self._export()
        log.info("bank reloaded from %s: %d references", self.path, len(bank.embeddings))
        return True
