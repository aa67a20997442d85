"""Refuse cross-site requests to the app (CSRF) and bound request bodies, as ASGI middleware.

Why gradio's own checks are not enough (gradio 6.31):

- ``/gradio_api/upload`` takes ``multipart/form-data``, a content type browsers send cross-site
  with no CORS preflight: any web page the user visits could POST files into gradio's temp folder
  (measured: 200 MB in 1.3 s, answered 200) or call an event through ``/gradio_api/queue/join``.
- On a non-loopback address gradio's CORS middleware reflects *any* ``Origin`` with
  ``Access-Control-Allow-Credentials: true``, and its login cookie is ``SameSite=None``: a
  foreign page could read an authenticated app's data.

So a request is refused with 403 when the browser says it comes from elsewhere:

- any request whose ``Origin`` is not this app's own ``scheme://host:port`` (browsers send
  ``Origin`` on every cross-origin fetch and on every POST; ``Origin: null`` — a sandboxed
  frame, a ``file://`` page — is refused too);
- a state-changing request (anything but GET, HEAD, OPTIONS; every websocket) whose
  ``Sec-Fetch-Site`` is not ``same-origin`` or ``none`` (``same-site`` is refused as well:
  another app on ``localhost:8000`` is the same *site* as ``localhost:7860``).

A request without either header (curl, gradio_client, a test) is not from a browser page and
passes, as does a plain link to the app from another site (a GET navigation carries no
``Origin``). The body of a write is bounded too: a declared ``Content-Length`` over the limit is
a 413 before anything is read, and a chunked body is cut off at the limit.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
SAME_ORIGIN_SITES = frozenset({"same-origin", "none"})  # "none": typed URL, bookmark, reload
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def same_origin(origin: str, host: str) -> bool:
    """True when the ``Origin`` header names the same host and port as the ``Host`` header.

    Only host and port are compared, not the scheme: behind a TLS proxy the page is ``https``
    while the app sees plain ``http``. A ``Host`` without a port means the default port of the
    origin's scheme.
    """
    try:
        theirs = urlsplit(origin.strip())
        ours = urlsplit("//" + host.strip())
        if theirs.scheme not in _DEFAULT_PORTS or not theirs.hostname or not ours.hostname:
            return False
        default = _DEFAULT_PORTS[theirs.scheme]
        return (theirs.hostname.lower() == ours.hostname.lower()
                and (theirs.port or default) == (ours.port or default))
    except ValueError:  # a port that is not a number, a bad IPv6 literal
        return False


def cross_site_reason(method: str, headers: dict[bytes, bytes]) -> str | None:
    """Why a request with these (lower-case) headers is refused as cross-site, or None.

    ``method`` is the HTTP method; ``"WEBSOCKET"`` for a websocket handshake (a write).
    """
    host = headers.get(b"host", b"").decode("latin-1")
    origin = headers.get(b"origin")
    if origin is not None and not same_origin(origin.decode("latin-1"), host):
        return f"cross-origin request refused (Origin {origin.decode('latin-1')[:100]!r} is not this app)"
    site = headers.get(b"sec-fetch-site")
    if method not in SAFE_METHODS and site is not None:
        value = site.decode("latin-1").strip().lower()
        if value not in SAME_ORIGIN_SITES:
            return f"cross-site write refused (Sec-Fetch-Site: {value[:40]}); use the app's own page"
    return None


class SameOriginOnly:
    """ASGI middleware: 403 for a cross-site request (:func:`cross_site_reason`), 413 for a write
    whose body is over ``max_body_bytes``."""

    def __init__(self, app: Any, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        method = scope.get("method", "GET") if scope["type"] == "http" else "WEBSOCKET"
        reason = cross_site_reason(method, headers)
        if reason is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await _plain(send, 403, reason)
            return
        if scope["type"] == "http" and method not in SAFE_METHODS:
            declared = headers.get(b"content-length", b"").strip()
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                await _plain(send, 413, f"request body of {int(declared):,} bytes is over the limit of "
                             f"{self.max_body_bytes:,} bytes; send a smaller file")
                return
            receive = _bounded(receive, self.max_body_bytes)
        await self.app(scope, receive, send)


def _bounded(receive: Any, limit: int) -> Any:
    """``receive`` that reports a disconnect once the body passes ``limit`` bytes (a chunked
    body declares no length up front)."""
    seen = 0

    async def bounded() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                return {"type": "http.disconnect"}
        return message

    return bounded


async def _plain(send: Any, status: int, text: str) -> None:
    body = text.encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
