"""Assemble the tabs into one ``gr.Blocks`` and launch it safely.

Safety defaults: binds 127.0.0.1; any other address needs ``auth`` (refused otherwise); a local
app answers only requests whose ``Host`` is a loopback name (a DNS-rebinding page gets 403);
every app refuses cross-site requests and uploads over a size limit (:mod:`visrl_app.same_origin`)
and deletes gradio's temp files after an hour (:data:`DELETE_CACHE`);
serves only the workspace's ``images/`` (rendered crops and plots go through gradio's own temp
folder), never the store, weights, logs or configs; no run history in the browser and no API page
link (pairs hold private data).

Why the store must never be served: gradio's file route opens and closes the file it serves, and
closing *any* descriptor of ``visrl.db`` in the app process drops every POSIX lock the process
holds on it (SQLite's own connections included). Another process then believes it is the last
user, checkpoints and deletes the WAL the app is still writing, and confirmed decisions vanish. Importing this module imports neither torch nor
transformers (the Chat and Evaluate tabs load them on first use).
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no network calls from a private desk

import gradio as gr  # noqa: E402

from visrl.errors import ConfigError  # noqa: E402
from visrl.workspace import Workspace  # noqa: E402
from visrl_app.chat_tab import create_chat_tab  # noqa: E402
from visrl_app.context import AppContext  # noqa: E402
from visrl_app.evaluate_tab import create_evaluate_tab  # noqa: E402
from visrl_app.generate_tab import create_generate_tab  # noqa: E402
from visrl_app.pairs_tab import create_pairs_tab  # noqa: E402
from visrl_app.train_tab import create_train_tab  # noqa: E402

ASSETS = Path(__file__).resolve().parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
# Largest upload (the Chat tab's image): 50 MB is ~4x a 48 MP phone JPEG and far above what the
# 64 M-pixel budget decodes; `visrl-app --max-upload-mb` changes it.
MAX_UPLOAD_MB = 50
# Gradio's temp files (uploads, rendered crops and plots): every 10 min, those older than 1 h are
# deleted (a chat keeps its image for an hour), and all of them when the app stops.
DELETE_CACHE = (600, 3600)
# SQLite's side files: the write-ahead log, its shared-memory index, a rollback journal.
STORE_SUFFIXES = ("", "-wal", "-shm", "-journal")


def build_app(workspace: str | Path | Workspace, user: str | None = None) -> gr.Blocks:
    """The app for ``workspace`` (a folder or an opened Workspace); launch with :func:`launch`.
    ``user`` names the reviewer on audit rows when there is no login (see AppContext)."""
    ctx = AppContext.open(workspace, user)
    with gr.Blocks(title="VisRL", analytics_enabled=False, delete_cache=DELETE_CACHE) as blocks:
        gr.Markdown(f"## VisRL · workspace `{ctx.root}`", elem_id="visrl-header")
        with gr.Tabs():
            with gr.Tab("Pairs", id="pairs", elem_id="tab-pairs"):
                pairs = create_pairs_tab(ctx)
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = create_generate_tab(ctx)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = create_train_tab(ctx)
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                evaluate = create_evaluate_tab(ctx)
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat = create_chat_tab(ctx)
        for tab in (pairs, generate, train, evaluate, chat):
            tab.wire_load(blocks)
    return blocks


def is_local(host: str) -> bool:
    """True for loopback addresses (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, auth: Logins | tuple[str, str] | None) -> None:
    """Refuse to serve a non-loopback address without a password (pairs are private data)."""
    if not is_local(host) and auth is None:
        raise ConfigError(
            f"refusing to listen on {host} without a password: anyone who can reach it could read "
            "and change your data. Pass --auth USER:PASSWORD, or use --host 127.0.0.1")


Logins = list[tuple[str, str]]


def parse_auth(entries: str | list[str] | tuple[str, ...] | None, auth_file: str | Path | None = None) -> Logins | None:
    """Logins from ``--auth USER:PASSWORD`` (repeatable) and ``--auth-file`` (one per line).

    A curation team needs one login per reviewer: the login name is the reviewer on every audit
    row, so two people sharing one login could undo each other's work as their own.
    """
    texts = [entries] if isinstance(entries, str) else list(entries or [])
    if auth_file is not None:
        path = Path(auth_file)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--auth-file {path}: cannot read it ({exc.__class__.__name__}); "
                              "give a UTF-8 text file with one USER:PASSWORD per line") from None
        texts += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    logins: Logins = []
    for number, text in enumerate(texts, 1):
        user, sep, password = text.partition(":")
        if not sep or not user.strip() or not password:
            raise ConfigError(f"login {number} must be USER:PASSWORD with both parts non-empty "
                              "(--auth or a line of --auth-file)")
        if user.strip() in {name for name, _ in logins}:
            raise ConfigError(f"login {user.strip()!r} is given twice; give each reviewer one login")
        logins.append((user.strip(), password))
    return logins or None


def served_paths(workspace: Workspace) -> tuple[list[str], list[str]]:
    """(allowed, blocked) folders and files for gradio's file route.

    Allowed: ``images/`` only (pages show PIL renderings, which gradio writes to its own temp
    folder and serves from there). Blocked, which wins over every allowed and temp folder: the
    store and its side files, ``models/`` (weights), ``runs/`` (logs, job configs),
    ``exports/`` and ``configs/``, even if a symlink in ``images/`` points at them.
    """
    root = workspace.root.resolve()
    blocked = [str(root / f"{workspace.db_path.name}{suffix}") for suffix in STORE_SUFFIXES]
    blocked += [str(root / name) for name in ("models", "runs", "exports", "configs")]
    return [str(workspace.images_dir.resolve())], blocked


def host_is_local(header: str | None) -> bool:
    """True for a ``Host`` header naming loopback (localhost, 127.0.0.0/8, [::1]), any port.

    A DNS-rebinding page reaches a loopback app under its own name (``evil.example:7860``), so
    the name, not the port, is what tells a local user from a foreign page.
    """
    if not header:
        return False
    try:
        name = urlsplit("//" + header).hostname
    except ValueError:
        return False
    return bool(name) and is_local(name)


class LoopbackHostOnly:
    """ASGI middleware: 403 for an HTTP or websocket request whose ``Host`` is not loopback."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not host_is_local(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = b"unknown Host header: this app answers only on localhost"
                await send({"type": "http.response.start", "status": 403,
                            "headers": [(b"content-type", b"text/plain"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def launch_kwargs(workspace: Workspace, host: str = "127.0.0.1",
                  max_upload_mb: int = MAX_UPLOAD_MB) -> dict[str, Any]:
    """The privacy and asset settings every launch uses (tests launch with the same).

    A loopback ``host`` also gets :class:`LoopbackHostOnly`; an app on another address has a
    password and whatever name the network gives it. Every app refuses cross-site requests
    (:class:`~visrl_app.same_origin.SameOriginOnly`) and uploads over ``max_upload_mb``.
    """
    from starlette.middleware import Middleware

    from visrl_app.same_origin import SameOriginOnly

    allowed, blocked = served_paths(workspace)
    max_bytes = max_upload_mb * 1024 * 1024
    middleware = [Middleware(LoopbackHostOnly)] if is_local(host) else []
    # + 1 MB for the multipart framing around the one file of an upload
    middleware.append(Middleware(SameOriginOnly, max_body_bytes=max_bytes + 1024 * 1024))
    return {
        "max_file_size": max_bytes,
        "allowed_paths": allowed,
        "blocked_paths": blocked,
        "app_kwargs": {"middleware": middleware},
        "run_history": False,  # nothing recorded in the browser; the runs page is off
        "footer_links": ["gradio", "settings"],  # no link to the API page
        "head": "<script>" + (ASSETS / "keyboard.js").read_text(encoding="utf-8") + "</script>",
        "css": (ASSETS / "style.css").read_text(encoding="utf-8"),
        "show_error": True,
    }


def launch(workspace: str | Path | Workspace, host: str = "127.0.0.1", port: int | None = None,
           auth: Logins | tuple[str, str] | None = None, prevent_thread_lock: bool = False,
           quiet: bool = False, user: str | None = None, max_upload_mb: int = MAX_UPLOAD_MB) -> gr.Blocks:
    """Build and serve the app. Raises ConfigError for a non-local host without ``auth``."""
    check_bind(host, auth)
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    blocks = build_app(ws, user)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_name=host, server_port=port, auth=auth, prevent_thread_lock=prevent_thread_lock,
                  quiet=quiet, inbrowser=False, share=False, **launch_kwargs(ws, host, max_upload_mb))
    return blocks
