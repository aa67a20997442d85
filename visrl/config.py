"""YAML configs mapped one to one onto stage dataclasses.

Every stage (generate, train, merge, eval, serve) has a dataclass whose fields are its YAML
keys; each field carries ``metadata={"help": ...}``. Unknown keys are an error that names them,
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from visrl.errors import ConfigError

T = TypeVar("T")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path``; a missing file or a non-mapping is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong scalar types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        guesses = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown}
        named = ", ".join(f"{key} (did you mean {guesses[key][0]}?)" if guesses[key] else key for key in unknown)
        raise ConfigError(
            f"{source}: unknown key(s) {named}; "
            f"valid keys for {cls.__name__} are: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    values = {name: _coerce(name, value, hints.get(name), source) for name, value in data.items()}
    try:
        return cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{source}: {exc}") from None


def load_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None) -> T:
    """Read ``path`` as YAML, apply ``overrides`` (e.g. from the CLI) and build ``cls``."""
    data = read_yaml(path)
    data.update(overrides or {})
    return from_dict(cls, data, source=str(path))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (for storing with a job or writing back to YAML)."""
    return dataclasses.asdict(config)


def dump_yaml(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False), encoding="utf-8")


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Accept YAML's natural spellings (1e-5 read as a string, ints for floats); reject the rest."""
    if hint is None or value is None:
        return value
    options = _scalar_options(hint)
    if not options:
        return value
    if isinstance(value, bool):
        if bool in options:
            return value
    elif isinstance(value, int) and int in options:
        return value
    elif isinstance(value, int | float) and float in options:
        return float(value)
    elif isinstance(value, str) and str in options:
        return value
    if isinstance(value, str) and float in options:
        try:
            return float(value)  # PyYAML reads "5e-6" as a string
        except ValueError:
            pass
    if isinstance(value, str) and int in options:
        try:
            return int(value)
        except ValueError:
            pass
    expected = " or ".join(t.__name__ for t in options)
    raise ConfigError(f"{source}: {name} must be {expected}, got {value!r}")


def _scalar_options(hint: Any) -> tuple[type, ...]:
    """The scalar types a field accepts, or () when the hint is not purely scalar."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    scalars = tuple(a for a in args if a in (bool, int, float, str))
    others = [a for a in args if a not in (bool, int, float, str, type(None))]
    return () if others else scalars
