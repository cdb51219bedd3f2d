"""systemd's readiness protocol (sd_notify(3)) for the unit in deploy/systemd.

With `Type=notify` systemd counts the service as started only once it says READY=1, i.e. once it serves: until
then `systemctl reload` (SIGHUP) waits instead of reaching a process still loading its model, and `systemctl
status` shows the service's own STATUS line. The protocol is one datagram to the socket named by $NOTIFY_SOCKET,
which systemd documents as stable for services to speak themselves (its Python binding needs libsystemd's
headers to build); outside systemd the variable is unset and nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

log = logging.getLogger(__name__)
_failed = threading.Event()  # set once a notification could not be sent (said the first time only)


def notify(*assignments: str) -> bool:
    """Send `KEY=VALUE` lines (READY=1, STOPPING=1, STATUS=...) to systemd; whether they went."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # a socket in the abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as err:  # systemd gone, or a stale variable: the service serves regardless, said once
        if not _failed.is_set():
            log.warning("cannot notify systemd at %s: %s", os.environ["NOTIFY_SOCKET"], err)
            _failed.set()
        return False
    return True
