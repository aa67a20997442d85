"""Round trip of a review action through the browser: key press to the next pair on screen.

    .venv/bin/python bench/bench_desk_browser.py [--workspace DIR] [--presses 60]

Copies the workspace (default: the built-in demo one, built if missing) to a temporary folder so
nothing real changes, serves the app on it in this process, and drives the Pairs tab in headless
Chromium (/usr/bin/chromium): alternately Accept (the desk moves on) and Undo (the pair comes
back), timing from the button press to the desk's ticket line changing (the server answered and
the page applied it). Prints p50/p95 in milliseconds and writes bench/results/desk_browser.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).parent / "results" / "desk_browser.json"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Click a desk button and resolve with the milliseconds until #pairs-ticket shows the next view
# number ("#12"; any text change would also catch gradio's "0.6s" timer during the request).
PRESS_JS = """async (id) => {
  const el = document.querySelector('#pairs-ticket');
  const view = () => (el.textContent.match(/#(\\d+)/) || [])[1];
  const before = view();
  const t0 = performance.now();
  document.querySelector('#' + id).click();
  await new Promise((resolve) => {
    const check = () => (view() !== before ? resolve() : requestAnimationFrame(check));
    check();
  });
  return performance.now() - t0;
}"""


def round_trips(page: Any, presses: int) -> dict[str, Any]:
    """Alternate Accept and Undo ``presses`` times on an open desk page; p50/p95 per action."""
    runs: dict[str, list[float]] = {"accept": [], "undo": []}
    for n in range(presses):
        action = "accept" if n % 2 == 0 else "undo"
        runs[action].append(page.evaluate(PRESS_JS, f"pairs-{action}"))
    every = sorted(runs["accept"] + runs["undo"])
    summary = {name: _stats(values) for name, values in runs.items() if values}
    return {"all": _stats(every), **summary}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": round(statistics.median(ordered), 1),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 1),
            "max_ms": round(ordered[-1], 1)}


def main() -> None:
    from playwright.sync_api import sync_playwright

    from visrl.review import status_counts
    from visrl.store import Store
    from visrl_app.app import launch
    from visrl_app.main import ensure_workspace

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default=None, help="Workspace to copy (default: the demo one).")
    parser.add_argument("--presses", type=int, default=60)
    args = parser.parse_args()
    source = Path(args.workspace) if args.workspace else ensure_workspace(None)
    with tempfile.TemporaryDirectory(prefix="visrl-bench-desk-") as tmp:
        root = Path(tmp) / "ws"
        shutil.copytree(source, root, ignore=shutil.ignore_patterns("visrl.db*"))
        src, dst = sqlite3.connect(source / "visrl.db"), sqlite3.connect(root / "visrl.db")
        src.backup(dst)  # a consistent copy even while another process writes the source
        src.close()
        dst.close()
        pending = status_counts(Store.open(root))["pending"]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        blocks = launch(root, port=port, prevent_thread_lock=True, quiet=True)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=60_000)
                round_trips(page, 4)  # warm up: first renders, caches
                result = round_trips(page, args.presses)
                browser.close()
        finally:
            blocks.close()
    out = {"workspace": str(source), "pending_pairs": pending, "presses": args.presses, "round_trip": result,
           "target_p95_ms": 150, "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    print(json.dumps(out["round_trip"], indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
