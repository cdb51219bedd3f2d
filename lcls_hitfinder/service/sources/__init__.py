"""Source URIs and the registry that turns one into a `protocols.Source`.

A source is named `scheme:target?key=value&...`, e.g. `xtc2:run.xtc2?det=pnccd`,
`exp:tmoc00123:42?dir=/data&det=jungfrau`, `h5:patterns.h5`, `sim:?rate=120`. Each scheme maps to a
"module:Class" imported only when used, so psana is never imported for an h5: or sim: source. Every
class is built as `Class(uri: SourceURI, settings: ServeSettings)`.
"""

from __future__ import annotations

import importlib
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote

from lcls_hitfinder.errors import UserError

if TYPE_CHECKING:
    from lcls_hitfinder.protocols import Source
    from lcls_hitfinder.service.settings import ServeSettings

T = TypeVar("T")

REGISTRY: dict[str, str] = {
    "xtc2": "lcls_hitfinder.service.sources.psana2:Psana2Source",
    "shmem": "lcls_hitfinder.service.sources.psana2:Psana2Source",
    "exp": "lcls_hitfinder.service.sources.psana2:Psana2Source",
    "psana1": "lcls_hitfinder.service.sources.psana1:Psana1Source",
    "h5": "lcls_hitfinder.service.sources.h5:H5Source",
    "sim": "lcls_hitfinder.service.sources.sim:SimSource",
}

TICK_S = 0.5  # the longest a source may go without yielding (a frame or an idle tick), see protocols.Source

_SCHEME = re.compile(r"^([a-z][a-z0-9]*):(.*)$", re.DOTALL)


@dataclass(frozen=True)
class SourceURI:
    """A parsed source URI: `scheme:target?params`; `raw` is the text the user gave."""

    scheme: str
    target: str
    params: dict[str, str] = field(default_factory=dict)
    raw: str = ""

    def get(self, name: str, convert: Callable[[str], T], default: T, at_least: float | None = None) -> T:
        """The parameter `name` converted by `convert` (int, float, str...), or `default` when absent;
        a number below `at_least` is refused."""
        value = self.params.get(name)
        if value is None:
            return default
        if value == "":
            raise UserError(f"source {self.raw}: {name}= is empty")
        try:
            converted = convert(value)
        except ValueError:
            kind = getattr(convert, "__name__", "value")
            raise UserError(f"source {self.raw}: {name}={value!r} is not a valid {kind}") from None
        if isinstance(converted, float) and not math.isfinite(converted):
            raise UserError(f"source {self.raw}: {name}={value} must be a finite number")
        if at_least is not None and isinstance(converted, int | float) and converted < at_least:
            raise UserError(f"source {self.raw}: {name}={value} must be at least {at_least:g}")
        return converted

    @property
    def live(self) -> bool:
        """Shared memory, whose events pass once: psana2's `shmem:`, psana1's `psana1:shmem=...`."""
        return self.scheme == "shmem" or (self.scheme == "psana1" and self.target.startswith("shmem="))

    def require(self, name: str) -> str:
        """A parameter the source cannot do without."""
        value = self.params.get(name)
        if not value:
            raise UserError(f"source {self.raw}: missing ?{name}=...")
        return value

    def check_params(self, known: Iterable[str]) -> None:
        """Refuse parameters the source does not understand (a typo must not be silently ignored)."""
        unknown = sorted(set(self.params) - set(known))
        if unknown:
            raise UserError(
                f"source {self.raw}: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )


def parse_uri(uri: str) -> SourceURI:
    """`scheme:target?k=v&...` -> SourceURI; a malformed or unknown one is a one-line UserError.

    Its text names the run in every message and log, which carry UTF-8: bytes that are not (a Latin-1 file
    name) are refused here, not found at the first message, which could then not be sent."""
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        shown = uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise UserError(f"source {shown!r} is not valid UTF-8: name its files and experiment in UTF-8") from None
    m = _SCHEME.match(uri.strip())
    if m is None:
        raise UserError(f"source {uri!r} is not a URI of the form scheme:target?key=value (e.g. h5:patterns.h5)")
    scheme, rest = m.groups()
    if scheme not in REGISTRY:
        raise UserError(f"source {uri!r}: unknown scheme {scheme!r} (known: {', '.join(sorted(REGISTRY))})")
    target, _, query = rest.partition("?")
    params: dict[str, str] = {}
    if query:
        pairs = [part.partition("=") for part in query.split("&")]
        if not all(key and sep for key, sep, _ in pairs):
            raise UserError(f"source {uri!r}: cannot parse the parameters {query!r} (want key=value&...)")
        for key, value in ((unquote(k), unquote(v)) for k, _, v in pairs):  # %XX decoded; + is a file name's +
            if key in params:
                raise UserError(f"source {uri!r}: parameter {key!r} given twice")
            params[key] = value
    return SourceURI(scheme=scheme, target=target, params=params, raw=uri)


def open_source(uri: str | SourceURI, settings: ServeSettings) -> Source:
    """Build (not yet open) the source named by `uri`, importing its module only now."""
    parsed = uri if isinstance(uri, SourceURI) else parse_uri(uri)
    module_name, _, class_name = REGISTRY[parsed.scheme].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise UserError(f"source {parsed.raw}: the {parsed.scheme}: backend is unavailable ({err})") from None
    source: Source = getattr(module, class_name)(parsed, settings)
    return source


class Pacer:
    """Spaces events `1/rate` seconds apart (rate 0: no pacing), yielding idle ticks while it waits long."""

    def __init__(self, rate: float) -> None:
        self.period = 1.0 / rate if rate > 0 else 0.0
        self._next: float | None = None

    def wait(self) -> Iterator[None]:
        if not self.period:
            return
        now = time.perf_counter()
        if self._next is None:
            self._next = now
        while (delay := self._next - time.perf_counter()) > 0:
            time.sleep(min(delay, TICK_S))
            if delay > TICK_S:
                yield None
        # after a stall, carry on at the rate instead of bursting to catch up
        self._next = max(self._next + self.period, time.perf_counter() - self.period)
