"""The service's parts on their own: source URIs, message schema and docs, batching, seq tracking,
provider choice, the h5: and sim: sources, the decision log and the metrics endpoint."""

from __future__ import annotations

import dataclasses
import logging
import queue
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import torch
from tiny_model import log_rows
from typer.testing import CliRunner

from lcls_hitfinder.cli import app
from lcls_hitfinder.config import load_config
from lcls_hitfinder.embedder import CPU, CUDA, TENSORRT, provider_options, select_providers
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.model_io import ModelInfo, read_model_info
from lcls_hitfinder.protocols import Frame, psana_timestamp
from lcls_hitfinder.service import messages, metrics, settings
from lcls_hitfinder.service.batcher import Batcher
from lcls_hitfinder.service.binning import readers_bin
from lcls_hitfinder.service.client import SeqTracker
from lcls_hitfinder.service.commands import logs_said
from lcls_hitfinder.service.decision_log import DecisionLog, read_decision_log
from lcls_hitfinder.service.pick import read_picks
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.service.sources import REGISTRY, open_source, parse_uri

REPO = Path(__file__).resolve().parents[1]


# ---- source URIs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("uri", "scheme", "target", "params"),
    [
        ("xtc2:/data/run7.xtc2?det=pnccd", "xtc2", "/data/run7.xtc2", {"det": "pnccd"}),
        ("shmem:hitfinder?det=jungfrau", "shmem", "hitfinder", {"det": "jungfrau"}),
        ("exp:tmoc00123:42?dir=/sdf/data&det=epix", "exp", "tmoc00123:42", {"dir": "/sdf/data", "det": "epix"}),
        ("psana1:exp=amo86615:run=190:smd?det=pnccdBack", "psana1", "exp=amo86615:run=190:smd", {"det": "pnccdBack"}),
        ("h5:patterns.h5", "h5", "patterns.h5", {}),
        ("sim:?rate=120&n=10", "sim", "", {"rate": "120", "n": "10"}),
        # a file name's + stays a +; %XX (an & or a ? in a path) is decoded
        ("xtc2:r.xtc2?constants=/c/run+1.npz", "xtc2", "r.xtc2", {"constants": "/c/run+1.npz"}),
        ("exp:tmo:1?dir=/d/a%26b%3F", "exp", "tmo:1", {"dir": "/d/a&b?"}),
    ],
)
def test_uris_parse_into_scheme_target_and_params(uri: str, scheme: str, target: str, params: dict[str, str]) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.target, parsed.params, parsed.raw) == (scheme, target, params, uri)
    assert scheme in REGISTRY


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("run7.xtc2", "not a URI"),
        ("ftp:run7", "unknown scheme 'ftp'"),
        ("sim:?rate", "cannot parse"),
        ("sim:?rate=1&&n=2", "cannot parse"),
        ("sim:?=1", "cannot parse"),
        ("sim:?rate=1&rate=2", "given twice"),
        ("sim:?experiment=caf\udce9", "is not valid UTF-8"),  # a Latin-1 byte from the command line
    ],
)
def test_bad_uris_are_one_line_user_errors(uri: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        parse_uri(uri)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("sim:?colour=red", r"unknown parameter.*colour"),
        ("sim:?rate=fast", "rate='fast' is not a valid float"),
        ("sim:?rate=-5", "rate=-5 must be at least 0"),
        ("sim:?rate=nan", "rate=nan must be a finite number"),
        ("sim:?experiment=", "experiment= is empty"),  # it names the run and its decision log
        ("sim:?seed=-1", "seed=-1 must be at least 0"),  # not a numpy traceback at the first event
        ("sim:rate=0&n=5", re.escape("sim: takes its parameters after '?' (sim:?rate=0&n=5)")),  # not the defaults
        ("h5:{tmp}/x.h5?repeat=-1", "repeat=-1 must be at least 0"),
        ("h5:{tmp}/missing.h5", "no such file"),
    ],
)
def test_source_parameters_are_checked_and_converted(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as err:
        open_source(uri.format(tmp=tmp_path), ServeSettings()).open()
    assert "\n" not in str(err.value)


def test_a_simulated_stream_reads_its_config_when_built(tmp_path: Path) -> None:
    """Before the service binds its ports and loads its model (open() comes after both)."""
    with pytest.raises(UserError, match=f"cannot read config {tmp_path / 'missing.toml'}"):
        open_source(f"sim:?config={tmp_path / 'missing.toml'}", ServeSettings())


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
def test_serve_device_cuda_without_a_gpu_is_refused_naming_the_key() -> None:
    with pytest.raises(UserError, match=r"^serve\.device is cuda but torch sees no CUDA device$"):
        readers_bin(ServeSettings(device="cuda"))


def test_psana_timestamp_counts_from_1990() -> None:
    ts = psana_timestamp(631_152_000 * 10**9 + 5 * 10**9 + 7)  # 1990-01-01 + 5 s + 7 ns
    assert ts >> 32 == 5 and ts & 0xFFFFFFFF == 7


# ---- messages and docs --------------------------------------------------------------------------------------
def _decision(seq: int = 0) -> dict[str, object]:
    columns = {
        f.name: np.array([{"str": "", "f4": 0.5}.get(f.log_dtype, -1)], dtype=object if f.log_dtype == "str" else None)
        for f in messages.LOG_COLUMNS
    }
    columns["seq"] = np.array([seq])
    columns["label"] = np.array(["single"], dtype=object)
    return messages.decision_payloads(columns, "5e2f")[0]


def test_decision_round_trip_with_nil_fields() -> None:
    payload = _decision(3)
    assert payload["pulse_id"] is None and payload["truth_n_particles"] is None and payload["reason"] is None
    assert payload["run"] == -1  # -1 only means nil for fields that can be nil
    topic, back = messages.decode(messages.encode(messages.DECISION, payload))
    assert topic == "decision" and back == {**payload, "v": messages.SCHEMA_VERSION}


def test_decode_refuses_what_is_not_ours() -> None:
    with pytest.raises(messages.MessageError, match="unknown topic"):
        messages.decode([b"gossip", msgpack.packb({"v": 1})])
    with pytest.raises(messages.MessageError, match="schema version 99"):
        messages.decode([b"decision", msgpack.packb({"v": 99})])
    with pytest.raises(messages.MessageError, match="without"):
        messages.decode([b"run", msgpack.packb({"v": messages.SCHEMA_VERSION, "phase": "begin"})])
    good = messages.encode(messages.DECISION, _decision(3))
    for frames in ([*good, b"extra"], good[:1]):  # another publisher's envelope, or a topic alone
        with pytest.raises(messages.MessageError, match=rf"expected \[topic, payload\], got {len(frames)} frames"):
            messages.decode(frames)


@pytest.mark.parametrize("port", ["0", "65536", "99999", "x"])
def test_a_tcp_endpoint_needs_a_port_zeromq_can_bind(port: str) -> None:
    """ZeroMQ would take 99999 as 34463, and 0 is no port to connect to (bind to * for any free one)."""
    with pytest.raises(ValueError, match=f"the port must be 1-65535 or \\*, not '{port}'"):
        messages.tcp_port_checked(f"tcp://127.0.0.1:{port}")
    assert messages.tcp_port_checked("tcp://127.0.0.1:65535") and messages.tcp_port_checked("tcp://*:*")


def test_docs_are_generated_from_the_code() -> None:
    """docs/messages.md, metrics.md and serve.md cannot drift: regenerate with `python -m <module> > docs/...`."""
    assert (REPO / "docs" / "messages.md").read_text() == messages.markdown()
    assert (REPO / "docs" / "metrics.md").read_text() == metrics.markdown()
    assert (REPO / "docs" / "serve.md").read_text() == settings.markdown()


def test_the_issue_s_metric_names_exist() -> None:
    names = {s.name for s in metrics.SPECS}
    assert {
        "hitfinder_events_total",
        "hitfinder_stage_duration_seconds",
        "hitfinder_latency_seconds",
        "hitfinder_batch_size",
        "hitfinder_dropped_events_total",
        "hitfinder_queue_depth",
        "hitfinder_source_restarts_total",
        "hitfinder_build_info",
    } <= names
    assert metrics.STAGE_BUCKETS[0] == 50e-6 and metrics.STAGE_BUCKETS[-1] == 1.0
    assert metrics.LATENCY_BUCKETS[-1] == 30.0  # a backlog's seconds are told apart, not read as 1 s


def test_metrics_are_served_on_localhost() -> None:
    m = metrics.ServiceMetrics()
    m.set_build_info("1.0", "abc", "CPUExecutionProvider", "cuda:0")
    port = m.serve_http("127.0.0.1", 0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'hitfinder_build_info{device="cuda:0",model="abc",provider="CPUExecutionProvider",version="1.0"} 1.0' in text
    assert 'hitfinder_stage_duration_seconds_bucket{le="5e-05",stage="infer"} 0.0' in text


# ---- batching and seq ---------------------------------------------------------------------------------------
def test_batcher_fills_up_to_max_size_and_stops_at_the_end() -> None:
    q: queue.Queue[int | None] = queue.Queue()
    for i in range(7):
        q.put(i)
    q.put(None)
    b = Batcher(q, max_size=3, max_wait_s=0.0)
    assert [b.next(1.0) for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [6]]
    assert b.ended and b.next(1.0) == []


def test_batcher_waits_for_company_then_goes() -> None:
    q: queue.Queue[int | None] = queue.Queue()
    b = Batcher(q, max_size=4, max_wait_s=5.0)
    q.put(1)

    def later() -> None:  # one thread: the frame comes before the end, however loaded the machine
        time.sleep(0.05)
        q.put(2)
        q.put(None)

    threading.Thread(target=later).start()
    assert b.next(1.0) == [1, 2]  # the second came within the wait; the end closed the batch
    assert b.ended
    assert Batcher(queue.Queue(), 4, 0.0).next(0.01) == []  # idle: nothing, not ended


class _Waits(queue.Queue[int | None]):
    """A queue that says how long each `get` was willing to wait, and has nothing more after its first item."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def get(self, block: bool = True, timeout: float | None = None) -> int | None:
        self.waits.append(timeout if block else 0.0)
        if self.qsize():
            return super().get(False)
        raise queue.Empty


def test_a_lone_frame_waits_for_company_no_longer_than_max_wait() -> None:
    """The latency bound: after the first frame the batcher never waits for more beyond `max_wait_s`."""
    q = _Waits()
    q.put(1)
    assert Batcher(q, max_size=8, max_wait_s=0.004).next(idle_s=30.0) == [1]
    first, *after = q.waits
    assert first == 30.0 and after and all(w is not None and w <= 0.004 for w in after), q.waits


def test_the_last_line_names_a_shifts_decision_logs_by_their_folder() -> None:
    assert logs_said([]) == "none" and logs_said(["d/a.h5", "d/b.h5"]) == "d/a.h5, d/b.h5"
    shift = [f"/data/decisions/r{run:04d}.h5" for run in range(1, 301)]
    assert logs_said(shift) == "300 in /data/decisions, the last /data/decisions/r0300.h5"
    assert logs_said(["a/1.h5", "b/2.h5", "a/3.h5", "b/4.h5"]) == "4 in 2 folders, the last b/4.h5"


def test_seq_tracker_reports_gaps_and_restarts() -> None:
    t = SeqTracker()
    for s, instance in [(0, "a"), (1, "a"), (2, "a"), (5, "a"), (6, "a"), (9, "a"), (0, "b"), (1, "b")]:
        t.see(s, instance)
    assert [(g.expected, g.got) for g in t.gaps] == [(3, 5), (7, 9)]
    assert t.missing == 4 and t.restarts == 1 and t.first == 0
    late = SeqTracker()
    for s in [7, 8]:
        late.see(s, "a")
    assert late.first == 7 and late.gaps == []  # what went out before it connected is not a gap
    restarted = SeqTracker()
    for s, instance in [(0, "a"), (1, "a"), (2, "a"), (3, "a"), (4, "a"), (3, "b"), (4, "b")]:
        restarted.see(s, instance)  # the new service's 0..2 never came
    assert restarted.restarts == 1 and [(g.expected, g.got) for g in restarted.gaps] == [(0, 3)]


def test_seq_tracker_tells_a_restart_by_the_instance_whatever_seq_the_new_one_reached() -> None:
    """A subscriber that reconnects after the new service has passed the old one's seq: by seq alone 5..8 would
    look lost from the old service (a gap of 4) and no restart; the new instance says restart, and 0..8 lost."""
    t = SeqTracker()
    for s in range(5):
        t.see(s, "old")
    t.see(9, "new")
    assert t.restarts == 1 and [(g.expected, g.got) for g in t.gaps] == [(0, 9)]
    t.see(10, "new")
    assert t.restarts == 1 and t.missing == 9
    beat = SeqTracker()  # a new instance's heartbeat before any of its decisions reached the subscriber
    beat.see(0, "old")
    gap = beat.expect(6, "new")
    assert beat.restarts == 1 and gap is not None and (gap.expected, gap.got) == (0, 6)
    beat.see(6, "new")
    assert beat.restarts == 1 and beat.missing == 6


def test_seq_tracker_takes_the_next_seq_that_heartbeats_and_run_ends_announce() -> None:
    """Decisions lost at the end of a stream show no later seq; the heartbeat's next_seq does."""
    t = SeqTracker()
    for s in range(7):
        t.see(s, "a")
    assert t.expect(7, "a") is None and t.expect(5, "a") is None  # nothing lost; an older announcement: nothing
    gap = t.expect(10, "a")
    assert gap is not None and (gap.expected, gap.got) == (7, 10) and t.missing == 3  # 7, 8 and 9
    t.see(10, "a")  # announced as next: it is no gap nor restart
    assert t.missing == 3 and t.restarts == 0
    joined = SeqTracker()
    assert joined.expect(5, "a") is None  # joined: nothing seen yet, nothing lost
    gap = joined.see(8, "a")  # but 5, 6 and 7 were announced, and never came
    assert gap is not None and (gap.expected, gap.got) == (5, 8) and joined.first == 8


def test_a_client_refuses_a_topic_no_message_has() -> None:
    """A misspelt topic is a ZeroMQ prefix nothing matches: the client waited for ever, saying nothing."""
    from lcls_hitfinder.service.client import DecisionClient

    with pytest.raises(ValueError, match=r"^topics \['decisions'\] are not among \['decision', 'heartbeat', 'run'\]$"):
        DecisionClient("tcp://127.0.0.1:5556", ("decisions",))


def test_a_client_counts_the_decisions_lost_at_a_runs_end_from_the_run_end_message() -> None:
    """Decisions lost at the end of a run show in no later seq; the run end, first_seq + events, says how many
    the run had. Over real sockets: the service's publisher, the Python client."""
    from lcls_hitfinder.service.client import DecisionClient
    from lcls_hitfinder.service.publish import ZmqPublisher

    instance = _decision(0)["instance"]
    end = {f.name: None for f in messages.FIELDS[messages.RUN]}
    end.update(instance=instance, phase="end", first_seq=0, events=7)  # decisions 0-6; 5 and 6 never sent
    publisher = ZmqPublisher("tcp://127.0.0.1:*")
    try:
        with DecisionClient(publisher.endpoint, (messages.DECISION, messages.RUN), timeout_s=60) as client:
            deadline = time.monotonic() + 60  # a deadline against hanging, never a speed requirement
            while publisher.subscriptions < 2:  # both topics subscribed: nothing published is missed
                assert time.monotonic() < deadline, "the client never subscribed"
                time.sleep(0.01)
            for seq in range(5):
                publisher.publish(messages.DECISION, _decision(seq))
            publisher.publish(messages.RUN, end)
            got = []
            for topic, payload in client.messages():
                got.append((topic, payload.get("seq")))
                if topic == messages.RUN:
                    break
    finally:
        publisher.close()
    assert got == [*((messages.DECISION, seq) for seq in range(5)), (messages.RUN, None)]
    assert [(g.expected, g.got) for g in client.gaps] == [(5, 7)] and client.tracker.missing == 2


# ---- providers ----------------------------------------------------------------------------------------------
SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "embedder.onnx"


def test_provider_preference_follows_what_the_build_offers() -> None:
    gpu_build = [TENSORRT, CUDA, CPU]
    assert select_providers(None, gpu_build) == [TENSORRT, CUDA, CPU]
    assert select_providers(None, [CUDA, CPU]) == [CUDA, CPU]
    assert select_providers(None, ["AzureExecutionProvider", CPU]) == [CPU]
    assert select_providers(["cuda", "cpu"], gpu_build) == [CUDA, CPU]
    assert select_providers(["tensorrt"], gpu_build) == [TENSORRT, CPU]  # the CPU is always the last resort
    for typo in ("cdua", "FooExecutionProvider", "CudaExecutionProvider"):  # not the CPU in silence
        with pytest.raises(UserError, match=f"unknown onnxruntime provider '{typo}'"):
            select_providers([typo], gpu_build)


def test_tensorrt_engines_are_cached_per_model_and_batch_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime names a cached engine by the model's file name and graph, not its weights: a retrained
    model of the same name must not find the old model's engine, nor another batch range rebuild it."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    info = read_model_info(SHIPPED_MODEL)
    retrained = dataclasses.replace(info, model_hash="0123456789abcdef")

    def cache(model: ModelInfo, max_batch: int) -> str:
        options = provider_options(TENSORRT, model, max_batch, 0)
        assert options["trt_profile_max_shapes"] == f"thumbnail:{max_batch}x1x64x64"
        return str(options["trt_engine_cache_path"])

    assert cache(info, 32) == cache(info, 32) == str(tmp_path / "lcls-hitfinder/tensorrt" / info.model_hash / "batch32")
    assert len({cache(info, 32), cache(retrained, 32), cache(info, 64)}) == 3
    assert provider_options(CPU, info, 32, 0) == {}


def test_a_provider_the_build_lacks_is_said(caplog: pytest.LogCaptureFixture) -> None:
    assert select_providers(["cuda"], [CPU]) == [CPU]
    assert "onnxruntime provider CUDAExecutionProvider is not in this build" in caplog.text


# ---- sources ------------------------------------------------------------------------------------------------
def test_cxi_frames_with_mask_and_repeat(tmp_path: Path) -> None:
    path = tmp_path / "run.cxi"
    data = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    bad = np.zeros((4, 5), np.uint16)
    bad[0, 0] = 1  # CXI: non-zero = bad pixel
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = data
        f["/entry_1/data_1/mask"] = bad
    src = open_source(f"h5:{path}?repeat=2&experiment=cxilr1234&run=5", ServeSettings())
    src.open()
    assert src.frame_shape == (4, 5) and src.mask is not None
    assert not src.mask[0, 0] and src.mask.sum() == 19
    frames = [f for f in src.frames() if f is not None]
    src.close()
    assert [f.event.event for f in frames] == list(range(6))
    assert {(f.event.experiment, f.event.run) for f in frames} == {("cxilr1234", 5)}
    np.testing.assert_array_equal(frames[4].data, data[1])
    assert frames[0].data.dtype == np.uint16 and frames[0].truth_n_particles is None


def test_a_cxi_file_of_lcls_hits_gives_each_decision_its_recorded_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """/LCLS/machineTime, machineTimeNanoSeconds (psana1's unix time of the event), fiducial and eventNumber,
    as Cheetah, psocake and OM write them: the event's psana timestamp, pulse id and number, on every pass.
    Columns of another length than the frames (a file still being written) are said; frames numbered then."""
    path = tmp_path / "cxilr1234-r0005.cxi"
    seconds, nanoseconds = [1_700_000_000, 1_700_000_000, 1_700_000_001], [5, 8_333_338, 7]
    with h5py.File(path, "w") as f:
        f["/entry_1/data_1/data"] = np.zeros((3, 4, 5), np.uint16)
        f["/LCLS/machineTime"] = np.array(seconds, np.int32)
        f["/LCLS/machineTimeNanoSeconds"] = np.array(nanoseconds, np.int32)
        f["/LCLS/fiducial"] = np.array([360, 363, 9], np.int32)
        f["/LCLS/eventNumber"] = np.array([17, 18, 140], np.int64)
    src = open_source(f"h5:{path}?repeat=2&run=5", ServeSettings())
    src.open()
    events = [f.event for f in src.frames() if f is not None]
    src.close()
    expected = [psana_timestamp(s * 10**9 + ns) for s, ns in zip(seconds, nanoseconds, strict=True)]
    assert [e.timestamp for e in events] == expected * 2
    assert [(e.event, e.pulse_id) for e in events] == [(17, 360), (18, 363), (140, 9)] * 2
    assert {(e.experiment, e.run) for e in events} == {("cxilr1234-r0005", 5)}

    with h5py.File(path, "a") as f:
        del f["/LCLS/fiducial"]
        f["/LCLS/fiducial"] = np.zeros(2, np.int32)
    src = open_source(f"h5:{path}", ServeSettings())
    with caplog.at_level(logging.WARNING):
        src.open()
    events = [f.event for f in src.frames() if f is not None]
    src.close()
    assert [(e.event, e.pulse_id) for e in events] == [(0, None), (1, None), (2, None)]
    assert "/LCLS/fiducial (2,) for 3 frames: events numbered by position" in caplog.text


def test_an_h5_file_that_is_neither_format_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(UserError, match="neither a dataset file nor CXI"):
        open_source(f"h5:{path}", ServeSettings()).open()


def test_sim_source_streams_labelled_patterns(tmp_path: Path) -> None:
    config = tmp_path / "sim.toml"
    config.write_text("[simulate.detector]\nshape = [32, 48]\n")
    src = open_source(f"sim:?rate=0&n=20&seed=3&run=9&config={config}", ServeSettings())
    src.open()
    frames = [f for f in src.frames() if f is not None]
    src.close()
    assert src.frame_shape == (32, 48) and src.mask is not None and src.mask.shape == (32, 48)
    assert len(frames) == 20 and [f.event.event for f in frames] == list(range(20))
    assert all(f.data.shape == (32, 48) and f.event.run == 9 for f in frames)
    truth = [f.truth_n_particles for f in frames]
    assert all(t is not None and 0 <= t <= 4 for t in truth) and len(set(truth)) > 1


def test_sim_source_takes_the_seed_of_its_config_unless_the_uri_gives_one(tmp_path: Path) -> None:
    def truth(uri: str) -> list[int | None]:
        src = open_source(uri, ServeSettings())
        src.open()
        frames = [f.truth_n_particles for f in src.frames() if isinstance(f, Frame)]
        src.close()
        return frames

    config = tmp_path / "sim.toml"
    config.write_text("[simulate]\nseed = 99\n[simulate.detector]\nshape = [16, 16]\n")
    plain = tmp_path / "plain.toml"
    plain.write_text("[simulate.detector]\nshape = [16, 16]\n")
    from_file = truth(f"sim:?rate=0&n=30&config={config}")
    assert from_file == truth(f"sim:?rate=0&n=30&seed=99&config={plain}")
    assert from_file != truth(f"sim:?rate=0&n=30&config={plain}")  # seed 0
    assert truth(f"sim:?rate=0&n=30&seed=0&config={config}") == truth(f"sim:?rate=0&n=30&config={plain}")


# ---- settings and the decision log --------------------------------------------------------------------------
def test_serve_settings_from_a_file_with_overrides(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serve]\nsource = "h5:x.h5"\n[serve.batch]\nmax_size = 64\n')
    s = load_config(cfg, {"serve.publish.endpoint": "tcp://0.0.0.0:7000"}).serve
    assert (s.source, s.batch.max_size, s.publish.endpoint) == ("h5:x.h5", 64, "tcp://0.0.0.0:7000")


@pytest.mark.parametrize(
    ("experiment", "name"),
    [
        ("tmoc00123", "tmoc00123"),
        ("run.v2", "run.v2"),
        ("sub/dir", "sub_dir"),
        ("../../etc", "_.._etc"),
        ("", "_"),
        ("x" * 300, "x" * 48),  # a file name holds 255 bytes at most
        ("実験" * 100, "実験" * 24),  # 3 bytes a letter in UTF-8
    ],
)
def test_a_runs_log_is_one_file_in_the_log_folder_whatever_the_experiment_is_called(
    tmp_path: Path, experiment: str, name: str
) -> None:
    from lcls_hitfinder.service.decision_log import log_path

    path = log_path(tmp_path / "logs", experiment, 7)
    assert path.parent == tmp_path / "logs" and path.name.startswith(f"{name}-r0007-") and path.suffix == ".h5"
    (tmp_path / "logs").mkdir()
    path.touch()  # a name the file system takes
    again = log_path(tmp_path / "logs", experiment, 7)  # never the existing file, in the same second or not
    assert again.parent == path.parent and again != path and again.suffix == ".h5"


def test_two_services_beginning_one_run_in_the_same_second_get_a_log_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two detectors of one experiment served on one node begin the same run together: the name one service
    picked may be taken by the other before it creates the file. That file is the other's, whole; this one
    takes the next name (with "w" it truncated the other's log under it)."""
    from lcls_hitfinder.service import decision_log

    logs = tmp_path / "logs"
    first = DecisionLog(decision_log.claim_log(logs, "mfx101", 7), {"instance": "a"})
    first.append(log_rows(2))
    first.flush()
    picked = iter([first.path])  # the other service's file, named before it was made, as in the race
    real = decision_log.log_path
    monkeypatch.setattr(decision_log, "log_path", lambda *a: next(picked, None) or real(*a))
    second = DecisionLog(decision_log.claim_log(logs, "mfx101", 7), {"instance": "b"})
    assert second.path != first.path and second.path.parent == logs.resolve()
    first.close({"events": 2})
    second.close({"events": 0})
    columns, attrs = read_decision_log(first.path)
    assert len(columns["seq"]) == 2 and attrs["instance"] == "a" and attrs["complete"]
    assert read_decision_log(second.path)[1]["instance"] == "b"


def test_a_runs_log_path_is_absolute_and_a_log_that_cannot_be_made_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run messages carry the path to subscribers that run elsewhere; a log without its columns is no log."""
    from lcls_hitfinder.service.decision_log import log_path

    monkeypatch.chdir(tmp_path)
    path = log_path(Path("logs"), "x", 1)
    assert path.is_absolute() and path.parent == tmp_path.resolve() / "logs"
    with pytest.raises(TypeError):
        DecisionLog(tmp_path / "bad.h5", {"experiment": object()})  # an attribute HDF5 cannot hold
    assert not (tmp_path / "bad.h5").exists()


def test_decision_log_that_cannot_be_created_leaves_no_file(tmp_path: Path) -> None:
    """A disk with no room at a run's start (a file size limit of 0 here: no disk can be filled in a test):
    HDF5 created the file and failed to write it, and an empty .h5 stayed for `summary` to trip over."""
    script = (
        "import pathlib, resource, sys\n"
        "from lcls_hitfinder.service.decision_log import DecisionLog\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))\n"
        "try:\n"
        "    DecisionLog(pathlib.Path(sys.argv[1]), {'experiment': 'x', 'run': 1})\n"
        "except OSError as err:\n"
        "    print('refused', type(err).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "r.h5")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "refused OSError", done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_decision_log_removed_during_the_run_is_said_at_its_next_flush(tmp_path: Path, how: str) -> None:
    """A log folder cleaned up during a run: the rows went on into a file no one could read, and the loss was
    said only when the run ended (hours later), by a failed reopen."""
    log = DecisionLog(tmp_path / "r.h5", {"experiment": "x", "run": 1})
    cols = log_rows(3)
    log.append(cols)
    log.flush()
    (tmp_path / "r.h5").unlink()
    if how == "replaced":
        (tmp_path / "r.h5").write_bytes(b"")
    log.append(cols)
    with pytest.raises(OSError, match=r"r\.h5 was removed or replaced while the run was being logged$"):
        log.flush()


def test_decision_log_appends_flushes_and_records_totals(tmp_path: Path) -> None:
    log = DecisionLog(tmp_path / "r.h5", {"experiment": "x", "run": 1})
    for lo in (0, 3):
        cols = log_rows(3)
        cols["seq"] = np.arange(lo, lo + 3)
        log.append(cols)
        assert log.n == lo  # held until the writer process flushes (every second)
        log.flush()
        assert log.n == lo + 3
        # another process reads the log while it is being written (SWMR), as a user's script would
        read = subprocess.run(
            [sys.executable, "-c", READ_LOG, str(tmp_path / "r.h5")], capture_output=True, text=True, timeout=60
        )
        assert read.returncode == 0, read.stderr
        assert read.stdout.split() == [str(lo + 2), "False"]
    holder = subprocess.Popen(  # a user's script that still has the log open when the run ends
        [sys.executable, "-c", HOLD_LOG, str(tmp_path / "r.h5")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        log.close({"events": 6, "counts": {"blank": 6}})  # HDF5's file lock must not cost the totals
    finally:
        holder.communicate("", timeout=60)
    columns, attrs = read_decision_log(tmp_path / "r.h5")
    assert columns["seq"].tolist() == list(range(6))
    assert attrs["complete"] and attrs["events"] == 6 and attrs["counts"] == '{"blank": 6}'


HOLD_LOG = """
import sys, h5py
f = h5py.File(sys.argv[1], "r", swmr=True)
print("open", flush=True)
sys.stdin.read()
"""

READ_LOG = """
import sys
from lcls_hitfinder.service.decision_log import read_decision_log
columns, attrs = read_decision_log(sys.argv[1])
print(columns["seq"][-1], attrs["complete"])
"""


def test_preprocessing_in_place_never_touches_the_callers_frames() -> None:
    """Preprocessor.photons works in place for speed, on its own copy unless the caller hands its tensor over."""
    import torch

    from lcls_hitfinder.preprocess import PhotonCalibration, Preprocessor, PreprocessSettings

    frames = torch.tensor(np.random.default_rng(0).normal(2.0, 3.0, (2, 8, 8)), dtype=torch.float32)
    before = frames.clone()
    calibration = PhotonCalibration(gain=2.0, offset=1.0, threshold=0.5)
    photons = Preprocessor(PreprocessSettings(thumbnail=4, clip_photons=3.0), None, (8, 8), calibration).photons(frames)
    torch.testing.assert_close(frames, before)
    expected = ((before - 1.0) / 2.0).clamp_min(0.0)
    expected = torch.where(expected < 0.5, 0.0, expected).clamp_max(3.0)
    torch.testing.assert_close(photons, expected)
    pre = Preprocessor(PreprocessSettings(thumbnail=4, clip_photons=3.0), None, (8, 8), calibration)
    handed_over = before.clone()
    assert pre.photons(handed_over, inplace=True).data_ptr() == handed_over.data_ptr()  # no copy when asked
    torch.testing.assert_close(handed_over, expected)


# ---- pre-filter and finiteness checks ------------------------------------------------------------------------
def test_lit_pixel_prefilter_counts_each_frame_exactly() -> None:
    import torch

    from lcls_hitfinder.service.binning import Prefilter
    from lcls_hitfinder.service.settings import PrefilterSettings

    photons = torch.zeros(4, 32, 32)
    for i, lit in enumerate((0, 19, 20, 500)):  # lit pixels per frame, around min_lit_pixels = 20
        photons[i].view(-1)[:lit] = 0.51
    photons[1].view(-1)[100:200] = 0.5  # not above the threshold: not lit
    p = PrefilterSettings(kind="lit_pixels", lit_threshold=0.5, min_lit_pixels=20)
    prefilter = Prefilter(p)
    assert prefilter.measure(photons).tolist() == [0, 19, 20, 500]
    assert prefilter.blank(prefilter.measure(photons)).tolist() == [True, True, False, False]


@pytest.mark.parametrize("dtype", ["uint16", "int16", "uint8", "float32", "float64", "uint32"])
def test_lit_pixels_counted_on_raw_frames_equal_those_counted_on_photons(dtype: str) -> None:
    """Wherever the pre-filter offers to count raw frames, the count must be the one on photons, pixel for
    pixel: over calibrations, masks, clips and thresholds that sit on and beside integer values."""
    import torch

    from lcls_hitfinder.preprocess import PhotonCalibration, Preprocessor, PreprocessSettings
    from lcls_hitfinder.service.binning import Prefilter
    from lcls_hitfinder.service.settings import PrefilterSettings

    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        raw = rng.normal(1.0, 2.0, (3, 16, 16)).astype(dtype)
        raw[0, :4] = np.float32(3.0)  # exactly on a threshold below
    else:
        info = np.iinfo(dtype)
        raw = rng.integers(max(info.min, -5), min(info.max, 9), (3, 16, 16), endpoint=True).astype(dtype)
    mask = np.ones((16, 16), bool)
    mask[2:5] = False
    offered = 0
    for threshold in (0.0, 0.5, 2.9999999999, 3.0, 1e9):
        prefilter = Prefilter(PrefilterSettings(lit_threshold=threshold, min_lit_pixels=10))
        for calibration, clip, m in [
            (PhotonCalibration(), None, None),
            (PhotonCalibration(threshold=0.5), 4.0, None),
            (PhotonCalibration(threshold=3.5), None, None),
            (PhotonCalibration(gain=2.0), None, None),
            (PhotonCalibration(offset=1.0), None, None),
            (PhotonCalibration(), 2.0, None),
            (PhotonCalibration(), None, mask),
        ]:
            pre = Preprocessor(PreprocessSettings(thumbnail=4, clip_photons=clip), m, (16, 16), calibration)
            count = prefilter.raw_count(pre, {raw.dtype})
            if count is None:
                continue
            offered += 1
            photons = pre.photons(torch.from_numpy(raw))
            on_photons = [int((p > threshold).sum()) for p in photons]
            assert [count(f) for f in raw] == on_photons, (threshold, calibration, clip)
    # offered for the data the service sees (raw uint16, photons in float32), refused where float32 rounds
    assert (offered > 0) == (dtype in ("uint16", "int16", "uint8", "float32"))


def test_all_finite_finds_nan_and_inf_and_is_not_fooled_by_an_overflowing_sum() -> None:
    import torch

    from lcls_hitfinder.preprocess import all_finite

    frames = torch.ones(5, 16, 16)
    frames[1, 3, 4] = float("nan")
    frames[2, 0, 0] = float("inf")
    frames[3, 5, 5] = -float("inf")
    frames[4] = 3e38  # every value finite, their float32 sum is not
    assert torch.isinf(frames[4].sum())
    assert all_finite(frames).tolist() == [True, False, False, False, True]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("event,count\n3,1\n", "needs a column event or timestamp, and n_particles or label"),
        ("event,label\n", "no events listed"),
        ("event,label\n3,maybe\n", "line 2: label 'maybe' is not one of blank, single, multi"),
        ("event,n_particles\n3,7\n", "line 2: n_particles '7' is not a count of 0-4"),
        ("event,n_particles\nx,1\n", "line 2: run and event must be whole numbers"),
        ("run,timestamp,label\n1,5,single\n1,5,multi\n", "line 3: timestamp 5 is picked twice"),
        ("run,event,label\n,4,single\n0,4,single\n", "line 3: event 4 is picked twice"),  # in any run, and in 0
        ("event,label\n4,single\n\n12,maybe\n", "line 4: label 'maybe'"),  # blank lines count
        # the decision log's columns: a label corrected by eye must not be overruled by the model's count
        ("event,label,n_particles\n4,single,2\n", "line 2: label single and n_particles 2 disagree"),
        ("event,label,n_particles\n4,,\n", "line 2: neither a label nor n_particles"),
    ],
)
def test_picks_files_are_checked_line_by_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.csv").write_text(text)
    with pytest.raises(UserError, match=re.escape(message)):
        read_picks(tmp_path / "p.csv", timestamps=True)


def test_picks_saved_by_a_spreadsheet_with_a_byte_order_mark(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("\ufeffevent,label\n3,single\n", encoding="utf-8")
    assert read_picks(tmp_path / "p.csv", timestamps=True).counts == {(None, 3): 1}


def test_picks_with_label_and_count_take_the_count_where_they_agree(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("event,label,n_particles\n1,multi,3\n2,single,\n3,,0\n")
    assert read_picks(tmp_path / "p.csv", timestamps=True).counts == {(None, 1): 3, (None, 2): 1, (None, 3): 0}


def test_picks_take_each_event_once_by_run_or_in_any_run(tmp_path: Path) -> None:
    (tmp_path / "p.csv").write_text("run,event,label\n2,5,single\n,7, multi \n")
    picks = read_picks(tmp_path / "p.csv", timestamps=True)
    assert picks.take(run=1, event=5, timestamp=0) is None  # event 5 of run 2 only
    assert picks.take(run=2, event=5, timestamp=0) == 1 and picks.take(run=2, event=5, timestamp=0) is None
    assert picks.take(run=9, event=7, timestamp=0) == 2 and picks.counts == {}  # no run given: any run's


def test_listen_says_why_a_run_ended() -> None:
    """A run cut short (a stop, max_events) is told from a whole one on listen's run lines."""
    from lcls_hitfinder.service.commands import _human

    end = {"phase": "end", "experiment": "cxi", "run": 7, "events": 40, "counts": {"single": 40}, "log": None}
    assert _human("run", {**end, "ended": "max_events"}).startswith("run end (max_events): cxi:7, 40 events")
    assert _human("run", {**end, "phase": "begin", "ended": None}).startswith("run begin: cxi:7")


def test_summary_of_a_log_just_begun(tmp_path: Path) -> None:
    """A run whose log holds no decision yet: said so, and its CSV and picture are written, empty."""
    log_file = tmp_path / "run.h5"
    log = DecisionLog(log_file, {"experiment": "mfxl1012345", "run": 17})
    log.flush()
    try:
        result = CliRunner().invoke(
            app, ["summary", str(log_file), "--csv", str(tmp_path / "r.csv"), "--plot", str(tmp_path / "r.png")]
        )
    finally:
        log.close()
    assert result.exit_code == 0, result.output
    assert "mfxl1012345:17: 0 decisions, log still being written" in result.output
    assert (tmp_path / "r.csv").read_text().splitlines() == ["run,event,timestamp,label,score"]
    assert (tmp_path / "r.png").stat().st_size > 0


def test_summary_agrees_with_the_truth_as_the_service_counts_it() -> None:
    """An `error` decision is no answer: left out of the agreement, as the service's status line leaves it."""
    from lcls_hitfinder.service.log_summary import summarise

    columns = {
        "seq": np.arange(3),
        "label": np.array(["single", "error", "blank"], dtype=object),
        "decision": np.array(["keep", "veto", "veto"], dtype=object),
        "time_ns": np.array([0, 10**9, 2 * 10**9]),
        "latency_us": np.array([1000, 2000, 3000]),
        "truth_n_particles": np.array([1, 1, 2]),
    }
    run = summarise(columns, {"experiment": "sim", "run": 1, "complete": True, "ended": "source_end"})
    assert run.truth_agree == (1, 2) and run.keep == 1 and run.rate_hz == 1.0


def test_summary_says_the_share_of_singles_among_what_the_bank_judged() -> None:
    """`bank build --single-fraction` wants singles among the events the bank judges: the pre-filter's blanks
    and errors never reached it."""
    from lcls_hitfinder.service.log_summary import summarise

    labels = ["single", "blank", "blank", "multi", "error", "blank", "single", "blank"]
    reasons = ["", "prefilter", "prefilter", "", "nonfinite", "", "", "prefilter"]
    columns = {
        "seq": np.arange(8),
        "label": np.array(labels, dtype=object),
        "reason": np.array(reasons, dtype=object),
        "decision": np.array(["keep" if x == "single" else "veto" for x in labels], dtype=object),
        "time_ns": np.arange(8) * 10**8,
        "latency_us": np.full(8, 1000),
        "truth_n_particles": np.full(8, -1),
    }
    run = summarise(columns, {"experiment": "sim", "run": 1})
    assert run.prefilter == 3
    said = "the bank judged 4 (the pre-filter called 3 blank): 2 single, 0.5 of them (bank build --single-fraction"
    assert any(line.startswith(said) for line in run.lines()), run.lines()


def test_the_rate_of_a_run_decided_in_batches() -> None:
    """Decisions of one batch share its time: 4 batches of 32, a second apart, are 32 Hz, not 95/3 = 42 Hz
    (the first batch's 32 were decided at the start of the interval, not in it)."""
    from lcls_hitfinder.service.log_summary import summarise

    n = 128
    columns = {
        "seq": np.arange(n),
        "label": np.full(n, "blank", dtype=object),
        "decision": np.full(n, "veto", dtype=object),
        "time_ns": np.repeat(np.arange(4) * 10**9, 32),
        "latency_us": np.full(n, 1000),
        "truth_n_particles": np.full(n, -1),
    }
    assert summarise(columns, {}).rate_hz == 32.0


def test_systemd_notifications_reach_its_socket_and_a_dead_one_is_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Outside systemd nothing is sent; a socket that is gone (systemd restarted, a stale variable) is warned
    about once, not at every status line of a long run."""
    import socket

    from lcls_hitfinder.service import systemd

    monkeypatch.setattr(systemd, "_failed", threading.Event())
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not systemd.notify("READY=1")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(f"\0lhf-notify-test-{time.monotonic_ns()}")
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + sock.getsockname()[1:].decode())
        assert systemd.notify("READY=1", "STATUS=serving")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving"
    monkeypatch.setenv("NOTIFY_SOCKET", f"@lhf-nobody-listens-{time.monotonic_ns()}")
    assert not systemd.notify("STATUS=1") and not systemd.notify("STATUS=2")
    assert caplog.text.count("cannot notify systemd at @lhf-nobody-listens-") == 1
