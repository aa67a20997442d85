"""The Pairs desk in headless Chromium: layout at two screen sizes (screenshots), the unsaved-edit
marker and autosave, top-edge labels, and the review round trip measured into a benchmark JSON.

Serves a seeded workspace (test_app.seed_pairs: 8 pairs on 800x600 images). Screenshots go to
``$VISRL_DESK_SHOTS`` (default /tmp/shots_desk) for a person to look at.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_app_browser import free_port, shown_pair_id, store_of, wait_for

pytestmark = pytest.mark.browser

SHOTS = Path(os.environ.get("VISRL_DESK_SHOTS") or "/tmp/shots_desk")
BENCH = Path(__file__).resolve().parents[1] / "bench"
SLOW_S = 90  # one answer of the desk on a machine loaded by training runs (seen: over 30 s)


@pytest.fixture(scope="module")
def desk_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_app import seed_pairs

    from visrl_app.app import launch

    ws = seed_pairs(tmp_path_factory.mktemp("desk") / "ws", n=8, size=(800, 600))
    port = free_port()
    blocks = launch(ws, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "workspace": ws}
    finally:
        blocks.close()


def open_desk(app: dict[str, Any], browser: Any, width: int, height: int) -> Any:
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(app["url"])
    # 120 s: on a machine loaded by training runs the first answer has taken over 30 s
    page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=120_000)
    time.sleep(0.5)  # let the annotator draw
    return page


@pytest.fixture
def desk_page(desk_app: dict[str, Any], browser: Any) -> Iterator[Any]:
    page = open_desk(desk_app, browser, 1440, 900)
    yield page
    page.close()


LINE_COUNTS = """() => {
  const rows = (range) => new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size;
  const buttons = {};
  for (const b of document.querySelectorAll('#pairs-buttons button')) {
    const r = document.createRange(); r.selectNodeContents(b); buttons[b.innerText] = rows(r);
  }
  const walker = document.createTreeWalker(document.querySelector('#pairs-info'), NodeFilter.SHOW_TEXT);
  let annotated = 0;
  while (walker.nextNode()) {
    const at = walker.currentNode.textContent.indexOf('annotated');
    if (at < 0) continue;
    const r = document.createRange(); r.setStart(walker.currentNode, at); r.setEnd(walker.currentNode, at + 9);
    annotated = rows(r);
  }
  return {buttons, annotated};
}"""


@pytest.mark.parametrize("width, height", [(1440, 900), (1024, 768)])
def test_desk_layout(desk_app: dict[str, Any], browser: Any, width: int, height: int) -> None:
    page = open_desk(desk_app, browser, width, height)
    try:
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / f"pairs-{width}x{height}.png"))
        page.screenshot(path=str(SHOTS / f"pairs-{width}x{height}-full.png"), full_page=True)
        canvas = page.locator("#pairs-annotator canvas").first.bounding_box()
        chosen = page.locator("#pairs-chosen-answer textarea").bounding_box()
        rejected = page.locator("#pairs-rejected-answer textarea").bounding_box()
        assert canvas["width"] >= 300 and chosen["width"] >= 200  # usable at both sizes
        # Nothing wraps mid-word, no button label wraps (issue 19: at 1024 px "annotate/d", and
        # the key buttons broke onto two lines): count the line boxes each text is laid out on.
        lines = page.evaluate(LINE_COUNTS)
        assert lines["annotated"] == 1 and all(n == 1 for n in lines["buttons"].values()), lines
        if width >= 1440:
            # both answers beside the image, above the fold
            assert chosen["x"] >= canvas["x"] + canvas["width"] - 1
            assert rejected["y"] + rejected["height"] <= height
            assert canvas["y"] < height - 200
    finally:
        page.close()


def test_unsaved_marker_and_autosave_on_next(desk_app: dict[str, Any], desk_page: Any) -> None:
    from visrl import review

    store = store_of(desk_app)
    page = desk_page
    pair_id = shown_pair_id(page)
    marker = "getComputedStyle(document.querySelector('#pairs-ticket p'), '::after').content"
    assert page.evaluate(marker) == "none"
    page.locator("#pairs-chosen-answer textarea").fill("scarlet")
    page.locator("#pairs-chosen-answer textarea").dispatch_event("input")
    wait_for(lambda: "unsaved edits" in page.evaluate(marker), what="the unsaved marker")
    assert page.evaluate("window.visrlDirty()") is True
    page.locator("#pairs-next").click()
    wait_for(lambda: review.get_pair(store, pair_id)["chosen_answer"] == "scarlet", what="the autosave")
    wait_for(lambda: shown_pair_id(page) != pair_id, what="the next pair")
    wait_for(lambda: page.evaluate(marker) == "none", what="the marker cleared")
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "pairs-after-autosave.png"))


def test_kept_edits_stay_dirty_esc_leaves_a_text_box_and_all_done(desk_app: dict[str, Any], desk_page: Any) -> None:
    """Issue 19: an edit kept on screen after a conflict lost its unsaved mark (a reload dropped
    it without asking); Esc did not leave a text box ("a" was typed into it); an empty filter
    showed no "all done" and A did nothing visible."""
    from visrl import review

    store = store_of(desk_app)
    page = desk_page
    pair_id = shown_pair_id(page)
    answer = page.locator("#pairs-chosen-answer textarea")
    answer.fill("typed by me")
    answer.dispatch_event("input")
    wait_for(lambda: page.evaluate("window.visrlDirty()"), what="the unsaved mark", timeout=SLOW_S)
    pair = review.get_pair(store, pair_id)
    review.reject(store, pair_id, pair["version"], reviewer="someone-else")  # another reviewer acts
    answer.press("Escape")  # leaves the text box: the next key is a shortcut
    assert page.evaluate("document.activeElement.tagName") != "TEXTAREA"
    page.keyboard.press("j")
    wait_for(lambda: "edits kept on screen, not saved" in page.locator("#pairs-ticket").inner_text(),
             what="the conflict answer", timeout=SLOW_S)
    time.sleep(0.5)  # keyboard.js reads the new ticket every 100 ms
    assert page.evaluate("window.visrlDirty()") is True and answer.input_value() == "typed by me"
    assert shown_pair_id(page) == pair_id and review.get_pair(store, pair_id)["chosen_answer"] != "typed by me"
    page.keyboard.press("u")  # the user discards them
    wait_for(lambda: "Discarded your unsaved edits" in page.locator("#pairs-ticket").inner_text(), what="discard", timeout=SLOW_S)
    wait_for(lambda: page.evaluate("window.visrlDirty()") is False, what="the mark cleared", timeout=SLOW_S)
    # An empty filter: "All done", and A says it does nothing.
    search = page.get_by_label("Search question / answers")
    search.fill("no pair says this")
    search.press("Enter")
    wait_for(lambda: "All done" in page.locator("#pairs-info").inner_text(), what="the all-done state", timeout=SLOW_S)
    search.press("Escape")
    counts = review.status_counts(store)
    page.keyboard.press("a")
    wait_for(lambda: "nothing to accept" in page.locator("#pairs-ticket").inner_text(), what="A's answer", timeout=SLOW_S)
    assert review.status_counts(store) == counts and search.input_value() == "no pair says this"
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / "pairs-all-done.png"))


def test_review_round_trip_is_measured(desk_page: Any) -> None:
    """Accept/Undo through the browser: p95 recorded (not asserted: a shared CPU decides it)."""
    sys.path.insert(0, str(BENCH))
    from bench_desk_browser import round_trips

    round_trips(desk_page, 2)  # warm up
    result = round_trips(desk_page, 20)
    assert result["all"]["n"] == 20 and result["all"]["p50_ms"] > 0
    out = BENCH / "results" / "desk_browser_test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"workspace": "seeded, 8 pairs 800x600", "round_trip": result,
                               "target_p95_ms": 150}, indent=2) + "\n")


def test_label_at_the_top_edge_shows_and_jump(desk_app: dict[str, Any], desk_page: Any) -> None:
    """A box touching the image's top edge keeps its label on screen (the band above the image);
    the pair is reached by typing its id in "Go to pair #"."""
    from visrl import review
    from visrl.boxes import Box

    store = store_of(desk_app)
    pair = review.get_pair(store, 5)
    review.edit_box(store, 5, pair["version"], "chosen", Box(300, 0, 420, 90), reviewer="setup")
    page = desk_page
    page.locator("#pairs-jump textarea, #pairs-jump input").first.fill("5")
    page.locator("#pairs-jump textarea, #pairs-jump input").first.press("Enter")
    wait_for(lambda: shown_pair_id(page) == 5, what="pair 5 on screen")
    time.sleep(0.8)
    canvas = page.locator("#pairs-annotator canvas").first
    canvas.screenshot(path=str(SHOTS / "pairs-top-edge-label.png"))
    # The label band: the canvas rows above the image's first row are the band's colour, and the
    # label's white box is drawn inside it (not above the canvas, where it would be clipped).
    band = canvas.evaluate("""c => { const d = c.getContext('2d').getImageData(0, 0, c.width, 30).data;
        let white = 0; for (let i = 0; i < d.length; i += 4) if (d[i] > 250 && d[i+1] > 250 && d[i+2] > 250) white++;
        return white; }""")
    assert band > 50  # the white label box (~40x20 px) lies within the top 30 rows of the canvas
    # and nothing is drawn over those rows (gradio's block label would be)
    top = canvas.bounding_box()
    covering = page.evaluate("([x, y]) => document.elementFromPoint(x, y).tagName", [top["x"] + 60, top["y"] + 8])
    assert covering == "CANVAS"
    assert "| setup | edit chosen box" in page.locator("#pairs-history").inner_text().replace("\t", " | ")


@pytest.mark.slow  # ~60-90 s: 220 key presses through two browsers
def test_two_reviewers_on_200_pairs_lose_nothing(tmp_path: Path, browser: Any) -> None:
    """Two logged-in reviewers press Accept as fast as they can over the same 200 pairs: every
    decision is in the file once, under the login of who made it, and no pair was served to both
    (the pair on one screen is claimed)."""
    from test_app import seed_pairs

    from visrl import review
    from visrl_app.app import build_app, launch_kwargs

    ws = seed_pairs(tmp_path / "ws", n=200, size=(160, 120))
    seeded = store_of({"workspace": ws})
    # seed_pairs walks its squares right by 40 px per item: keep the boxes on these small images
    seeded.db.execute("UPDATE pairs SET chosen_box = '[10, 10, 60, 60]', rejected_box = '[80, 40, 150, 110]'")
    port = free_port()
    blocks = build_app(ws)
    blocks.queue(default_concurrency_limit=4)
    blocks.launch(server_port=port, prevent_thread_lock=True, quiet=True,
                  auth=[("ana", "pw-ana"), ("bo", "pw-bo")], **launch_kwargs(ws))
    pages = []
    try:
        for user in ("ana", "bo"):
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/")
            page.locator("input").first.fill(user)
            page.locator("input[type=password]").fill(f"pw-{user}")
            page.locator("button").filter(has_text="Login").click()
            page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=60_000)
            pages.append(page)
        for page in pages:
            page.locator("body").click(position={"x": 5, "y": 5})
        for _ in range(110):  # both queues fill at once; keyboard.js replays each in order
            for page in pages:
                page.keyboard.press("a")
        store = store_of({"workspace": ws})
        wait_for(lambda: all(page.evaluate("window.visrlShortcutQueue()") == 0 for page in pages),
                 timeout=240, what="both reviewers' key presses")
        counts = review.status_counts(store)
        rows = store.db.execute("SELECT pair_id, reviewer, action FROM reviews").fetchall()
        accepts = [r for r in rows if r[2] == "accept"]
        assert counts["accepted"] == len(accepts) == len({r[0] for r in accepts})  # once each, none lost
        assert {r[1] for r in accepts} == {"ana", "bo"}
        assert counts["accepted"] + counts["pending"] == 200 and counts["accepted"] >= 150
        conflicts = sum(page.locator("#pairs-ticket").inner_text().count("changed by someone else") for page in pages)
        assert store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        print(f"accepted {counts['accepted']}: ana {sum(r[1] == 'ana' for r in accepts)}, "
              f"bo {sum(r[1] == 'bo' for r in accepts)}; conflicts on screen at the end: {conflicts}")
    finally:
        for page in pages:
            page.close()
        blocks.close()
