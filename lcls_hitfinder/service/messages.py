"""The messages the service publishes, defined once: topics, fields, msgpack encoding, schema version.

Every ZeroMQ message is two frames, [topic, msgpack(payload)]; every payload carries `v`, the schema
version. `FIELDS` is the single table: the decision log takes its columns from it and docs/messages.md
is generated from it (`python -m lcls_hitfinder.service.messages > docs/messages.md`, checked by a test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

SCHEMA_VERSION = 2  # 2: `instance` in every payload

DECISION = "decision"
HEARTBEAT = "heartbeat"
RUN = "run"
TOPICS = (DECISION, HEARTBEAT, RUN)

# why a run ended (the run message's `ended`, the decision log's attribute), and what that says of the run
ENDED = {
    "run_end": "psana's EndRun: the whole run was read",
    "source_end": "a file or simulation read to its end",
    "next_run": "a frame of another run came first",
    "max_events": "cut short at serve.max_events",
    "stopped": "cut short by a signal",
    "source_failed": "the source failed",
    "failed": "the service failed",
}


@dataclass(frozen=True)
class FieldSpec:
    name: str
    type: str  # as documented: int, float, str, bool, map, or `T | nil`
    doc: str
    log_dtype: str = ""  # numpy dtype of the decision-log column ("" = not logged); "str" = UTF-8


_V = FieldSpec("v", "int", "schema version of this payload", "")
_INSTANCE = FieldSpec(
    "instance",
    "str",
    "identifies the service process that sent it, new at every start or restart (where `seq` starts again from "
    "0): a subscriber tells a restart by it, whatever `seq` the new process has reached",
)

FIELDS: dict[str, tuple[FieldSpec, ...]] = {
    DECISION: (
        _V,
        FieldSpec(
            "seq", "int", "contiguous from 0 and never reused while the service runs: a gap = a lost message", "i8"
        ),
        _INSTANCE,
        FieldSpec(
            "experiment", "str", "experiment name (psana), e.g. `tmoc00123`; `sim` or the file stem otherwise", "str"
        ),
        FieldSpec("run", "int", "run number", "i8"),
        FieldSpec(
            "event",
            "int",
            "event index within the run, from 0 (live shmem: among the events this service received, so not the "
            "run's: `timestamp` names the event; a CXI file's: the event number it records)",
            "i8",
        ),
        FieldSpec(
            "timestamp",
            "int",
            "psana 64-bit timestamp: seconds since 1990-01-01 << 32 | nanoseconds (the event's; for files without "
            "one, h5: datasets and sim:, when the frame was read)",
            "u8",
        ),
        FieldSpec("time_ns", "int", "unix time in ns when the decision was made", "i8"),
        FieldSpec(
            "pulse_id",
            "int | nil",
            "accelerator pulse id when a timing detector is recorded (LCLS-I, CXI files: the fiducial; -1 in the log)",
            "i8",
        ),
        FieldSpec("label", "str", "`blank`, `single`, `multi` or `error`", "str"),
        FieldSpec("decision", "str", "`keep` (a single hit) or `veto`", "str"),
        FieldSpec(
            "score",
            "float",
            "single-hit score in [-1, 1] from the bank, higher is more single-like; -1 for pre-filter blanks, NaN "
            "for `error` decisions (`listen --json` writes null)",
            "f4",
        ),
        FieldSpec("distance", "float", "embedding distance to the single-hit references (NaN when not computed)", "f4"),
        FieldSpec(
            "n_particles",
            "int | nil",
            "estimated particle count, 0 for pre-filter blanks, nil for `error` decisions (-1 in the log): the "
            "majority count of the k "
            "nearest references, beside `label`, which the threshold decides (a pattern scored below it is "
            "labelled blank or multi, whichever is nearer, even where most of its nearest references are "
            "singles and n_particles is 1)",
            "i1",
        ),
        FieldSpec(
            "latency_us",
            "int",
            "microseconds from the frame being read to this decision being ready, just before it is logged and "
            "published (hitfinder_latency_seconds)",
            "i8",
        ),
        FieldSpec("model", "str", "hash of the embedder model that made the decision", "str"),
        FieldSpec(
            "truth_n_particles", "int | nil", "true particle count when the source knows it (-1 in the log)", "i1"
        ),
        FieldSpec(
            "reason",
            "str | nil",
            "for `error` decisions `KIND: detail`, KIND one of shape, dtype, nonfinite, internal (e.g. `nonfinite: "
            "NaN or Inf pixels`); `prefilter` for pre-filter blanks; nil otherwise",
            "str",
        ),
    ),
    HEARTBEAT: (
        _V,
        _INSTANCE,
        FieldSpec("time_ns", "int", "unix time in ns"),
        FieldSpec(
            "uptime_s",
            "float",
            "seconds since the service began serving (after loading the model and opening the source)",
        ),
        FieldSpec("next_seq", "int", "the `seq` the next decision will carry (= decisions published so far)"),
        FieldSpec("rate_hz", "float", "decisions per second since the previous heartbeat"),
        FieldSpec("counts", "map", "decisions so far by label: {blank, single, multi, error}"),
        FieldSpec("keep", "int", "decisions so far that said keep"),
        FieldSpec(
            "dropped",
            "int",
            "events read but not decided (the service fell behind a live source, or failed on them: "
            "`hitfinder_dropped_events_total` by reason)",
        ),
        FieldSpec("source_restarts", "int", "watchdog restarts of the source's reader"),
        FieldSpec("queue_depth", "int", "frames waiting between reader and batcher"),
        FieldSpec("subscriptions", "int", "topic subscriptions currently held by subscribers"),
        FieldSpec("run_open", "bool", "whether a run is being served"),
        FieldSpec("experiment", "str | nil", "experiment of the open (or last) run"),
        FieldSpec("run", "int | nil", "number of the open (or last) run"),
        FieldSpec("model", "str", "model hash"),
        FieldSpec("provider", "str", "onnxruntime execution provider in use"),
        FieldSpec("source", "str", "source URI"),
    ),
    RUN: (
        _V,
        _INSTANCE,
        FieldSpec(
            "phase",
            "str",
            "`begin` (before its first decision) or `end` (after its last: psana's EndRun, or the source's end)",
        ),
        FieldSpec("experiment", "str", "experiment name"),
        FieldSpec("run", "int", "run number"),
        FieldSpec("time_ns", "int", "unix time in ns"),
        FieldSpec("source", "str", "source URI"),
        FieldSpec("model", "str", "model hash"),
        FieldSpec("provider", "str", "onnxruntime execution provider in use"),
        FieldSpec("first_seq", "int", "`seq` of the run's first decision"),
        FieldSpec("events", "int", "decisions in the run (0 at begin)"),
        FieldSpec("counts", "map", "decisions in the run by label (end; zeros at begin)"),
        FieldSpec("keep", "int", "decisions in the run that said keep"),
        FieldSpec("dropped", "int", "events of the run read but not decided"),
        FieldSpec("duration_s", "float", "seconds from begin to end (0 at begin)"),
        FieldSpec("log", "str | nil", "path of the run's decision log"),
        FieldSpec(
            "ended",
            "str | nil",
            "why the run ended (nil at begin): " + ", ".join(f"`{k}` ({v})" for k, v in ENDED.items()),
        ),
    ),
}

LOG_COLUMNS: tuple[FieldSpec, ...] = tuple(f for f in FIELDS[DECISION] if f.log_dtype)


_NIL_SENTINEL = {f.name: (-1 if f.log_dtype != "str" else "") for f in LOG_COLUMNS if "nil" in f.type}


def decision_payloads(columns: Mapping[str, np.ndarray], instance: str) -> list[dict[str, Any]]:
    """Decision payloads (without `v`) from decision-log columns: -1 or "" become nil where a field allows it."""
    names = [f.name for f in LOG_COLUMNS]
    values = []
    for name in names:
        col = np.asarray(columns[name]).tolist()
        sentinel = _NIL_SENTINEL.get(name)
        if sentinel is not None:
            col = [None if x == sentinel else x for x in col]
        values.append(col)
    return [{"instance": instance, **dict(zip(names, row, strict=True))} for row in zip(*values, strict=True)]


class MessageError(ValueError):
    """A message that is not one of ours: wrong frame count, unknown topic or schema version, missing fields."""


class SchemaVersionError(MessageError):
    """A message of another schema version: this client and that service do not speak the same schema."""


def tcp_port_checked(endpoint: str) -> str:
    """A tcp:// endpoint's port must be one (1-65535, or * for any free one): ZeroMQ takes 99999 as 34463.
    For the service's bind and a subscriber's connect alike."""
    if endpoint.startswith("tcp://"):
        port = endpoint.rpartition(":")[2]
        if port != "*" and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"{endpoint}: the port must be 1-65535 or *, not {port!r}")
    return endpoint


def encode(topic: str, payload: Mapping[str, Any]) -> list[bytes]:
    """[topic, msgpack payload] with `v` set; the two frames of a ZeroMQ multipart message."""
    body = dict(payload)
    body["v"] = SCHEMA_VERSION
    return [topic.encode(), msgpack.packb(body, use_bin_type=True)]


def decode(frames: Sequence[bytes]) -> tuple[str, dict[str, Any]]:
    """The inverse of `encode`, checking the topic, the schema version and that every field is present."""
    if len(frames) != 2:
        raise MessageError(f"expected [topic, payload], got {len(frames)} frames")
    topic = bytes(frames[0]).decode(errors="replace")
    if topic not in FIELDS:
        raise MessageError(f"unknown topic {topic!r}")
    try:
        payload = msgpack.unpackb(frames[1], raw=False)
    except (ValueError, msgpack.ExtraData) as err:
        raise MessageError(f"undecodable {topic} payload: {err}") from None
    if not isinstance(payload, dict) or "v" not in payload:
        raise MessageError(f"{topic} payload is not a map with a schema version `v`")
    if payload["v"] != SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{topic} message of schema version {payload['v']!r}; this client reads {SCHEMA_VERSION}"
        )
    missing = [f.name for f in FIELDS[topic] if f.name not in payload]
    if missing:
        raise MessageError(f"{topic} message without {', '.join(missing)}")
    return topic, payload


def _cell(text: str) -> str:
    """A table cell: a `|` in it (`int | nil`) would end the cell."""
    return text.replace("|", "\\|")


def markdown() -> str:
    """docs/messages.md, generated from FIELDS."""
    from lcls_hitfinder.service.publish import PEER_TIMEOUT_S  # publish imports this module

    lines = [
        "# Messages",
        "",
        "`lcls-hitfinder serve` publishes on a ZeroMQ PUB socket (`serve.publish.endpoint`, `--publish`).",
        "Each message has two frames: the topic (`decision`, `heartbeat` or `run`) and a msgpack map.",
        f"Schema version: `v = {SCHEMA_VERSION}`. Subscribe to a topic by its name as the ZeroMQ prefix.",
        "`v` changes only when a field is removed, renamed or retyped, or its meaning or unit changes; fields",
        "may be added without a change, so a consumer ignores keys it does not know (`decode` refuses another",
        "`v`, as a script written for it could misread it).",
        "Generated from `lcls_hitfinder/service/messages.py` by `python -m lcls_hitfinder.service.messages`;",
        "a test fails when the two differ.",
        "",
        "- `decision`: one per event, in the order the source reads them (event order, but for psana's MPI mode,",
        "  where big-data ranks hand over batches as they finish them).",
        "- `heartbeat`: every `serve.publish.heartbeat_s` (1 s), also between runs and while the source is down.",
        "- `run`: at the beginning and at the end of each run; the end carries the run's totals.",
        "",
        "A PUB socket drops messages for a subscriber that falls behind its high-water mark",
        "(`serve.publish.sndhwm`): compare `seq` with the previous one (`lcls-hitfinder listen` reports gaps)",
        "and read the run's decision log (`serve.log_dir`, HDF5, one column per logged field) for the full record.",
        f"A subscriber whose ZeroMQ stops answering the service's pings for {PEER_TIMEOUT_S:g} s (a frozen process,",
        "a host gone to sleep) is dropped with what was queued for it; ZeroMQ reconnects it when it answers again.",
        "The log is flushed every second and marked `complete` (an attribute, with the run's totals and `ended`,",
        "which says whether the whole run was read) when the run ends. It is written in HDF5's SWMR mode, so it",
        "can be read at any time, also during the run:",
        "`lcls_hitfinder.service.decision_log.read_decision_log(path)`, or `h5py.File(path, 'r', swmr=True)`.",
        "",
        "A subscriber receives what is published after it has connected: one that joins a running service starts",
        "at a later `seq` (`listen` says where it joined; `DecisionClient.tracker.first`). ZeroMQ connects a",
        "subscriber started before the service within moments of the bind, but the first decisions can go out",
        "sooner: to receive every one, start the subscriber first and set `serve.publish.wait_for_subscriber_s`",
        "(the service then waits up to that long for a subscriber before it reads the first event).",
        "",
    ]
    for topic, fields in FIELDS.items():
        lines += [f"## `{topic}`", "", "| field | type | meaning |", "| --- | --- | --- |"]
        lines += [f"| `{f.name}` | {_cell(f.type)} | {_cell(f.doc)} |" for f in fields]
        lines.append("")
    lines += [
        "## Reading it",
        "",
        "```python",
        "from lcls_hitfinder.service.client import DecisionClient",
        "",
        'for d in DecisionClient("tcp://127.0.0.1:5556"):',
        '    if d["decision"] == "keep":',
        '        print(d["run"], d["event"], d["score"])',
        "```",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
