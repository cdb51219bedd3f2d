"""ZeroMQ publisher: one socket, owned by one thread, fed through a queue.

ZeroMQ sockets are not thread-safe, and the pipeline publishes from its output stage while the
heartbeat timer publishes from another thread; so every message goes through a queue to the one
thread that created the socket. The socket is an XPUB (a PUB that also hears subscriptions), so the
service can tell how many subscriptions it has and wait for a first one. It never blocks: a subscriber
past its high-water mark loses messages (it sees a gap in `seq`); the decision log is the complete record.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Mapping
from typing import Any

import zmq

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.service.messages import encode

log = logging.getLogger(__name__)

_STOP = None
_POLL_S = 0.05  # how often an idle publisher thread looks for (un)subscriptions
PEER_TIMEOUT_S = 15.0  # a subscriber whose ZeroMQ stops answering pings this long is dropped


class ZmqPublisher:
    """`publish(topic, payload)` from any thread; the socket is bound before the constructor returns."""

    def __init__(
        self, endpoint: str, sndhwm: int = 100_000, linger_ms: int = 2000, peer_timeout_s: float = PEER_TIMEOUT_S
    ) -> None:
        self._queue: queue.Queue[tuple[str, Mapping[str, Any]] | None] = queue.Queue()
        self._bound = threading.Event()
        self._subscribed = threading.Event()
        self._error: str | None = None
        self.subscriptions = 0
        self.endpoint = endpoint
        self._thread = threading.Thread(
            target=self._run, args=(endpoint, sndhwm, linger_ms, peer_timeout_s), name="zmq-publisher", daemon=True
        )
        self._thread.start()
        self._bound.wait()
        if self._error is not None:
            raise UserError(self._error)

    def _run(self, endpoint: str, sndhwm: int, linger_ms: int, peer_timeout_s: float) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.XPUB)
        sock.setsockopt(zmq.XPUB_VERBOSER, 1)  # every subscribe and unsubscribe, not the first/last per topic
        sock.setsockopt(zmq.SNDHWM, sndhwm)
        sock.setsockopt(zmq.LINGER, linger_ms)
        # ZMTP pings: a subscriber that vanished (a host gone to sleep, a frozen process) is dropped, with its
        # subscriptions and the up to `sndhwm` messages queued for it, instead of held until TCP gives up
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(peer_timeout_s * 1000 / 3)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(peer_timeout_s * 1000)))
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as err:
            self._error = f"cannot bind the publisher to {endpoint}: {err}"
            sock.close(0)
            self._bound.set()
            return
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)  # resolves tcp://host:* to the real port
        log.info("publishing on %s", self.endpoint)
        self._bound.set()
        try:
            while True:
                item: tuple[str, Mapping[str, Any]] | tuple[()] | None
                try:
                    item = self._queue.get(timeout=_POLL_S)
                except queue.Empty:
                    item = ()
                while sock.poll(0):
                    self._subscription(sock.recv())
                if item is _STOP:
                    break
                if item:
                    try:
                        sock.send_multipart(encode(*item), copy=False)
                    except Exception as err:  # one bad message (e.g. msgpack's OverflowError) must not stop the rest
                        log.error("cannot publish a %s message: %s", item[0], err)
        finally:
            sock.close()  # lingers up to linger_ms so that what was queued reaches connected subscribers

    def _subscription(self, message: bytes) -> None:
        """XPUB hands up b"\\x01topic" for a new subscription and b"\\x00topic" when one goes."""
        if message[:1] == b"\x01":
            self.subscriptions += 1
            self._subscribed.set()
        elif message[:1] == b"\x00":
            self.subscriptions = max(0, self.subscriptions - 1)

    def wait_for_subscriber(self, timeout_s: float) -> bool:
        """Block until someone subscribes (or `timeout_s` passes); True if someone did."""
        return self._subscribed.wait(timeout_s)

    def publish(self, topic: str, payload: Mapping[str, Any]) -> None:
        self._queue.put((topic, payload))

    @property
    def alive(self) -> bool:
        """Whether its thread still sends (until `close`): a thread that died would leave every message queued."""
        return self._thread.is_alive()

    @property
    def depth(self) -> int:
        """Messages queued but not yet handed to ZeroMQ."""
        return self._queue.qsize()

    def close(self) -> None:
        """Send everything queued, then close the socket."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()
