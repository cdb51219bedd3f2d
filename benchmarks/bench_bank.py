"""The bank's decision for one batch, on numpy's default BLAS threads and on one, with the cores idle or busy.

    .venv/bin/python benchmarks/bench_bank.py [--bank models/bank.h5] [--batch 32] [--repeats 300]

`ReferenceBank.decide` on a batch of random embeddings against the bank (one matrix product to every
reference, then the k nearest per class). In the service the cores are never idle: psana's reader child
and the preprocessing threads hold them; here 0, 1 or 2 threads keep them busy (numpy sums over a frame,
which let go of the GIL). The service holds BLAS to one thread while it runs (`Pipeline.start`); this shows
why. Each setting runs in a fresh process (OpenBLAS behaved differently once its threads had been limited
and restored in a process), the two alternating for --rounds; milliseconds a batch, the median of
--repeats, the median round shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from lcls_hitfinder.bank import ReferenceBank

BUSY = (0, 1, 2)


def busy(stop: threading.Event) -> None:
    frame = np.random.default_rng(0).random((1024, 1024), np.float32)
    while not stop.is_set():
        frame.sum()


def decide_ms(bank: ReferenceBank, embeddings: np.ndarray, repeats: int, busy_threads: int) -> float:
    stop = threading.Event()
    threads = [threading.Thread(target=busy, args=(stop,)) for _ in range(busy_threads)]
    for t in threads:
        t.start()
    times = []
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            bank.decide(embeddings)
            times.append(time.perf_counter() - t0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return float(np.median(times)) * 1e3


def measure(bank_path: Path, batch: int, repeats: int, blas_threads: int) -> list[float]:
    """In this process: ms a batch for each number of busy threads, BLAS at `blas_threads` (0: its default)."""
    bank = ReferenceBank.load(bank_path)
    embeddings = np.random.default_rng(1).standard_normal((batch, bank.embed_dim)).astype(np.float32)
    with threadpool_limits(blas_threads or None, user_api="blas"):
        return [decide_ms(bank, embeddings, repeats, n) for n in BUSY]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=Path(__file__).parents[1] / "models" / "bank.h5")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--blas-threads", type=int, help=argparse.SUPPRESS)  # a child's own run
    args = parser.parse_args()
    if args.blas_threads is not None:
        print(json.dumps(measure(args.bank, args.batch, args.repeats, args.blas_threads)))
        return
    common = [sys.executable, __file__, "--bank", str(args.bank), "--batch", str(args.batch)]
    common += ["--repeats", str(args.repeats), "--blas-threads"]
    rounds: dict[int, list[list[float]]] = {0: [], 1: []}
    for _ in range(args.rounds):
        for threads in rounds:
            out = subprocess.run([*common, str(threads)], check=True, capture_output=True, text=True).stdout
            rounds[threads].append(json.loads(out))
    default_ms, one_ms = (np.median(rounds[t], axis=0) for t in (0, 1))
    default = max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas")
    bank = ReferenceBank.load(args.bank)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; bank {args.bank.name}: {len(bank.embeddings)}")
    print(f"references of {bank.embed_dim} dimensions; batch {args.batch}; ms a batch (median of {args.repeats})")
    print(f"{'busy threads':<14}{f'BLAS {default} threads':>18}{'BLAS 1 thread':>16}{'ratio':>8}")
    for n_busy, ms_default, ms_one in zip(BUSY, default_ms, one_ms, strict=True):
        print(f"{n_busy:<14}{ms_default:>18.3f}{ms_one:>16.3f}{ms_default / ms_one:>8.1f}")


if __name__ == "__main__":
    main()
