"""Hostile inputs to the app and the import (issue 18): each is refused, and nothing is written.

The app: a cross-site page cannot upload (gradio's ``/gradio_api/upload`` takes
``multipart/form-data`` with no CORS preflight), call an event or read the API; an upload over
the size limit is a 413; uploads are cleaned up. The app's own page keeps working. The import:
one list of image formats with serve (TIFF refused), stored file names without control or bidi
characters, text values within a length limit.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl.cli import main
from visrl.errors import DataError
from visrl.formats import import_file
from visrl.formats.images import safe_stem
from visrl.formats.records import MAX_TEXT_CHARS
from visrl.images import ACCEPTED_IMAGE_FORMATS, peek_image
from visrl.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from test_app import seed_pairs  # noqa: E402
from test_faults import integrity_ok, save_png, snapshot, vqa, write_json  # noqa: E402

UPLOAD = "/gradio_api/upload"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """The app on a free loopback port with a 1 MB upload limit and its own gradio temp folder."""
    from visrl_app.app import launch

    uploads = tmp_path / "gradio-tmp"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))  # read when the app is created
    port = free_port()
    blocks = launch(seed_pairs(tmp_path / "ws"), port=port, prevent_thread_lock=True, quiet=True,
                    max_upload_mb=1)
    try:
        yield {"port": port, "origin": f"http://127.0.0.1:{port}", "uploads": uploads, "blocks": blocks}
    finally:
        blocks.close()


def request(port: int, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def multipart(name: str, data: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body holding one file, as a browser's form or fetch sends it."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def upload(app: dict[str, Any], data: bytes, **headers: str) -> tuple[int, bytes]:
    body, kind = multipart("x.png", data)
    return request(app["port"], "POST", UPLOAD, body, {"Content-Type": kind, **headers})


def stored_uploads(app: dict[str, Any]) -> list[Path]:
    return sorted(p for p in app["uploads"].rglob("*") if p.is_file())


def png_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------- the app: cross-site writes

CROSS_SITE = {
    "foreign Origin": {"Origin": "https://evil.example"},
    "foreign Origin, same host other port": {"Origin": "http://127.0.0.1:1"},
    "Origin null (sandboxed frame, file:// page)": {"Origin": "null"},
    "Sec-Fetch-Site cross-site": {"Sec-Fetch-Site": "cross-site"},
    "Sec-Fetch-Site same-site (another localhost app)": {"Sec-Fetch-Site": "same-site"},
}


@pytest.mark.parametrize("case", list(CROSS_SITE))
def test_cross_site_upload_is_403_and_stores_nothing(app: dict[str, Any], case: str) -> None:
    status, body = upload(app, png_bytes(), **CROSS_SITE[case])
    assert status == 403, body
    assert b"refused" in body and b"Traceback" not in body
    assert stored_uploads(app) == []


@pytest.mark.parametrize("case", list(CROSS_SITE))
def test_cross_site_event_call_is_403(app: dict[str, Any], case: str) -> None:
    payload = json.dumps({"data": [], "fn_index": 0, "session_hash": "x"}).encode()
    status, _ = request(app["port"], "POST", "/gradio_api/queue/join", payload,
                        {"Content-Type": "application/json", **CROSS_SITE[case]})
    assert status == 403


def test_cross_origin_read_is_403_but_a_link_from_another_site_opens_the_app(app: dict[str, Any]) -> None:
    """On a network address gradio answers any Origin with credentials allowed; a page of another
    site must not read the config (pairs, paths). A plain link (no Origin) still opens the app."""
    assert request(app["port"], "GET", "/config", headers={"Origin": "https://evil.example"})[0] == 403
    assert request(app["port"], "GET", "/", headers={"Sec-Fetch-Site": "cross-site",
                                                     "Sec-Fetch-Mode": "navigate"})[0] == 200


@pytest.mark.parametrize("headers", [
    {"Origin": "{origin}", "Sec-Fetch-Site": "same-origin"},  # the app's own page
    {"Sec-Fetch-Site": "same-origin"},
    {"Sec-Fetch-Site": "none"},  # typed in the address bar
    {},  # not a browser: curl, gradio_client
], ids=["own page", "same-origin only", "none", "no browser headers"])
def test_same_origin_upload_is_stored(app: dict[str, Any], headers: dict[str, str]) -> None:
    headers = {k: v.format(origin=app["origin"]) for k, v in headers.items()}
    status, body = upload(app, png_bytes(), **headers)
    assert status == 200, body
    [path] = json.loads(body)
    assert Path(path).read_bytes() == png_bytes() and stored_uploads(app) == [Path(path)]


# ---------------------------------------------------------------------- the app: upload size, cleanup

def test_upload_over_the_limit_is_413_and_stores_nothing(app: dict[str, Any]) -> None:
    origin = {"Origin": app["origin"], "Sec-Fetch-Site": "same-origin"}
    big = b"\0" * (3 * 1024 * 1024)  # over the 1 MB limit and the body cap (limit + 1 MB)
    status, body = upload(app, big, **origin)
    assert status == 413 and b"over the limit" in body, body
    just_over = b"\0" * (1024 * 1024 + 10)  # within the body cap: gradio's own per-file limit answers
    status, body = upload(app, just_over, **origin)
    assert status == 413 and b"maximum allowed size" in body, body
    assert stored_uploads(app) == []


def test_chunked_upload_over_the_cap_is_cut_off(app: dict[str, Any]) -> None:
    """A body without a Content-Length is counted as it arrives and cut off at the cap."""
    body, kind = multipart("x.png", b"\0" * (3 * 1024 * 1024))
    conn = http.client.HTTPConnection("127.0.0.1", app["port"], timeout=30)
    try:
        conn.putrequest("POST", UPLOAD)
        conn.putheader("Content-Type", kind)
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        try:
            for start in range(0, len(body), 65536):
                chunk = body[start:start + 65536]
                conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            conn.send(b"0\r\n\r\n")
            status = conn.getresponse().status
        except (ConnectionError, http.client.HTTPException):
            status = None  # the server closed the connection: also a refusal
    finally:
        conn.close()
    assert status != 200
    assert stored_uploads(app) == []


def test_uploads_are_deleted_by_gradios_cache_cleanup(app: dict[str, Any]) -> None:
    from gradio.route_utils import delete_files_created_by_app

    from visrl_app.app import DELETE_CACHE

    blocks = app["blocks"]
    assert blocks.delete_cache == DELETE_CACHE and DELETE_CACHE[1] >= 3600  # a chat keeps its image 1 h
    status, body = upload(app, png_bytes())
    [path] = json.loads(body)
    assert status == 200 and Path(path).is_file()
    delete_files_created_by_app(blocks, age=0)  # what the scheduled cleanup runs, files aged past
    assert not Path(path).exists()


def test_cli_takes_the_upload_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import visrl_app.app as app_module
    from visrl_app.main import main as app_main

    seen: dict[str, Any] = {}
    monkeypatch.setattr(app_module, "launch", lambda root, **kw: seen.update(kw))
    seed_pairs(tmp_path / "ws")
    app_main(["--workspace", str(tmp_path / "ws"), "--max-upload-mb", "7"])
    assert seen["max_upload_mb"] == 7
    with pytest.raises(SystemExit):
        app_main(["--workspace", str(tmp_path / "ws"), "--max-upload-mb", "0"])


# ---------------------------------------------------------------------- the middleware's rule

@pytest.mark.parametrize(("method", "headers", "refused"), [
    ("POST", {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}, False),
    ("POST", {"host": "localhost:7860", "origin": "http://LOCALHOST:7860"}, False),
    ("POST", {"host": "[::1]:7860", "origin": "http://[::1]:7860"}, False),
    ("POST", {"host": "app.example", "origin": "https://app.example"}, False),  # behind a TLS proxy
    ("POST", {"host": "app.example:443", "origin": "https://app.example"}, False),
    ("POST", {"host": "127.0.0.1:7860", "origin": "http://localhost:7860"}, True),  # another origin
    ("POST", {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7861"}, True),
    ("POST", {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:x"}, True),
    ("POST", {"host": "127.0.0.1:7860", "origin": "chrome-extension://abc"}, True),
    ("POST", {"host": "127.0.0.1:7860", "sec-fetch-site": "cross-site"}, True),
    ("POST", {"host": "127.0.0.1:7860", "sec-fetch-site": "same-site"}, True),
    ("POST", {"host": "127.0.0.1:7860", "sec-fetch-site": "same-origin"}, False),
    ("DELETE", {"host": "127.0.0.1:7860", "sec-fetch-site": "cross-site"}, True),
    ("WEBSOCKET", {"host": "127.0.0.1:7860", "origin": "https://evil.example"}, True),
    ("WEBSOCKET", {"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:7860"}, False),
    ("GET", {"host": "127.0.0.1:7860", "sec-fetch-site": "cross-site"}, False),  # a link: navigation
    ("GET", {"host": "127.0.0.1:7860", "origin": "https://evil.example"}, True),  # a CORS read
    ("GET", {"host": "127.0.0.1:7860"}, False),
])
def test_cross_site_rule(method: str, headers: dict[str, str], refused: bool) -> None:
    from visrl_app.same_origin import cross_site_reason

    raw = {k.encode(): v.encode() for k, v in headers.items()}
    assert (cross_site_reason(method, raw) is not None) == refused


# ---------------------------------------------------------------------- the import

def tiff_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Store, Path, Path]:
    """(store with one committed import, its workspace, a source folder with ok.png)."""
    src = tmp_path / "src"
    save_png(src / "ok.png")
    ws = tmp_path / "workspace"
    store = Store.open(ws)
    import_file(store, write_json(src / "first.json", [vqa("ok.png")]), "vqa", dataset="first")
    return store, ws, src


def refused_import(ws: Path, path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(path), "--format", "vqa", "-w", str(ws)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("Error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and len(err) < 600
    return err


def test_import_and_serve_accept_one_list_of_formats() -> None:
    import visrl.formats.images as import_images

    assert import_images.ACCEPTED_IMAGE_FORMATS is ACCEPTED_IMAGE_FORMATS
    assert "TIFF" not in ACCEPTED_IMAGE_FORMATS
    with pytest.raises(DataError, match="not a readable image"):
        peek_image(tiff_bytes())  # what serve, infer and Chat call


def test_tiff_import_is_refused_and_changes_nothing(seeded: tuple[Store, Path, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    store, ws, src = seeded
    (src / "scan.tif").write_bytes(tiff_bytes())
    before = snapshot(store)
    err = refused_import(ws, write_json(src / "d.json", [vqa("ok.png"), vqa("scan.tif", id="b")]), capsys)
    assert "record 1, field 'image': 'scan.tif' is a TIFF image, a format VisRL does not take" in err
    assert "PNG, JPEG, WEBP, GIF, BMP" in err
    assert snapshot(store) == before and integrity_ok(store)


def test_jpeg_scan_bomb_import_is_refused_before_decoding(seeded: tuple[Store, Path, Path],
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from test_abuse import scan_bomb  # the bomb: 4096² progressive, its last scan x 1,000

    store, ws, src = seeded
    (src / "bomb.jpg").write_bytes(scan_bomb())
    before = snapshot(store)
    started = time.monotonic()
    err = refused_import(ws, write_json(src / "d.json", [vqa("ok.png"), vqa("bomb.jpg", id="b")]), capsys)
    assert time.monotonic() - started < 10  # decoding it whole took 18.7 s
    assert "record 1, field 'image': 'bomb.jpg' is refused before decoding (its markers: the JPEG has" in err, err
    assert snapshot(store) == before and integrity_ok(store)


@pytest.mark.parametrize(("field", "record"), [
    ("question", vqa("ok.png", question="why? " * 2_000_001)),  # 10 MB
    ("answer", vqa("ok.png", answer="a" * (MAX_TEXT_CHARS + 1))),
    ("id", vqa("ok.png", id="i" * (MAX_TEXT_CHARS + 1))),
])
def test_overlong_text_is_refused_naming_record_and_field(seeded: tuple[Store, Path, Path], field: str,
                                                          record: dict[str, Any],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    store, ws, src = seeded
    before = snapshot(store)
    err = refused_import(ws, write_json(src / "d.json", [vqa("ok.png", id="a"), record]), capsys)
    assert f"record 1, field '{field}': holds" in err and f"the limit is {MAX_TEXT_CHARS:,}" in err, err
    assert snapshot(store) == before and integrity_ok(store)


def test_text_at_the_limit_is_imported(seeded: tuple[Store, Path, Path]) -> None:
    store, _, src = seeded
    question = "q" * MAX_TEXT_CHARS
    import_file(store, write_json(src / "d.json", [vqa("ok.png", question=question)]), "vqa", dataset="d")
    assert store.items("d")[0]["question"] == question


# U+202E right-to-left override, U+2066-2069 isolates, U+200B zero width, U+2028 line separator
UNSAFE_NAMES = {
    "newline": "two\nlines",
    "tab and ESC": "a\tb\x1b[31mred",
    "right-to-left override": "rtl\u202egnp.exe",
    "bidi embeddings and isolates": "x\u202a\u202b\u202c\u202d\u2066\u2067\u2068\u2069y",
    "zero width and line separator": "a\u200bb\u2028c\u2029d",
    "hidden file": ".hidden",
    "only controls": "\n\t",
}


@pytest.mark.parametrize("case", list(UNSAFE_NAMES))
def test_stored_names_hold_no_control_or_bidi_characters(store: Store, tmp_path: Path, case: str) -> None:
    import unicodedata

    stem = UNSAFE_NAMES[case]
    save_png(tmp_path / f"{stem}.png")
    import_file(store, write_json(tmp_path / "d.json", [vqa(f"{stem}.png")]), "vqa", dataset="d")
    [item] = store.items("d")
    name = Path(item["image"]).name
    assert not any(unicodedata.category(ch)[0] in "CZ" and ch != " " for ch in name), repr(name)
    assert not name.startswith(".")
    assert store.workspace.absolute(item["image"]).read_bytes() == (tmp_path / f"{stem}.png").read_bytes()
    assert name.startswith(safe_stem(stem) + "-") and name.endswith(".png")


@pytest.mark.parametrize(("stem", "expected"), [
    ("rtl\u202egnp.exe", "rtl_gnp.exe"),
    ("two\nlines", "two_lines"),
    ("..x", "x"),
    ("\n", "_"),
    ("...", "image"),
    ("photo 1", "photo 1"),
    ("café", "café"),  # letters of any script stay
    ("y" * 200, "y" * 80),
])
def test_safe_stem(stem: str, expected: str) -> None:
    assert safe_stem(stem) == expected


# ---------------------------------------------------------------------- the same, in a real browser

@pytest.mark.browser
def test_the_apps_own_page_uploads_an_image(app: dict[str, Any], browser: Any, tmp_path: Path) -> None:
    """Chromium's own headers (Origin, Sec-Fetch-Site) on the app's page pass the check."""
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes((40, 30)))
    page = browser.new_page()
    try:
        page.goto(app["origin"] + "/")
        page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=120_000)  # the page is live
        page.get_by_role("tab", name="Chat").click(timeout=60_000)
        with page.expect_response(lambda r: UPLOAD in r.url, timeout=60_000) as answer:
            page.locator("#chat-image input[type=file]").set_input_files(str(image), timeout=60_000)
        assert answer.value.status == 200
        page.wait_for_selector("#chat-image img", timeout=60_000)
    finally:
        page.close()
    assert image.read_bytes() in [p.read_bytes() for p in stored_uploads(app)]


@pytest.fixture
def foreign_site() -> Iterator[str]:
    """Another web server on this machine (a dev server, a compromised local tool): its page's
    origin is ``http://localhost:<other port>``, a different site from ``127.0.0.1:<app port>``."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            body = b"<html><body>cat pictures</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.browser
def test_a_foreign_page_cannot_upload_or_read(app: dict[str, Any], browser: Any, foreign_site: str) -> None:
    """A page of another site POSTs a file to the app the way an attack would (FormData, no-cors:
    no preflight) and tries to read its config: the server answers 403 to both, stores nothing."""
    page = browser.new_page()
    statuses: dict[str, int] = {}
    page.on("response", lambda r: statuses.update({r.url.split(str(app["port"]), 1)[-1]: r.status}))
    try:
        page.goto(foreign_site)
        read = page.evaluate("""async (origin) => {
            const form = new FormData();
            form.append("files", new Blob([new Uint8Array(4096)]), "x.png");
            let sent = "sent";
            try {
                await fetch(origin + "/gradio_api/upload", {method: "POST", body: form, mode: "no-cors",
                                                            credentials: "include"});
            } catch (e) { sent = "failed: " + e; }
            // gradio lets a localhost page read a loopback app (CORS): what it reads is the 403
            try { const r = await fetch(origin + "/config"); return sent + ", " + r.status; }
            catch (e) { return sent + ", blocked"; }
        }""", app["origin"])
    finally:
        page.close()
    assert statuses.get(UPLOAD) == 403, (statuses, read)  # the request reached the app, which refused it
    assert statuses.get("/config") == 403 and read in ("sent, 403", "sent, blocked"), (statuses, read)
    assert stored_uploads(app) == []
