"""YAML configs mapped one to one onto stage dataclasses.

Every stage (generate, train, merge, eval, serve) has a dataclass whose fields are its YAML
keys; each field carries ``metadata={"help": ...}``. Unknown keys are an error that names them,
so a typo never silently falls back to a default.

YAML comes from users and from the app's editor, so reading it is bounded: at most
:data:`MAX_CONFIG_BYTES`, at most :data:`MAX_ALIASES` aliases and :data:`MAX_NODES` values once
aliases are expanded (a 423-byte "billion laughs" alias bomb otherwise grows to gigabytes when a
config is copied or printed), no duplicate keys (an error naming the key and both lines), and
errors that give line and column and never echo more than :data:`MAX_SHOWN` characters of a value.
Floats must be finite (NaN and inf are refused for every field) and strings at most
:data:`MAX_STRING` characters; each stage's ``__post_init__`` then checks its ranges.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from visrl.errors import ConfigError

T = TypeVar("T")

MAX_CONFIG_BYTES = 256 * 1024  # the shipped recipes are 1-5 KB
MAX_ALIASES = 100  # recipes use a handful (`base: &base`) if any
MAX_NODES = 20_000  # values after expanding aliases; a recipe has ~50
MAX_STRING = 4096  # a config string is a name, a path (Linux PATH_MAX is 4096) or a URL
MAX_SHOWN = 80  # characters of a value an error message quotes


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping from ``path`` (see :func:`parse_yaml`); a missing file is a ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path} is {size:,} bytes; a config may be at most {MAX_CONFIG_BYTES:,}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, source: str = "config") -> dict[str, Any]:
    """The mapping a YAML config text holds (empty text: ``{}``), read within the limits above.

    ``source`` names the text in errors (a file name, or e.g. "the editor"). Every problem is a
    :class:`ConfigError`: not YAML (with line and column), over :data:`MAX_CONFIG_BYTES`, too many
    aliases or values, a duplicate key, or a top level that is not a mapping with string keys.
    """
    if len(text) > MAX_CONFIG_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source} is over {MAX_CONFIG_BYTES:,} bytes; a config is a few KB")
    loader = None
    try:
        loader = _BoundedLoader(text, source)  # its reader refuses control characters already
        node = loader.get_single_node()
        if node is None:
            return {}
        _count_nodes(node, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" ({clip(exc.context)})" if exc.context else ""
        raise ConfigError(f"{source} is not valid YAML{where}: {clip(exc.problem or str(exc), 200)}{context}") from None
    except yaml.YAMLError as exc:  # e.g. a control character (the reader's error has no line)
        raise ConfigError(f"{source} is not valid YAML: {clip(' '.join(str(exc).split()), 200)}") from None
    except RecursionError:
        raise ConfigError(f"{source} is nested too deeply to be a config") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise ConfigError(f"{source}: a value cannot be read: {clip(str(exc))}") from None
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of keys to values, not {type(data).__name__}")
    bad = [key for key in data if not isinstance(key, str)]
    if bad:
        raise ConfigError(f"{source}: keys must be names, got {clip(repr(bad[0]))}")
    return data


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that counts aliases and refuses duplicate keys (PyYAML keeps the last silently)."""

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source, self.aliases = source, 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise ConfigError(f"{self.source}: more than {MAX_ALIASES} aliases (*name), at line {mark.line + 1}; "
                                  "a config needs a few at most")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *base` keys may be overridden: that is what merging is for
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{self.source}: duplicate key {clip(repr(key))} at lines {seen[key]} and "
                                      f"{line}; keep one")
                seen[key] = line
        return super().construct_mapping(node, deep)


def _count_nodes(root: Any, source: str) -> None:
    """Refuse a document whose values, aliases expanded, exceed MAX_NODES (or that contains itself)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: an alias refers to a value that contains it (line {node.start_mark.line + 1})")
        open_nodes.add(key)
        children = ([v for pair in node.value for v in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1
        for child in children:
            total += size(child)
            if total > MAX_NODES:
                raise ConfigError(f"{source}: more than {MAX_NODES:,} values once aliases are expanded "
                                  f"(line {node.start_mark.line + 1}); a config has a few dozen")
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)


def clip(text: str, limit: int = MAX_SHOWN) -> str:
    """``text`` cut to ``limit`` characters for an error message (a value may be megabytes)."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def from_dict(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong scalar types are errors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in set(data) - set(fields))
    if unknown:
        guesses = {key: difflib.get_close_matches(key, fields, n=1) for key in unknown[:10]}
        named = ", ".join(f"{clip(key)} (did you mean {guesses[key][0]}?)" if guesses[key] else clip(key)
                          for key in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
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
    except ConfigError as exc:  # a range check of the stage's __post_init__: say which file
        if str(exc).startswith(f"{source}:"):
            raise
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
    """Accept YAML's natural spellings (1e-5 read as a string, ints for floats); reject the rest,
    and NaN, infinities and over-long strings for any field."""
    value = _scalar(name, value, hint, source)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: {name} must be a finite number, got {value}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        raise ConfigError(f"{source}: {name} is an integer of {value.bit_length():,} bits; no setting needs "
                          "more than 63")
    if isinstance(value, str) and len(value) > MAX_STRING:
        raise ConfigError(f"{source}: {name} is {len(value):,} characters long; the limit is {MAX_STRING:,}")
    return value


def _scalar(name: str, value: Any, hint: Any, source: str) -> Any:
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
        try:
            return float(value)
        except OverflowError:  # an int such as 10**400
            raise ConfigError(f"{source}: {name} must be a finite number, got an integer of "
                              f"{value.bit_length():,} bits") from None
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
    raise ConfigError(f"{source}: {name} must be {expected}, got {clip(repr(value))}")


def _scalar_options(hint: Any) -> tuple[type, ...]:
    """The scalar types a field accepts, or () when the hint is not purely scalar."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    scalars = tuple(a for a in args if a in (bool, int, float, str))
    others = [a for a in args if a not in (bool, int, float, str, type(None))]
    return () if others else scalars
