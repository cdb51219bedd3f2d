"""psana's `shmemServer` replaying XTC2 files into shared memory, as the DAQ's monitoring would.

Used by `lcls-hitfinder demo` and the live-mode tests. Settings follow NOTES.md §2: a finite rate
(`-r 0` duplicates events and once crashed), buffers larger than the largest dgram (`-s`), and several
runs served as a list of files with increasing timestamps rather than looping one file (`-L`).
The server waits for its first client before it sends anything, and leaves its segment
/dev/shm/PdsMonitorSharedMemory_<tag> behind when it exits; `stop()` removes it.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path
from types import TracebackType

from lcls_hitfinder.errors import UserError


def psana2_package(label: str = "psana") -> Path:
    """psana2's package folder, found without importing it (the service process never loads psana); a one-line
    error, after `label`, where psana is missing or is LCLS-I's psana1."""
    spec = importlib.util.find_spec("psana")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / "psexp").is_dir():
        why = "psana is not installed" if spec is None else "the psana installed is not psana2 (LCLS-II)"
        raise UserError(f"{label}: {why}: pip install 'lcls-hitfinder[psana]'")
    return Path(spec.origin).parent


def psana_tool(name: str) -> Path:
    """A psana C++ tool (shmemServer, smdwriter...): the wheel installs them in site-packages/bin."""
    tool = psana2_package().parent / "bin" / name
    if not os.access(tool, os.X_OK):
        raise UserError(f"psana's {name} is missing (looked for {tool})")
    return tool


class ShmemServer:
    """One shmemServer process serving `files` (one run each) under partition tag `tag`."""

    def __init__(
        self,
        tag: str,
        files: list[Path],
        rate_hz: float,
        buffer_bytes: int,
        n_buffers: int = 8,
        clients: int = 1,
        log: Path | None = None,
    ) -> None:
        self.tag = tag
        self._files = [Path(f) for f in files]
        self._rate = max(1, round(rate_hz))
        self._buffer = -(-(buffer_bytes + (1 << 20)) // (1 << 20)) << 20  # frame + headers, whole MiB
        self._n_buffers = n_buffers
        self._clients = clients
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def segment(self) -> Path:
        return Path(f"/dev/shm/PdsMonitorSharedMemory_{self.tag}")

    def start(self) -> ShmemServer:
        if len(self._files) == 1:
            source = ["-f", str(self._files[0])]
        else:
            listing = self._files[0].with_name(f".shmem_{self.tag}.txt")
            listing.write_text("".join(f"{f}\n" for f in self._files))
            source = ["-l", str(listing)]
        cmd = [str(psana_tool("shmemServer")), "-p", self.tag, *source, "-n", str(self._n_buffers)]
        cmd += ["-s", hex(self._buffer), "-r", str(self._rate), "-c", str(self._clients)]
        # its own session: a Ctrl-C on the terminal is for our owner, who then stops us in order
        with open(self._log or os.devnull, "ab") as out:
            self._process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit code once it has ended (0: it served its files), else None."""
        return None if self._process is None else self._process.poll()

    def kill(self) -> None:
        """Kill it as a crash would (SIGKILL): what the service's watchdog has to survive."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self, timeout_s: float = 3.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove what it leaves in /dev/shm."""
        p = self._process
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self.segment.unlink(missing_ok=True)
        if len(self._files) > 1:
            self._files[0].with_name(f".shmem_{self.tag}.txt").unlink(missing_ok=True)

    def __enter__(self) -> ShmemServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
