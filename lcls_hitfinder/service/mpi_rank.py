"""One MPI rank of a psana source in parallel mode, started by the service's reader under `mpirun`.

The rank connects back to the service on the Unix socket named on its command line, says which rank
it is, receives the read loop and runs it as the single reader child would (reader.child_main): its
own ring, its own heartbeat slot. psana decides the rank's role (smd0, event builder, big data); only
big-data ranks hand over frames.
"""

from __future__ import annotations

import os
import socket
import sys
from multiprocessing.connection import Connection

from lcls_hitfinder.service.reader import child_main


def main(address: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address)
    except (FileNotFoundError, ConnectionRefusedError):  # the service stopped while mpirun started us
        sys.exit(1)
    conn = Connection(sock.detach())
    rank = int(os.environ["PMI_RANK"])  # set by MPICH's launcher; mpi4py is left for psana to initialise
    conn.send(("hello", rank, os.getpid()))
    loop, heartbeat, prefix, n_slots, delivered, binning, go, may_bin = conn.recv()
    child_main(loop, conn, heartbeat, rank, prefix, n_slots, delivered, binning, go, may_bin)


if __name__ == "__main__":
    main(sys.argv[1])
