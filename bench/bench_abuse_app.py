"""Abuse of the app and the import (issue 18): what each hostile input gets, and how fast.

    .venv/bin/python bench/bench_abuse_app.py

The app runs in this process on a free loopback port (upload limit 50 MB, its own gradio temp
folder); each case is one raw HTTP request. The 200 MB cross-site upload is the issue's repro
(gradio stored it in 1.3 s): the client sends headers and the first 1 MB, then reads the answer,
as a browser would get it. Import cases run ``visrl import`` in-process on a throw-away workspace
and check the store and image files are unchanged after a refusal.

Prints a table (case, answer, time) and writes bench/results/abuse_app.json.
"""

from __future__ import annotations

import io
import json
import os
import platform
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import redirect_stderr
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from PIL import Image  # noqa: E402
from test_abuse_inputs import free_port, multipart, png_bytes, seed_pairs, tiff_bytes  # noqa: E402
from test_faults import integrity_ok, save_png, snapshot, vqa, write_json  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "abuse_app.json"
UPLOAD = "/gradio_api/upload"


def raw_post(port: int, path: str, body: bytes, headers: dict[str, str], declared: int | None = None,
             send: int | None = None) -> tuple[int | None, str]:
    """POST over a raw socket: ``declared`` Content-Length (default: the body's), the first ``send``
    bytes of the body (default: all), then read the answer. (status, first line of the body)."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
            f"Content-Length: {declared if declared is not None else len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            conn.sendall(body[:send] if send is not None else body)
        except OSError:
            pass  # the server answered and closed before the whole body: read its answer
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except OSError:
            pass
    if not data.startswith(b"HTTP/1.1 "):
        return None, "connection closed"
    status = int(data.split(b" ", 2)[1])
    text = data.split(b"\r\n\r\n", 1)[-1].decode("utf-8", "replace").strip().splitlines()
    return status, (text[0] if text else "")[:90]


def app_cases(port: int, uploads: Path) -> list[dict[str, Any]]:
    origin = f"http://127.0.0.1:{port}"
    png = png_bytes()
    small, kind = multipart("x.png", png)
    big, big_kind = multipart("x.bin", b"\0" * (200 * 1024 * 1024))

    def upload(headers: dict[str, str], body: bytes = small, content: str = kind,
               **kw: Any) -> tuple[int | None, str]:
        return raw_post(port, UPLOAD, body, {"Content-Type": content, **headers}, **kw)

    cases: list[tuple[str, Callable[[], tuple[int | None, str]], int]] = [
        ("upload, foreign Origin", lambda: upload({"Origin": "https://evil.example"}), 403),
        ("upload, Origin null", lambda: upload({"Origin": "null"}), 403),
        ("upload, Sec-Fetch-Site cross-site", lambda: upload({"Sec-Fetch-Site": "cross-site"}), 403),
        ("upload, Sec-Fetch-Site same-site", lambda: upload({"Sec-Fetch-Site": "same-site"}), 403),
        ("upload 200 MB, foreign Origin", lambda: upload({"Origin": "https://evil.example"}, big, big_kind,
                                                          send=1024 * 1024), 403),
        ("event call, foreign Origin", lambda: raw_post(port, "/gradio_api/queue/join", b"{}", {
            "Content-Type": "application/json", "Origin": "https://evil.example"}), 403),
        ("upload 200 MB, same origin", lambda: upload({"Origin": origin}, big, big_kind, send=1024 * 1024), 413),
        ("upload, the app's own page", lambda: upload({"Origin": origin, "Sec-Fetch-Site": "same-origin"}), 200),
        ("upload, no browser headers", lambda: upload({}), 200),
    ]
    rows = []
    for name, run, expected in cases:
        start = time.perf_counter()
        status, text = run()
        rows.append({"case": name, "answer": f"{status} {text}", "ok": status == expected,
                     "time_s": round(time.perf_counter() - start, 3)})
    stored = sum(p.stat().st_size for p in uploads.rglob("*") if p.is_file())
    rows.append({"case": "bytes in gradio's temp folder after all", "answer": f"{stored:,}",
                 "ok": stored == len(png), "time_s": 0.0})
    return rows


def import_cases(tmp: Path) -> list[dict[str, Any]]:
    from visrl.cli import main
    from visrl.formats import import_file
    from visrl.store import Store

    src, ws = tmp / "src", tmp / "ws"
    save_png(src / "ok.png")
    store = Store.open(ws)
    import_file(store, write_json(src / "first.json", [vqa("ok.png")]), "vqa", dataset="first")
    (src / "scan.tif").write_bytes(tiff_bytes())
    for stem in ("rtl\u202egnp.exe", "two\nlines"):
        Image.new("RGB", (20, 20), (len(stem), 0, 0)).save(src / f"{stem}.png")
    bad = {
        "import a TIFF": [vqa("scan.tif")],
        "import a 10 MB question": [vqa("ok.png", question="why? " * 2_000_000)],
        "import a 9,000-character answer": [vqa("ok.png", answer="a" * 9_000)],
    }
    rows = []
    for name, records in bad.items():
        before = snapshot(store)
        path = write_json(src / "d.json", records)
        err = io.StringIO()
        start = time.perf_counter()
        with redirect_stderr(err):
            try:
                main(["import", str(path), "--format", "vqa", "-w", str(ws)])
            except SystemExit:
                pass
        elapsed = time.perf_counter() - start
        unchanged = snapshot(store) == before and integrity_ok(store)
        line = err.getvalue().strip()
        rows.append({"case": name, "answer": line[:140] + ("" if unchanged else " [STORE CHANGED]"),
                     "ok": line.startswith("Error: ") and unchanged, "time_s": round(elapsed, 3)})
    for stem, dataset in (("rtl\u202egnp.exe", "rtl"), ("two\nlines", "newline")):
        start = time.perf_counter()
        import_file(store, write_json(src / "n.json", [vqa(f"{stem}.png")]), "vqa", dataset=dataset)
        name = Path(store.items(dataset)[0]["image"]).name
        rows.append({"case": f"import file named {stem!r}.png", "answer": f"stored as {name!r}",
                     "ok": stem not in name and "_" in name, "time_s": round(time.perf_counter() - start, 3)})
    return rows


def main() -> None:
    from visrl_app.app import launch

    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
        workspace = seed_pairs(tmp / "app")
        for attempt in range(3):  # gradio's own start check (a HEAD, 3 s timeout) fails under heavy load
            port = free_port()
            try:
                blocks = launch(workspace, port=port, prevent_thread_lock=True, quiet=True)
                break
            except ValueError:
                if attempt == 2:
                    raise
        try:
            rows = app_cases(port, tmp / "gradio")
        finally:
            blocks.close()
        rows += import_cases(tmp / "import")
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  {'time s':>7}  ok  answer")
    for r in rows:
        print(f"{r['case']:<{width}}  {r['time_s']:>7.3f}  {'y' if r['ok'] else 'N':>2}  {r['answer']}")
    load = os.getloadavg()
    result = {"rows": rows, "all_ok": all(r["ok"] for r in rows), "load_avg": load,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "python": platform.python_version()}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} as expected; load average {load[0]:.1f}; wrote {RESULTS}")


if __name__ == "__main__":
    main()
