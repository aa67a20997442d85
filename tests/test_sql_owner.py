"""One owner per table: every SQL statement of the package lives in the store layer.

The store layer is ``visrl/store.py``, the ``visrl/store_*.py`` modules it joins, and the
migrations in ``visrl/schema.py``. Anywhere else in ``visrl/`` and ``visrl_app/``, a statement,
a raw connection (``store.db``), a sqlite-utils table (``db["pairs"]``) or an SQL string is a
finding: callers use the store's named methods, so a new column is one edit in the store.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("visrl", "visrl_app")
# Statement-running methods of sqlite3 connections and cursors and of sqlite-utils tables.
SQL_METHODS = {"execute", "executemany", "executescript", "rows_where", "count_where"}
# Uppercase, as every statement in the package is written; prose ("select a pair from ...") is not.
SQL_TEXT = re.compile(
    r"\bSELECT\b.*\bFROM\b|\bINSERT\s+(?:OR\s+[A-Z]+\s+)?INTO\b|\bUPDATE\s+\w+\s+SET\b|\bDELETE\s+FROM\b"
    r"|\bBEGIN\s+(?:IMMEDIATE|EXCLUSIVE|DEFERRED|TRANSACTION)\b|\b(?:CREATE|ALTER|DROP)\s+(?:TABLE|INDEX|TRIGGER)\b",
    re.DOTALL,
)


def in_store_layer(relative: str) -> bool:
    name = Path(relative).name
    return relative.startswith("visrl/") and "/" not in relative[len("visrl/"):] and (
        name in ("store.py", "schema.py") or name.startswith("store_"))


def sql_findings(source: str, relative: str) -> list[str]:
    """``path:line: what`` for each use of SQL in ``source`` (a module's text)."""
    tree = ast.parse(source)
    # Strings not checked on their own: docstrings, and the parts of an f-string (checked whole).
    skip = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    skip |= {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    found: set[tuple[int, str]] = set()
    for node in ast.walk(tree):
        what = _finding(node, skip)
        if what:
            found.add((node.lineno, what))  # type: ignore[attr-defined]
    return [f"{relative}:{line}: {what}" for line, what in sorted(found)]


def _finding(node: ast.AST, skip: set[int]) -> str | None:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in SQL_METHODS:
            return f".{node.func.attr}()"
        if node.func.attr == "query" and _is_db(node.func.value):
            return "db.query()"
    if isinstance(node, ast.Subscript) and _is_db(node.value):
        return "db[...] table"
    if isinstance(node, ast.Attribute) and node.attr in ("db", "conn"):
        return f"raw connection (.{node.attr})"
    if isinstance(node, ast.JoinedStr):  # an f-string: its literal parts, the fields as {}
        text = "{}".join(v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str))
        return "SQL in an f-string" if SQL_TEXT.search(text) else None
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
        return "SQL in a string" if SQL_TEXT.search(node.value) else None
    return None


def _is_db(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "db") or (isinstance(node, ast.Attribute) and node.attr == "db")


def package_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_sql_outside_the_store_layer() -> None:
    findings = []
    for path in package_files():
        relative = path.relative_to(ROOT).as_posix()
        if not in_store_layer(relative):
            findings += sql_findings(path.read_text(encoding="utf-8"), relative)
    assert findings == [], "SQL outside the store layer (give the table's store module a method):\n" + \
        "\n".join(findings)


def test_the_store_layer_is_what_the_allow_list_names() -> None:
    layer = sorted(p.relative_to(ROOT).as_posix() for p in package_files()
                   if in_store_layer(p.relative_to(ROOT).as_posix()))
    assert layer == ["visrl/schema.py", "visrl/store.py", "visrl/store_connection.py", "visrl/store_items.py",
                     "visrl/store_jobs.py", "visrl/store_pairs.py"]
    # The checker sees the statements there (so a clean package is not a blind checker).
    pairs = sql_findings((ROOT / "visrl/store_pairs.py").read_text(encoding="utf-8"), "visrl/store_pairs.py")
    assert len(pairs) > 20


@pytest.mark.parametrize("source, expected", [
    ('store.db.execute("SELECT 1")', ["x.py:1: .execute()", "x.py:1: raw connection (.db)"]),
    ("cursor.executemany(sql, rows)", ["x.py:1: .executemany()"]),
    ('rows = table.rows_where("id = ?", [1])', ["x.py:1: .rows_where()"]),
    ('rows = db.query("x")', ["x.py:1: db.query()"]),
    ('db["pairs"].insert(row)', ["x.py:1: db[...] table"]),
    ("conn = store.db", ["x.py:1: raw connection (.db)"]),
    ('sql = "UPDATE pairs SET status = ?"', ["x.py:1: SQL in a string"]),
    ('sql = "INSERT OR REPLACE INTO pair_claims VALUES (?)"', ["x.py:1: SQL in a string"]),
    ('sql = "DELETE FROM jobs"', ["x.py:1: SQL in a string"]),
    ('sql = f"SELECT id FROM {table} WHERE x = 1"', ["x.py:1: SQL in an f-string"]),
    ('sql = ("SELECT id, status "\n       "FROM pairs")', ["x.py:1: SQL in a string"]),  # implicit concatenation
    ('x.run("BEGIN IMMEDIATE")', ["x.py:1: SQL in a string"]),
    ('x = 1\ndef f():\n    return "SELECT * FROM items"', ["x.py:3: SQL in a string"]),
])
def test_the_checker_finds_planted_sql(source: str, expected: list[str]) -> None:
    assert sql_findings(source, "x.py") == expected


@pytest.mark.parametrize("source", [
    'def f():\n    """Runs SELECT status FROM pairs in the store."""\n    return store.pairs_for_review()',
    '"""Module doc: UPDATE jobs SET status."""\nx = store.claim_pair(1, "ana", 300.0)',
    'message = "select a pair from the list, then update the set"',
    'label = f"{n} pairs FROM the SELECTion"',
    "with store.write():\n    store.record_review(1, 2, {}, {}, 'ana', 'accept')",
])
def test_the_checker_passes_store_calls_and_prose(source: str) -> None:
    assert sql_findings(source, "x.py") == []


@pytest.mark.parametrize("relative, allowed", [
    ("visrl/store.py", True), ("visrl/store_pairs.py", True), ("visrl/schema.py", True),
    ("visrl/review.py", False), ("visrl_app/store_tab.py", False), ("visrl/formats/store_x.py", False),
])
def test_the_allow_list(relative: str, allowed: bool) -> None:
    assert in_store_layer(relative) is allowed
