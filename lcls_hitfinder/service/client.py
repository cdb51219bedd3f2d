"""A small subscriber: iterate over the service's decisions (or all its messages) and notice lost ones.

    for d in DecisionClient("tcp://127.0.0.1:5556"):
        ...

`seq` is contiguous while the service runs, so a jump means the PUB socket dropped messages for this
subscriber (it fell behind its high-water mark); each one is recorded in `gaps`. Heartbeats and run messages
say which `seq` comes next, so decisions lost at the end of a stream are gaps too (with heartbeats or run
messages subscribed). Every message names the service's `instance`, new at each start: another one means
the service was restarted (counted in `restarts`), and the new one's decisions before the first seen are a
gap. ZeroMQ reconnects to a restarted service, and subscribes again, while the client reads. Messages that
are not the service's (another schema version excepted, which raises) are skipped and counted in `skipped`.
What went out before the subscriber connected is no gap: ZeroMQ delivers to a subscriber only from its
connection on, so `first` (the first `seq` seen) says where it joined; a subscriber started before the
service can still miss the first few decisions unless the service waits for it
(`serve.publish.wait_for_subscriber_s`). The decision log holds every one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import zmq

from lcls_hitfinder.service.messages import (
    DECISION,
    HEARTBEAT,
    RUN,
    TOPICS,
    MessageError,
    SchemaVersionError,
    decode,
    tcp_port_checked,
)


@dataclass(frozen=True)
class Gap:
    expected: int
    got: int

    @property
    def missing(self) -> int:
        return self.got - self.expected


@dataclass
class SeqTracker:
    """Follows `seq` across decisions: where it joined, gaps (lost messages) and restarts (a new `instance`)."""

    first: int | None = None
    next_seq: int | None = None
    instance: str | None = None
    gaps: list[Gap] = field(default_factory=list)
    restarts: int = 0

    def see(self, seq: int, instance: str) -> Gap | None:
        """A decision's `seq` and `instance`: the gap it reveals, if any."""
        if self.first is None:
            self.first = seq
        if self.restarted(instance):  # a new service counts from 0: what it sent before this one was lost
            gap = Gap(0, seq) if seq > 0 else None
        else:
            gap = Gap(self.next_seq, seq) if self.next_seq is not None and seq > self.next_seq else None
        if gap is not None:
            self.gaps.append(gap)
        self.next_seq = seq + 1
        return gap

    def expect(self, next_seq: int, instance: str) -> Gap | None:
        """The `seq` the service says comes next (heartbeat `next_seq`, run end `first_seq + events`): decisions
        before it that never came are a gap, also when no later decision would show it. A new instance's
        announcement is a restart, and its decisions before `next_seq` the gap."""
        if self.restarted(instance):
            self.next_seq = 0
        if self.next_seq is None:  # joined: decisions from here on are owed
            self.next_seq = next_seq
            return None
        if next_seq <= self.next_seq:
            return None
        gap = Gap(self.next_seq, next_seq)
        self.gaps.append(gap)
        self.next_seq = next_seq
        return gap

    def restarted(self, instance: str) -> bool:
        """Whether `instance` is another service than the one followed so far (counted as a restart)."""
        restarted = self.instance is not None and instance != self.instance
        self.instance = instance
        self.restarts += restarted
        return restarted

    @property
    def missing(self) -> int:
        return sum(g.missing for g in self.gaps)


class DecisionClient:
    """SUB socket connected to `endpoint`, subscribed to `topics` (default: decisions only)."""

    def __init__(
        self,
        endpoint: str,
        topics: tuple[str, ...] = (DECISION,),
        timeout_s: float | None = None,
        rcvhwm: int = 1_000_000,
    ) -> None:
        self.endpoint = tcp_port_checked(endpoint)
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:  # a ZeroMQ prefix no message has: nothing would ever come, and nothing would say why
            raise ValueError(f"topics {unknown} are not among {list(TOPICS)}")
        self.timeout_ms = None if timeout_s is None else int(timeout_s * 1000)
        self.tracker = SeqTracker()
        self.skipped: list[str] = []  # why each message that was not the service's was skipped
        self._topics = topics
        self._decisions = not topics or DECISION in topics  # subscribed to decisions: gaps can be told
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.RCVHWM, rcvhwm)
        self._sock.setsockopt(zmq.LINGER, 0)
        # a service starting after this client: connect within 20 ms of its bind, not ZeroMQ's 100 (no back-off:
        # RECONNECT_IVL_MAX stays 0, since an exponential back-off would have it connect up to a second late)
        self._sock.setsockopt(zmq.RECONNECT_IVL, 20)
        for topic in topics or ("",):
            self._sock.setsockopt_string(zmq.SUBSCRIBE, topic)
        self._sock.connect(endpoint)

    @property
    def gaps(self) -> list[Gap]:
        return self.tracker.gaps

    def messages(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """(topic, payload) as they arrive; stops after `timeout_s` without a message (if set)."""
        while True:
            if self.timeout_ms is not None and not self._sock.poll(self.timeout_ms):
                return
            frames = self._sock.recv_multipart()
            if self._topics and bytes(frames[0]).decode(errors="replace") not in self._topics:
                continue  # ZeroMQ matches prefixes: "run" also lets "runner" through
            try:
                topic, payload = decode(frames)
            except SchemaVersionError:
                raise
            except MessageError as err:
                self.skipped.append(str(err))
                continue
            instance = str(payload["instance"])
            if topic == DECISION:
                self.tracker.see(int(payload["seq"]), instance)
            elif not self._decisions:  # none subscribed, so none missed: only a restart to see
                self.tracker.restarted(instance)
            elif topic == HEARTBEAT:
                self.tracker.expect(int(payload["next_seq"]), instance)
            elif topic == RUN:  # a run's begin announces its first seq, its end the one after its last
                self.tracker.expect(int(payload["first_seq"]) + int(payload["events"]), instance)
            yield topic, payload

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for topic, payload in self.messages():
            if topic == DECISION:
                yield payload

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> DecisionClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
