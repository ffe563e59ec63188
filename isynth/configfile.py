"""`--config FILE`: settings from a JSON, YAML or TOML file (a run's own `config.json` included), applied
before the command line's `SECTION.FIELD=VALUE` overrides, so the command line wins."""
from __future__ import annotations

import json
import tomllib
from pathlib import Path

import yaml

from isynth.errors import IsynthError


def _load(path: Path) -> object:
    if not path.is_file():
        raise IsynthError(f"--config {path}: no such file")
    text = path.read_text()
    suffix = path.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(text)
        if suffix in (".yaml", ".yml"):
            return yaml.safe_load(text)
        if suffix == ".toml":
            return tomllib.loads(text)
    except IsynthError:
        raise
    except Exception as e:  # each parser has its own error class; any of them is the file's fault
        raise IsynthError(f"--config {path}: not valid {suffix[1:].upper()}: {str(e).splitlines()[0]}") from None
    raise IsynthError(f"--config {path}: unknown format {suffix!r}; use .json, .yaml, .yml or .toml")


def _text(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_overrides(path: Path, paradigm: str) -> list[str]:
    """The file's settings as SECTION.FIELD=VALUE items. Its `paradigm`, if present, must be `paradigm`."""
    data = _load(Path(path))
    if not isinstance(data, dict):
        raise IsynthError(f"--config {path}: want a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}")
    if "paradigm" in data and data["paradigm"] != paradigm:
        raise IsynthError(f"--config {path} is a {data['paradigm']!r} configuration, not {paradigm!r}")
    out: list[str] = []

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (list, tuple)):
                raise IsynthError(f"--config {path}: {prefix}{key} is a list; every field takes one value")
            else:
                out.append(f"{prefix}{key}={_text(value)}")

    walk({k: v for k, v in data.items() if k != "paradigm"}, "")
    return out
