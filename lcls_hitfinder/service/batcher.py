"""Dynamic batching: take what is waiting, up to `max_size`, waiting at most `max_wait_s` for more.

At a low rate a frame waits at most `max_wait_s` for company, so latency stays bounded; when the
service falls behind, batches fill at once and throughput rises with the batch size.
"""

from __future__ import annotations

import queue
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    """Collects batches from `q`; a None in the queue ends the stream (`ended` becomes True)."""

    def __init__(self, q: queue.Queue[T | None], max_size: int, max_wait_s: float) -> None:
        self.q = q
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        self.ended = False

    def next(self, idle_s: float) -> list[T]:
        """The next batch, or [] when nothing came within `idle_s` or the stream has ended."""
        if self.ended:
            return []
        try:
            first = self.q.get(timeout=idle_s)
        except queue.Empty:
            return []
        if first is None:
            self.ended = True
            return []
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_size:
            try:
                item = self.q.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self.q.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                self.ended = True
                break
            batch.append(item)
        return batch
