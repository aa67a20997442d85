"""Reading import files: records of a JSON or JSONL file, checked to be storable.

:func:`read_records` refuses, with one :class:`~visrl.errors.DataError` naming the file (and the
record and field), what used to surface as a traceback: a UTF-16 or Latin-1 file, nesting past
:data:`MAX_DEPTH`, integers past 64 bits (10^400), lone UTF-16 surrogates, text values over
:data:`MAX_TEXT_CHARS` characters. Error messages never
echo a huge value in full (:func:`short_value`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from visrl.errors import DataError

# Input files are small structured records: 32 levels is ~8x the deepest real record (a
# conversation turn inside a list inside a record) and far below Python's recursion limit.
MAX_DEPTH = 32
_INT64 = 2**63  # SQLite stores integers in 64 bits; a larger one cannot be written
# Characters in one text value (a question, an answer, a reasoning turn, an id): ~2,000 tokens,
# 10x a long Visual-CoT answer. A 10 MB question would be stored, shown in every app view and fed
# to every generate run (serve refuses such a prompt anyway: visrl.serve_limits).
MAX_TEXT_CHARS = 8_000
_SURROGATE = re.compile("[\ud800-\udfff]")
_BOMS = {b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32", b"\xff\xfe": "UTF-16",
         b"\xfe\xff": "UTF-16"}


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON file (a list of objects) or a JSONL file (one object per line).

    The file must be UTF-8 (a BOM is allowed); every value is checked to be storable (no lone
    surrogates, integers within 64 bits, nesting within :data:`MAX_DEPTH`, text within
    :data:`MAX_TEXT_CHARS`) before any is used.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        data = path.read_bytes()
    except (OSError, ValueError) as exc:  # NUL in the name, name too long, a symlink loop
        raise DataError(f"{short_path(path)}: cannot read the file ({os_reason(exc)}); fix the path") from None
    text = _decode(path, data)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix.lower() != ".jsonl" and not text.lstrip().startswith("{"):
            raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno}); a JSON file must hold "
                            "a list of records, a .jsonl file one record per line") from None
        records = _read_lines(path, text)
    except RecursionError:
        raise _too_deep(path) from None
    if isinstance(records, dict) and path.suffix.lower() == ".jsonl":
        records = [records]  # a JSONL file of one line
    if not isinstance(records, list):
        raise DataError(f"{path}: the top level must be a list of records, not {type(records).__name__}")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, not an object")
        check_values(path, i, record)
    return records


def _decode(path: Path, data: bytes) -> str:
    for bom, name in _BOMS.items():
        if data.startswith(bom):
            raise DataError(f"{path}: the file is {name}, not UTF-8; save it as UTF-8 "
                            f"(e.g. iconv -f {name} -t UTF-8)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at line {line}); save the "
                        "file as UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)") from None


def _too_deep(path: Path, where: str = "") -> DataError:
    return DataError(f"{path}: {where or 'the file'} is nested deeper than {MAX_DEPTH} levels; a record "
                     "holds flat fields, lists of turns or boxes")


def check_values(path: Path, index: int, record: dict[str, Any]) -> None:
    """Every value of ``record`` can be stored: text within :data:`MAX_TEXT_CHARS` and without
    lone surrogates, 64-bit integers, nesting within :data:`MAX_DEPTH`. Walks iteratively (a deep record must not overflow the stack)."""
    stack: list[tuple[Any, str, int]] = [(record, "(record)", 0)]
    while stack:
        value, top, depth = stack.pop()  # top: the record's field the value sits in
        if depth > MAX_DEPTH:
            raise record_error(path, index, top, f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, str):
            if len(value) > MAX_TEXT_CHARS:
                raise record_error(path, index, top, f"holds {len(value):,} characters of text; the limit is "
                                   f"{MAX_TEXT_CHARS:,} per value: shorten it")
            if _SURROGATE.search(value):
                raise record_error(path, index, top, "holds a lone UTF-16 surrogate (\\ud800-\\udfff), "
                                   "which is not text; fix that escape in the file")
        elif isinstance(value, int) and not isinstance(value, bool):
            if not -_INT64 <= value < _INT64:
                raise record_error(path, index, top, f"the number {short_value(value)} is too large; "
                                   "numbers must fit in 64 bits")
        elif isinstance(value, dict):
            for key, child in value.items():
                if _SURROGATE.search(key):
                    raise record_error(path, index, top, "a key holds a lone UTF-16 surrogate; fix that "
                                       "escape in the file")
                stack.append((child, key if depth == 0 else top, depth + 1))
        elif isinstance(value, list):
            stack.extend((child, top, depth + 1) for child in value)


def short_value(value: Any, limit: int = 40) -> str:
    """A value for an error message, never echoed in full (a 10^400 number, a huge string)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def short_path(path: Path) -> str:
    return short_value(str(path), 120)


def os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _read_lines(path: Path, text: str) -> list[Any]:
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {n} is not JSON ({exc.msg}); fix or remove that line") from None
        except RecursionError:
            raise _too_deep(path, f"line {n}") from None
    return records


def record_error(path: Path, index: int, field_name: str, problem: str) -> DataError:
    return DataError(f"{path.name}: record {index}, field {field_name!r}: {problem}")
