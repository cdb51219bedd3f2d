"""The `[serve]` config section: source, model, bank, batching, publishing, metrics and logging."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from lcls_hitfinder.preprocess import PhotonCalibration
from lcls_hitfinder.service.messages import tcp_port_checked
from lcls_hitfinder.settings_base import Section


def _false_is_none(value: object) -> object:
    """TOML has no null: `false` switches a feature off as null does in YAML (and `true` is refused)."""
    if value is True:
        raise ValueError("true is not a value here; false (or null in YAML) switches it off")
    return None if value is False else value


def _not_empty(value: object) -> object:
    """An empty path is the current folder to pathlib: decision logs written wherever the service was started."""
    if isinstance(value, str) and not value.strip():
        raise ValueError("empty: give a path (false switches an optional one off)")
    return value


def _expanded(path: Path | None) -> Path | None:
    """`~` in a config file's paths, as a shell would expand it on the command line: once, here, so that the
    folder checked at start-up is the folder written."""
    return None if path is None else path.expanduser()


class BatchSettings(Section):
    """Dynamic batching: a batch goes out when full or when its first frame has waited `max_wait_ms`."""

    max_size: int = Field(32, ge=1, le=4096, description="most frames per inference batch")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,  # a second at most: a batch's wait shows in every one of its frames' latency
        description="longest a frame waits for its batch to fill; 0: take what is waiting (lowest latency, "
        "batches still grow when the service falls behind); at most 1000",
    )


class PrefilterSettings(Section):
    """The cheap blank test before the model: frames below the cut are labelled blank without inference."""

    kind: Literal["lit_pixels", "photons", "none"] = Field(
        "lit_pixels", description="count lit pixels, sum photons, or send every frame to the model"
    )
    lit_threshold: float = Field(0.5, ge=0, description="photons above which a pixel is lit")
    min_lit_pixels: int = Field(20, ge=0, description="fewer lit pixels than this: blank")
    min_photons: float = Field(50.0, ge=0, description="fewer photons in total than this: blank")


class PublishSettings(Section):
    endpoint: str = Field("tcp://127.0.0.1:5556", description="ZeroMQ endpoint the PUB socket binds")
    _port = field_validator("endpoint")(tcp_port_checked)
    sndhwm: int = Field(100_000, ge=1, description="messages queued per subscriber before ZeroMQ drops")
    heartbeat_s: float = Field(1.0, gt=0, description="seconds between heartbeat messages")
    wait_for_subscriber_s: float = Field(
        0.0, ge=0, description="at start-up, wait up to this long for a first subscriber before reading"
    )


class MetricsSettings(Section):
    port: int | None = Field(
        9108, ge=0, le=65535, description="HTTP port of /metrics (0: any free one); false or null: no /metrics"
    )
    host: str = Field("127.0.0.1", description="address /metrics binds; 0.0.0.0 exposes it to the network")

    _off = field_validator("port", mode="before")(_false_is_none)


class ReaderSettings(Section):
    """Supervision of readers that run in a child process (psana): stall detection and restarts."""

    stall_s: float = Field(
        5.0,
        gt=0,
        description="seconds without a heartbeat from the reader (or an MPI rank) while the source opens or a run "
        "is open: restart",
    )
    stuck_s: float = Field(
        60.0,
        gt=0,
        description="once the reader or one MPI rank has finished, seconds the job may go without progress (an "
        "event read or handed over, a wait for the service, a process ending): restart. MPI ranks that wait on "
        "each other for ever keep beating",
    )
    backoff_s: float = Field(1.0, gt=0, description="first delay before a restart, doubled each time")
    max_backoff_s: float = Field(30.0, gt=0, description="longest delay between restarts")
    give_up_after: int = Field(
        5,
        ge=1,
        description="a file or run (not live data) whose reader fails this many times in a row without "
        "delivering a frame is an error; live data are restarted for as long as the service runs",
    )
    ring_slots: int = Field(
        64,
        ge=2,
        le=4096,
        description="frames in the shared-memory ring between a psana reader and the service (/dev/shm: this "
        "x frame size; fewer, said, where /dev/shm has no room for them); up to 3/4 of them are lent to the "
        "pipeline, so with overflow = block they are its buffer",
    )
    bin_in_reader: Literal["shared", "always", "never"] = Field(
        "shared",
        description="with preprocessing on the CPU, a psana reader process (each MPI rank) converts, checks, "
        "counts and bins frames itself, with the service's code, and sends the bins instead of the frame: "
        "shared = while the service is behind (more than a quarter of the ring out), always = every frame, "
        "never = frames cross whole (a GPU always takes them whole)",
    )


class ServeSettings(Section):
    """Everything `lcls-hitfinder serve` needs; each CLI flag overrides one key here."""

    source: str = Field("sim:?rate=120", description="source URI: xtc2:, shmem:, exp:, psana1:, h5:, sim:")
    model: Path | None = Field(None, description="embedder ONNX file; default: the shipped models/embedder.onnx")
    bank: Path | None = Field(None, description="reference bank file; default: the shipped models/bank.h5")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where preprocessing runs: auto (CUDA when torch sees a GPU), cpu or cuda"
    )
    providers: list[str] | None = Field(
        None, min_length=1, description="onnxruntime providers in order of preference; default TensorRT, CUDA, CPU"
    )
    threads: int = Field(
        0,
        ge=0,
        le=256,
        description="threads that preprocess frames on the CPU (one frame each) and onnxruntime's intra-op "
        "threads, at most 256; 0 = the cores, less one for each process reading a psana source (its reader "
        "child, or its MPI ranks), at least one",
    )
    calibration: PhotonCalibration = Field(default_factory=PhotonCalibration)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    prefilter: PrefilterSettings = Field(default_factory=PrefilterSettings)
    publish: PublishSettings = Field(default_factory=PublishSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    reader: ReaderSettings = Field(default_factory=ReaderSettings)
    log_dir: Path | None = Field(Path("decisions"), description="folder of per-run decision logs; false or null: none")
    queue_size: int = Field(
        256,
        ge=1,
        description="frames buffered between the reader and the batcher (memory: this x frame size, held to 1 GiB "
        "of float32 frames where the source states their size; a psana source's frames wait in its ring instead, "
        "see reader.ring_slots)",
    )
    overflow: Literal["block", "drop"] = Field(
        "block",
        description="when that buffer is full: block the reader (a live psana source then skips events "
        "upstream), or keep reading and drop (counted in hitfinder_dropped_events_total)",
    )
    max_events: int | None = Field(None, ge=1, description="stop after this many events (tests, dry runs)")
    status_s: float = Field(10.0, ge=0, description="seconds between status lines in the log; 0: none")
    bank_poll_s: float = Field(
        1.0,
        gt=0,
        description="seconds between checks of the bank file for changes (at most one per publish.heartbeat_s)",
    )

    @field_validator("providers")
    @classmethod
    def _known_providers(cls, names: list[str] | None) -> list[str] | None:
        """Named with its key when the config is read, before the service binds a port or loads the model."""
        if names is not None:
            from lcls_hitfinder.embedder import full_provider_name  # onnxruntime: only when asked

            for name in names:
                full_provider_name(name)
        return names

    _off = field_validator("log_dir", mode="before")(_false_is_none)
    _given = field_validator("model", "bank", "log_dir", mode="before")(_not_empty)
    _home = field_validator("model", "bank", "log_dir")(_expanded)

    @property
    def configured_calibration(self) -> PhotonCalibration | None:
        """[serve.calibration] when the config gives one; None otherwise, so that a file recording its own units
        (a dataset in ADU) is decoded with those."""
        return self.calibration if "calibration" in self.model_fields_set else None


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += _rows(annotation, key)
            continue
        default = field.get_default(call_default_factory=True)
        shown = "null" if default is None else f"`{default}`"
        rows.append(f"| `{key}` | {shown} | {field.description or ''} |")
    return rows


def markdown() -> str:
    """docs/serve.md, generated from the settings above."""
    lines = [
        "# `lcls-hitfinder serve` settings",
        "",
        "Every key of the `[serve]` section of a config file (TOML or YAML, `--config`), with its default.",
        "Command-line flags override single keys: `--source`, `--model`, `--bank`, `--publish`",
        "(`publish.endpoint`), `--metrics-port` (`metrics.port`), `--max-events`, `--log-dir`, `--device`.",
        "Generated from `lcls_hitfinder/service/settings.py` by `python -m lcls_hitfinder.service.settings`;",
        "a test fails when the two differ. Message fields: docs/messages.md; metrics: docs/metrics.md;",
        "running it at LCLS: docs/operations.md.",
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
        *_rows(ServeSettings, "serve"),
        "",
        "## Sources",
        "",
        "| URI | what |",
        "| --- | --- |",
        "| `xtc2:PATH?det=NAME` | a psana2 XTC2 file |",
        "| `shmem:TAG?det=NAME` | psana2 live shared memory (the DAQ's monitoring tag) |",
        "| `exp:EXPERIMENT:RUN?dir=DIR&det=NAME` | a psana2 experiment and run; `&ranks=N`: psana's MPI mode |",
        "| `psana1:DATASOURCE?det=NAME` | LCLS-I psana1 (when importable), e.g. `psana1:exp=amo86615:run=190:smd` |",
        "| `h5:PATH` | the project's dataset files (with their true particle counts) or CXI files |",
        "| `sim:?rate=HZ` | a live simulated stream with its ground truth |",
        "",
        "Parameters of `h5:`: `rate` (Hz, 0: as fast as it reads), `repeat` (passes, 0: forever), `memory=1`",
        "(read the file first), `experiment`, `run`; CXI: `data` (default `/entry_1/data_1/data`) and `mask`",
        "(non-zero = bad pixel). Parameters of `sim:`: `rate` (default 120), `n` (events, then the run ends),",
        "`seed`, `experiment`, `run`, `config` (a config file whose [simulate] section describes the patterns).",
        "The psana sources' parameters: docs/psana.md. An unknown parameter is an error, not ignored.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
