from pathlib import Path

import pytest

from lcls_hitfinder.config import HitfinderConfig, load_config
from lcls_hitfinder.errors import UserError


def test_empty_config_gives_defaults() -> None:
    assert load_config() == HitfinderConfig()


def test_unknown_key_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[serve]\nnot_a_key = 3\n")
    with pytest.raises(UserError, match=r"serve\.not_a_key: unknown key"):
        load_config(f)


def test_unknown_section_is_named(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("servee: {}\n")
    with pytest.raises(UserError, match="servee: unknown key"):
        load_config(f)


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[serve\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)


def test_toml_switches_metrics_and_the_decision_log_off_with_false(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text("[serve]\nlog_dir = false\n[serve.metrics]\nport = false\n")
    serve = load_config(f).serve
    assert serve.metrics.port is None and serve.log_dir is None  # as null does in YAML
    assert load_config().serve.metrics.port == 9108
    f.write_text("[serve.metrics]\nport = true\n")
    with pytest.raises(UserError, match=r"serve\.metrics\.port: .*false .* switches it off"):
        load_config(f)
