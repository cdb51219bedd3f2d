"""Bad paths and counts are refused in one line before any work: an output that is a directory (or a report
directory that is a file), a missing input, a count out of range, an endpoint that is not one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lcls_hitfinder.cli import app
from lcls_hitfinder.errors import UserError
from lcls_hitfinder.service.client import DecisionClient

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "embedder.onnx"
BANK = REPO / "models" / "bank.h5"
runner = CliRunner()


def _refusal(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert isinstance(result.exception, UserError), result.output
    return str(result.exception)


@pytest.fixture
def made(tmp_path: Path) -> Path:
    """A directory and a file where the commands want the other."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file.h5").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--n", "2", "--out", "{d}/a_dir"], "dataset {d}/a_dir is a directory, not a file"),
        (
            ["bank", "build", "--model", "{m}", "--data", "{d}/a_file.h5", "--out", "{d}/a_dir"],
            "bank {d}/a_dir is a directory, not a file",
        ),
        (
            ["classify", "--model", "{m}", "--bank", "{b}", "--data", "{d}/a_file.h5", "--out", "{d}/a_dir"],
            "CSV {d}/a_dir is a directory, not a file",
        ),
        (
            ["evaluate", "--model", "{m}", "--bank", "{b}", "--data", "{d}/a_file.h5", "--report", "{d}/a_file.h5"],
            "report directory {d}/a_file.h5 is a file, not a directory",
        ),
        (["export", "{d}/a_dir", "--out", "{d}/a_dir"], "model {d}/a_dir is a directory, not a file"),
        (["show", "{d}/missing.h5"], "dataset {d}/missing.h5 does not exist"),
        (["xtc2", "{d}/a_file.h5", "--out", "{d}/a_dir"], "XTC2 file {d}/a_dir is a directory, not a file"),
        (
            ["train", "twin", "--data", "{d}/a_file.h5", "--val", "{m}", "--out", "{d}/a_file.h5"],  # any two files
            "run directory {d}/a_file.h5 is a file, not a directory",
        ),
    ],
)
def test_a_wrong_kind_of_path_is_refused_before_any_work(args: list[str], message: str, made: Path) -> None:
    def fill(text: str) -> str:
        return text.format(d=made, m=MODEL, b=BANK)

    assert _refusal([fill(a) for a in args]) == fill(message)
    assert sorted(p.name for p in made.iterdir()) == ["a_dir", "a_file.h5"]  # nothing written, no OUT.tmp


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["xtc2", "{d}/a_file.h5", "--out", "{d}/a_file.h5"],
            "the XTC2 file to write, {d}/a_file.h5, is the DATA file",
        ),
        (
            ["bank", "build", "--model", "{d}/m.onnx", "--data", "{d}/a_file.h5", "--out", "{d}/a_file.h5"],
            "the bank to write, {d}/a_file.h5, is the --data file",
        ),
        (
            ["bank", "build", "--model", "{d}/m.onnx", "--data", "{d}/a_file.h5", "--out", "{d}/m.onnx"],
            "the bank to write, {d}/m.onnx, is the --model file",
        ),
        (
            ["classify", "--model", "{d}/m.onnx", "--bank", "{b}", "--data", "{d}/a_file.h5", "--out", "{d}/m.onnx"],
            "the CSV to write, {d}/m.onnx, is the --model file",
        ),
        (
            ["classify", "--model", "{m}", "--bank", "{b}", "--data", "{d}/a_file.h5", "--out", "{d}/./a_file.h5"],
            "the CSV to write, {d}/a_file.h5, is the --data file",
        ),
        (
            ["bank", "pick", "--source", "h5:{d}/a_file.h5", "--picks", "{d}/p.csv", "--out", "{d}/p.csv"],
            "the reference file to write, {d}/p.csv, is the --picks file",
        ),
        (["show", "{d}/a_file.h5", "--out", "{d}/grid"], "the PNG {d}/grid must end in .png"),
        (["summary", "{d}/a_file.h5", "--plot", "{d}/run.txt"], "the plot {d}/run.txt must end in .png"),
        (
            ["summary", "{d}/a_file.h5", "--plot", "{d}/./a_file.h5"],
            "the plot to write, {d}/a_file.h5, is the LOG file",
        ),
    ],
)
def test_an_output_that_is_an_input_is_refused_and_both_stay(args: list[str], message: str, made: Path) -> None:
    """Writing would destroy what the command reads (xtc2 used to empty its dataset, then fail)."""
    for name in ("m.onnx", "p.csv"):
        (made / name).write_text(name)

    def fill(text: str) -> str:
        return text.format(d=made, m=MODEL, b=BANK)

    assert _refusal([fill(a) for a in args]).startswith(fill(message))
    assert (made / "m.onnx").read_text() == "m.onnx" and (made / "p.csv").read_text() == "p.csv"
    assert (made / "a_file.h5").read_text() == ""


@pytest.mark.parametrize(
    "args",
    [
        ["bank", "build", "--model", str(MODEL), "--data", "x.h5", "--out", "b.h5", "--k", "0"],
        ["bank", "build", "--model", str(MODEL), "--data", "x.h5", "--out", "b.h5", "--per-class", "-2"],
        ["evaluate", "--model", str(MODEL), "--bank", str(BANK), "--data", "x.h5", "--report", "r", "--examples", "-3"],
        ["listen", "tcp://127.0.0.1:1", "--timeout", "-1"],
    ],
)
def test_counts_out_of_range_are_usage_errors(args: list[str]) -> None:
    result = runner.invoke(app, args)
    option = args[-2]
    assert result.exit_code == 2 and "Invalid value" in result.output, result.output
    assert f"'{option}'" in " ".join(result.output.replace("│", " ").split()), result.output  # the one out of range


def test_listen_refuses_an_endpoint_that_is_not_one_and_says_when_nothing_came() -> None:
    cli = [str(Path(sys.executable).parent / "lcls-hitfinder"), "listen"]
    bad = subprocess.run([*cli, "127.0.0.1:5556"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("lcls-hitfinder: error: cannot subscribe to '127.0.0.1:5556'")
    assert len(bad.stderr.strip().splitlines()) == 1
    beyond = subprocess.run([*cli, "tcp://127.0.0.1:99999"], capture_output=True, text=True, timeout=60)
    assert beyond.returncode == 2 and "the port must be 1-65535 or *, not '99999'" in beyond.stderr  # not 34463
    with pytest.raises(ValueError, match="the port must be 1-65535"):  # the Python client alike
        DecisionClient("tcp://127.0.0.1:99999")
    endless = subprocess.run(
        [*cli, "tcp://127.0.0.1:1", "--topic", "heartbeat", "--count", "1"], capture_output=True, timeout=60
    )
    assert endless.returncode == 2 and b"--count counts decisions" in endless.stderr  # it would never stop
    silent = subprocess.run([*cli, "tcp://127.0.0.1:1", "--timeout", "0.3"], capture_output=True, text=True, timeout=60)
    assert silent.returncode == 1 and "no message from tcp://127.0.0.1:1 in 0.3 s" in silent.stderr


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    """One of each costly output: the shipped model and bank, a dataset, references picked by eye, a decision log,
    an XTC2 run."""
    import shutil

    import h5py

    from lcls_hitfinder.dataset import FORMAT
    from lcls_hitfinder.service.decision_log import DecisionLog

    shutil.copyfile(MODEL, tmp_path / "embedder.onnx")
    shutil.copyfile(BANK, tmp_path / "bank.h5")
    for name, attrs in (("data.h5", {}), ("refs.h5", {"picked_from": "exp:xpplx9221:12"})):
        with h5py.File(tmp_path / name, "w") as f:
            f.attrs.update(format=FORMAT, **attrs)
    DecisionLog(tmp_path / "log.h5", {"experiment": "x", "run": 1}).close()
    (tmp_path / "r.xtc2").write_bytes(b"xtc2")
    (tmp_path / "in.h5").write_text("")
    return tmp_path


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        (["simulate", "--n", "2", "--out", "{d}/bank.h5"], "the dataset to write, {d}/bank.h5, would replace a bank"),
        (
            ["bank", "build", "--model", "{m}", "--data", "{d}/in.h5", "--out", "{d}/embedder.onnx"],
            "the bank to write, {d}/embedder.onnx, would replace a model",
        ),
        (
            ["classify", "--model", "{m}", "--bank", "{b}", "--data", "{d}/in.h5", "--out", "{d}/data.h5"],
            "the CSV to write, {d}/data.h5, would replace a dataset",
        ),
        (["export", "{d}", "--out", "{d}/log.h5"], "the model to write, {d}/log.h5, would replace a decision log"),
        (
            ["simulate", "--n", "2", "--out", "{d}/refs.h5"],
            "the dataset to write, {d}/refs.h5, would replace a reference file",
        ),
        (
            ["bank", "pick", "--source", "h5:{d}/in.h5", "--picks", "{d}/in.h5", "--out", "{d}/data.h5"],
            "the reference file to write, {d}/data.h5, would replace a dataset",
        ),
        (["xtc2", "{d}/in.h5", "--out", "{d}/data.h5"], "the XTC2 file to write, {d}/data.h5, would replace a dataset"),
        (
            ["bank", "pick", "--source", "h5:{d}/in.h5", "--picks", "{d}/in.h5", "--out", "{d}/r.xtc2"],
            "the reference file to write, {d}/r.xtc2, would replace an XTC2 file",
        ),
    ],
)
def test_an_output_of_another_kind_is_not_replaced(args: list[str], kind: str, outputs: Path) -> None:
    """A mistyped --out would have replaced a bank, a model, a dataset, a log or a run with no word."""
    before = {p.name: p.read_bytes() for p in outputs.iterdir()}

    def fill(text: str) -> str:
        return text.format(d=outputs, m=MODEL, b=BANK)

    assert _refusal([fill(a) for a in args]) == fill(kind) + ": give another path, or remove it first"
    assert {p.name: p.read_bytes() for p in outputs.iterdir()} == before


@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("data.h5", "dataset"),  # simulated again
        ("refs.h5", "reference file"),  # picked again
        ("bank.h5", "bank"),
        ("embedder.onnx", "model"),
        ("r.xtc2", "XTC2 file"),
        ("in.h5", "CSV"),  # not a costly output (here an empty file)
    ],
)
def test_an_output_of_its_own_kind_or_of_none_may_be_replaced(name: str, what: str, outputs: Path) -> None:
    from lcls_hitfinder.paths import output_file

    assert output_file(outputs / name, what) == outputs / name


def test_a_decision_log_being_written_or_left_by_a_killed_service_is_not_replaced(tmp_path: Path) -> None:
    """HDF5 refuses a plain read of a log that a service holds open for SWMR writing, or left so when it was
    killed: such a log is a beamtime's record all the same."""
    import signal

    from lcls_hitfinder.paths import made_here

    log = tmp_path / "xpplx9221-r0012.h5"
    code = (
        "import sys, time, pathlib\n"
        "from lcls_hitfinder.service.decision_log import DecisionLog\n"
        "DecisionLog(pathlib.Path(sys.argv[1]), {'experiment': 'xpplx9221', 'run': 12})\n"
        "print('open', flush=True)\n"
        "time.sleep(600)\n"
    )
    service = subprocess.Popen([sys.executable, "-c", code, str(log)], stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None and service.stdout.readline().strip() == "open"
        assert made_here(log) == "decision log"
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait()
    said = _refusal(["simulate", "--n", "2", "--out", str(log)])
    assert said.startswith(f"the dataset to write, {log}, would replace a decision log")


def test_an_hdf5_file_that_cannot_be_read_is_not_replaced(tmp_path: Path) -> None:
    """It may be someone's record in a state this HDF5 cannot open: said, not overwritten."""
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    said = _refusal(["simulate", "--n", "2", "--out", str(broken)])
    assert said.startswith(f"{broken} is an HDF5 file this tool cannot read (") and said.endswith("give another path")
    assert broken.read_bytes() == b"\x89HDF\r\n\x1a\n" + bytes(100)


def test_xtc2_does_not_replace_a_run_in_its_exp_dir(tmp_path: Path) -> None:
    """--exp-dir naming a real experiment's xtc folder, with its name and a run number it has: refused before
    anything is written (the layout used to replace that run's file)."""
    exp = tmp_path / "xtc"
    exp.mkdir()
    taken = exp / "tstx00001-r0005-s000-c000.xtc2"
    taken.write_bytes(b"a run of the beamtime")
    (tmp_path / "in.h5").write_text("")
    args = ["xtc2", f"{tmp_path}/in.h5", "--out", f"{tmp_path}/new.xtc2", "--exp-dir", str(exp), "--run", "5"]
    assert _refusal(args) == (
        f"--exp-dir {exp} holds run 5 of tstx00001 already (tstx00001-r0005-s000-c000.xtc2): give another "
        "--exp-dir or --run, or remove it first"
    )
    assert taken.read_bytes() == b"a run of the beamtime" and not (tmp_path / "new.xtc2").exists()


def test_an_existing_output_that_cannot_be_opened_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another user's file in a shared folder (root, who runs these tests, may read anything: the refusal is
    stood in by the open that fails)."""
    from lcls_hitfinder import paths

    def denied(path: Path) -> str | None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(paths, "made_here", denied)
    (tmp_path / "theirs.csv").write_text("")
    with pytest.raises(UserError, match=f"^cannot write the CSV {tmp_path}/theirs.csv: Permission denied$"):
        paths.output_file(tmp_path / "theirs.csv", "CSV")


def test_version_is_an_option_as_well_as_a_command() -> None:
    """`--version` is what users try first; it was "No such option"."""
    from lcls_hitfinder import __version__

    for args in (["--version"], ["version"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.output == f"{__version__}\n", result.output
