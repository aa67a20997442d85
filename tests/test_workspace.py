"""Workspace.resolve: the one resolver of config paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from visrl.policy import resolve_model_path
from visrl.train.config import resolve_output, resolve_path
from visrl.workspace import Workspace


@pytest.fixture
def places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Workspace:
    """A workspace with models/in-ws, and a current directory with models/in-ws and models/in-cwd."""
    ws = Workspace(tmp_path / "ws")
    (ws.root / "models" / "in-ws").mkdir(parents=True)
    cwd = tmp_path / "cwd"
    for name in ("in-ws", "in-cwd"):
        (cwd / "models" / name).mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return ws


def test_resolve(places: Workspace, tmp_path: Path) -> None:
    ws = places
    cwd = tmp_path / "cwd"
    assert ws.resolve("models/in-ws") == ws.root / "models/in-ws"
    assert ws.resolve("models/in-cwd") == ws.root / "models/in-cwd"  # outputs always go inside
    assert ws.resolve("models/in-ws", search_cwd=True) == ws.root / "models/in-ws"  # the workspace's first
    assert ws.resolve("models/in-cwd", search_cwd=True) == cwd / "models/in-cwd"
    assert ws.resolve("models/none", search_cwd=True) == ws.root / "models/none"
    assert ws.resolve("/abs/x") == Path("/abs/x")
    assert ws.resolve("~/x") == tmp_path / "home" / "x"


def test_the_other_resolvers_call_it(places: Workspace, tmp_path: Path) -> None:
    ws = places
    assert resolve_model_path(ws, "models/in-cwd") == str(tmp_path / "cwd" / "models/in-cwd")
    assert resolve_model_path(ws, "Qwen/Qwen2.5-VL-7B-Instruct") == "Qwen/Qwen2.5-VL-7B-Instruct"  # a Hub id
    assert resolve_model_path(ws, None) is None
    assert resolve_path(ws.root, "models/none") == str(ws.root / "models/none")
    assert resolve_path(ws.root, "models/in-cwd") == str(tmp_path / "cwd" / "models/in-cwd")
    assert resolve_output(ws.root, "runs/out") == ws.root / "runs/out"
