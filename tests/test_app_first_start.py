"""The first-start page: it answers while the demo workspace builds, then frees the port."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from visrl_app import first_start
from visrl_app.app import host_is_local


def get(url: str, host: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_page_shows_progress_during_the_build_then_frees_the_port(tmp_path: Path) -> None:
    port = first_start.pick_port("127.0.0.1", None)
    seen: dict[str, Any] = {}

    def build(say: Any) -> None:
        say("writing the demo benchmark ...")
        say("generating pairs: 8/40 items")
        base = f"http://127.0.0.1:{port}/"
        seen["page"] = get(base)
        seen["status"] = get(base + "visrl-build-status")
        seen["rebinding"] = get(base, host="evil.example")

    echoed: list[str] = []
    first_start.build_with_page(tmp_path / "demo", build, "127.0.0.1", port, host_ok=host_is_local,
                                echo=echoed.append)
    code, page = seen["page"]
    assert code == 200 and "Building the demo workspace…" in page and str(tmp_path / "demo") in page
    assert "generating pairs: 8/40 items" in page
    code, status = seen["status"]
    assert code == 200 and json.loads(status)["lines"] == ["writing the demo benchmark ...",
                                                            "generating pairs: 8/40 items"]
    assert seen["rebinding"][0] == 403
    assert echoed[0].endswith(f"progress at http://127.0.0.1:{port}/") and echoed[-1] == "generating pairs: 8/40 items"
    with socket.socket() as s:  # the app can take the port now (uvicorn binds with SO_REUSEADDR too)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_a_failed_build_is_shown_and_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.errors import WorkspaceError

    monkeypatch.setattr(time, "sleep", lambda s: None)  # the pause that lets the page show it
    port = first_start.pick_port("127.0.0.1", None)
    statuses: list[dict[str, Any]] = []

    def build(say: Any) -> None:
        say("step one")
        raise WorkspaceError("disk full")

    real_fail = first_start.BuildLog.fail

    def fail(self: first_start.BuildLog, message: str) -> None:
        real_fail(self, message)
        statuses.append(json.loads(get(f"http://127.0.0.1:{port}/visrl-build-status")[1]))

    monkeypatch.setattr(first_start.BuildLog, "fail", fail)
    with pytest.raises(WorkspaceError, match="disk full"):
        first_start.build_with_page(tmp_path, build, "127.0.0.1", port, echo=lambda line: None)
    assert statuses[0]["error"] == "disk full" and statuses[0]["lines"] == ["step one"]


def test_ensure_workspace_builds_the_demo_through_the_builder(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl import demo
    from visrl_app import main

    built: list[Path] = []
    monkeypatch.setattr(demo, "create_demo_workspace",
                        lambda root, progress: built.append(root) or progress("done"))
    said: list[str] = []
    runs: list[Path] = []

    def builder(root: Path, build: Any) -> None:
        runs.append(root)
        build(said.append)

    root = main.ensure_workspace(None, builder)
    assert runs == built == [root] and said == ["done"] and root.name == "demo"
    (root / demo.COMPLETE).parent.mkdir(parents=True, exist_ok=True)
    (root / demo.COMPLETE).write_text("{}")
    assert main.ensure_workspace(None, builder) == root and len(runs) == 1  # built once
