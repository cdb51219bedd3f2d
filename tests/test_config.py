import re
from pathlib import Path

import pytest

from lcls_hitfinder.config import HitfinderConfig, load_config
from lcls_hitfinder.errors import UserError


def test_empty_config_gives_defaults() -> None:
    assert load_config() == HitfinderConfig()


@pytest.mark.parametrize(
    ("text", "name", "message"),
    [
        ("[serve]\nnot_a_key = 3\n", "c.toml", r"serve\.not_a_key: unknown key"),
        ("servee: {}\n", "c.yaml", "servee: unknown key"),
        ("[serve.batch]\nmax_sise = 64\n", "c.toml", r"serve\.batch\.max_sise: unknown key"),
        ("[serve]\nthreads = 100000\n", "c.toml", r"serve\.threads: Input should be less than or equal to 256"),
        (
            "[serve.batch]\nmax_wait_ms = 2000\n",  # the log's flush, between batches, would lag
            "c.toml",
            r"serve\.batch\.max_wait_ms: Input should be less than or equal to 1000",
        ),
        ("[serve.batch]\nmax_size = 0\n", "c.toml", r"serve\.batch\.max_size: Input should be greater than"),
        ("[serve.publish]\nsndhwm = 0\n", "c.toml", r"serve\.publish\.sndhwm: Input should be greater than"),
        ("[serve]\nmax_events = true\n", "c.toml", r"serve\.max_events: a number is needed here, not true"),
        ("serve:\n  status_s: true\n", "c.yaml", r"serve\.status_s: a number is needed here, not true"),
        # inside lists and tables too: a detector of 128 x 1, a weight of 1
        ("[simulate.detector]\nshape = [128, true]\n", "c.toml", r"simulate\.detector\.shape: a number is needed"),
        ("[train.augment]\nphotons = [true, 100]\n", "c.toml", r"train\.augment\.photons: a number is needed"),
        ("[simulate]\nparticles = {0 = true}\n", "c.toml", r"simulate\.particles: a number is needed"),
        ("serve:\n  source: a\n  source: b\n", "c.yaml", "not valid YAML: .*key 'source' is given twice"),
        ("[serve]\n", "c.conf", r"c\.conf: give a \.toml, \.yaml or \.yml file"),
        ("[serve]\nproviders = []\n", "c.toml", r"serve\.providers: List should have at least 1 item"),
        ('[serve]\nlog_dir = ""\n', "c.toml", r"serve\.log_dir: empty: give a path"),  # not the current folder
        ('[serve]\nproviders = ["cuda", "foo"]\n', "c.toml", r"serve\.providers: unknown onnxruntime provider 'foo'"),
        ('[serve]\nbank = " "\n', "c.toml", r"serve\.bank: empty: give a path"),
        ('[serve.publish]\nendpoint = "tcp://*:99999"\n', "c.toml", r"serve\.publish\.endpoint: .*1-65535 or \*"),
    ],
)
def test_a_bad_key_or_value_is_named(tmp_path: Path, text: str, name: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(UserError, match=message):
        load_config(f)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# pixels of 75 \u00b5m\n[serve]\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.toml is not UTF-8 \(byte 15\): save it as UTF-8"):
        load_config(latin1)


def test_a_bad_value_is_blamed_on_where_it_came_from(tmp_path: Path) -> None:
    """The file, or the command line when the file alone is fine (a flag's value is not the file's fault)."""
    f = tmp_path / "s.toml"
    f.write_text('[serve]\ndevice = "cpu"\n')
    with pytest.raises(UserError, match=r"^config error \(command line\): serve\.device"):
        load_config(f, {"serve.device": "gpu"})
    f.write_text('[serve]\ndevice = "gpu"\n')
    with pytest.raises(UserError, match=r"^config error \(.*s\.toml\): serve\.device"):
        load_config(f, {"serve.source": "sim:"})
    assert load_config(f, {"serve.device": "cpu"}).serve.device == "cpu"  # the flag mends the file


def test_toml_switches_metrics_and_the_decision_log_off_with_false(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[serve]\nlog_dir = false\n[serve.metrics]\nport = false\n")
    serve = load_config(f).serve
    assert serve.metrics.port is None and serve.log_dir is None  # as null does in YAML
    assert load_config().serve.metrics.port == 9108
    f.write_text("[serve.metrics]\nport = true\n")
    with pytest.raises(UserError, match=r"serve\.metrics\.port: .*false .* switches it off"):
        load_config(f)


@pytest.mark.parametrize(
    "line",
    [
        "[simulate.beam]\nphotons_per_pattern = inf",
        "[simulate.particles]\n1 = nan",
        "[train]\nalpha = nan",
        "[serve.batch]\nmax_wait_ms = inf",
        "[serve.calibration]\ngain = inf",
    ],
)
def test_nan_and_inf_settings_are_config_errors(tmp_path: Path, line: str) -> None:
    """Not a traceback deep in the simulator or the service (e.g. numpy's 'lam value too large')."""
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    key = line.split("]")[0].lstrip("[") + "." + line.split("\n")[1].split(" =")[0]
    with pytest.raises(UserError, match=re.escape(key) + ": Input should be a finite number"):
        load_config(f)


def test_the_suffix_says_the_format_in_any_case_and_an_empty_section_takes_overrides(tmp_path: Path) -> None:
    upper = tmp_path / "Serve.TOML"
    upper.write_text('[serve]\nsource = "sim:?rate=5"\n')
    assert load_config(upper).serve.source == "sim:?rate=5"
    empty = tmp_path / "c.yml"
    empty.write_text("serve:\n  # every key left out\n  publish:\n")  # YAML reads the sections as null
    assert load_config(empty, {"serve.source": "sim:?rate=7"}).serve.source == "sim:?rate=7"
    assert load_config(empty) == HitfinderConfig()  # without a flag too


def test_a_yaml_error_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("serve:\n  source: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML") as err:
        load_config(bad)
    assert "\n" not in str(err.value)
