"""One config file (TOML or YAML) parsed into pydantic models; CLI flags override single keys.

Each stage defines its own section model next to its code (simulate/settings.py, learn/settings.py,
service/settings.py); this module composes them and owns loading, overriding and error reporting.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lcls_hitfinder.errors import UserError
from lcls_hitfinder.learn.settings import TrainSettings
from lcls_hitfinder.service.settings import ServeSettings
from lcls_hitfinder.simulate.settings import SimulateSettings


class HitfinderConfig(BaseModel):
    """The whole configuration file. Every section is optional; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    simulate: SimulateSettings = Field(default_factory=SimulateSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)


class _StrictYamlLoader(yaml.SafeLoader):
    """A key given twice is an error, as in TOML, rather than the last one silently winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_FORMATS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML"}


def _read(path: Path) -> dict[str, Any]:
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise UserError(f"config {path}: give a .toml, .yaml or .yml file (the suffix says which)")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read config {path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config {path} is not UTF-8 (byte {err.start}): save it as UTF-8") from None
    try:
        data = tomllib.loads(text) if kind == "TOML" else yaml.load(text, Loader=_StrictYamlLoader)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
        raise UserError(f"config {path} is not valid {kind}: {' '.join(str(err).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: the top level must be a table of sections")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b', creating tables on the way (also for a section left empty, which
    YAML reads as null)."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"config key {key}: {part} is not a table")
    node[leaf] = value


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem, each naming the dotted key, e.g. `serve.batch.max_size: ...`."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}")
    return f"config error ({origin}): " + "; ".join(parts)


def load_config(path: Path | None = None, overrides: Mapping[str, Any] | None = None) -> HitfinderConfig:
    """Parse the file (if any), apply `overrides` ({'serve.source': 'sim:'}, None values skipped)."""
    data = _read(path) if path is not None else {}
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    for key, value in given.items():
        set_dotted(data, key, value)
    try:
        return HitfinderConfig.model_validate(data)
    except ValidationError as err:
        origin = "command line" if path is None or (given and _valid(_read(path))) else str(path)
        raise UserError(format_validation_error(err, origin)) from None


def _valid(data: dict[str, Any]) -> bool:
    try:
        HitfinderConfig.model_validate(data)
    except ValidationError:
        return False
    return True
