"""First start: a "building the demo workspace…" page while the demo workspace is built.

Building the demo (benchmark, model, a first generation run) takes minutes on a small CPU. With
nothing listening meanwhile, a user who opened the address sees "connection refused" and gives
up. So :func:`build_with_page` listens first, on the address the app will use, with a plain page
(standard library only) showing the elapsed time and each step, builds in a background thread,
then closes the page's server; the app starts on the same port and the page, which polls,
reloads into it.
"""

from __future__ import annotations

import html
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

PORT_TRIES = 100  # like gradio: the first free port from 7860 ($GRADIO_SERVER_PORT) on
MAX_LINES = 50  # lines the page shows (a build says ~6)
PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>VisRL · building the demo workspace</title>
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:3rem auto;padding:0 1rem;color:#1f2937}}
pre{{background:#f3f4f6;padding:1rem;border-radius:.5rem;white-space:pre-wrap}}</style></head><body>
<h2>Building the demo workspace…</h2>
<p>First start only: the demo benchmark, the demo model and a first set of preference pairs are made
in <code>{root}</code>. This page opens the app by itself when it is ready.</p>
<p id="elapsed">elapsed: {elapsed}</p><pre id="lines">{lines}</pre>
<script>
async function poll() {{
  try {{
    const r = await fetch("/visrl-build-status", {{cache: "no-store"}});
    if (r.ok) {{
      const s = await r.json();
      document.getElementById("elapsed").textContent = "elapsed: " + s.elapsed + (s.error ? "" : " …");
      document.getElementById("lines").textContent = s.lines.join("\\n") + (s.error ? "\\nfailed: " + s.error : "");
      if (s.error) return;
    }} else {{ setTimeout(() => location.reload(), 1000); return; }}
  }} catch (e) {{ /* the app is taking over this port */ }}
  setTimeout(poll, 1000);
}}
setTimeout(poll, 1000);
</script></body></html>"""


class BuildLog:
    """Lines said by the build, its start time, and its error (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.lines: list[str] = []
        self.error: str | None = None
        self.started = time.monotonic()

    def say(self, line: str) -> None:
        with self._lock:
            self.lines = [*self.lines, line][-MAX_LINES:]

    def fail(self, message: str) -> None:
        with self._lock:
            self.error = message

    def status(self) -> dict[str, Any]:
        with self._lock:
            seconds = int(time.monotonic() - self.started)
            return {"elapsed": f"{seconds // 60}m{seconds % 60:02d}s", "lines": list(self.lines),
                    "error": self.error}


def pick_port(host: str, port: int | None) -> int:
    """``port``, or the first free port from ``$GRADIO_SERVER_PORT`` (7860) on, like gradio."""
    if port:
        return port
    first = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    for candidate in range(first, first + PORT_TRIES):
        with socket.socket(_family(host)) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return candidate
    raise OSError(f"no free port in {first}-{first + PORT_TRIES - 1} on {host}; pass --port")


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def page_server(root: Path, host: str, port: int, log: BuildLog,
                host_ok: Callable[[str | None], bool] | None) -> ThreadingHTTPServer:
    """The building page on ``host:port``, served from a daemon thread; ``host_ok`` checks the
    Host header (a local app answers only loopback names, as the app itself does)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            if host_ok is not None and not host_ok(self.headers.get("Host")):
                self._send(403, "text/plain", b"unknown Host header: this app answers only on localhost")
            elif self.path.startswith("/visrl-build-status"):
                self._send(200, "application/json", json.dumps(log.status()).encode())
            else:
                status = log.status()
                body = PAGE.format(root=html.escape(str(root)), elapsed=status["elapsed"],
                                   lines=html.escape("\n".join(status["lines"])))
                self._send(200, "text/html; charset=utf-8", body.encode())

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (quiet: no access log)
            return

    class Server(ThreadingHTTPServer):
        address_family = _family(host)
        daemon_threads = True

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="visrl-build-page", daemon=True).start()
    return server


def build_with_page(root: Path, build: Callable[[Callable[[str], None]], Any], host: str, port: int,
                    host_ok: Callable[[str | None], bool] | None = None,
                    echo: Callable[[str], None] = print) -> None:
    """Serve the building page on ``host:port`` while ``build(say)`` runs in a thread; returns
    when the build is done (the port is free again), re-raises the build's exception."""
    log = BuildLog()

    def say(line: str) -> None:
        log.say(line)
        echo(line)

    server = page_server(root, host, port, log, host_ok)
    shown = f"[{host}]" if ":" in host else host
    echo(f"building the demo workspace in {root} (first start only); progress at http://{shown}:{port}/")
    failure: list[BaseException] = []

    def run() -> None:
        try:
            build(say)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            log.fail(str(exc))
            failure.append(exc)

    worker = threading.Thread(target=run, name="visrl-demo-build")
    worker.start()
    worker.join()
    if failure:
        time.sleep(2.0)  # the page polls every second: let it show the error
    server.shutdown()
    server.server_close()
    if failure:
        raise failure[0]
