"""The app on the built-in demo workspace, in headless Chromium, with the shipped demo model.

What a newcomer meets first: the Pairs desk holds pairs the demo model generated, every tab
renders, and Chat runs the real model (no stand-in): its box parses, the crop is shown beside the
image, the answer is one of the task's words. Screenshots of every tab are written for a person
to look at (``$VISRL_SCREENSHOTS``, default a temporary folder, copied to /tmp/visrl-screens/demo-*).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import sync_playwright
from test_app_browser import CHROMIUM, CHROMIUM_ARGS, free_port, screenshot, wait_for

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    import torch

    from visrl.demo import create_demo_workspace
    from visrl_app.app import launch

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("demo") / "ws"
    # The real demo task and model, on fewer scenes so the test stays quick.
    create_demo_workspace(root, n_pairs_items=12, data={"n_train": 24, "n_val": 4, "n_test": 8})
    port = free_port()
    blocks = launch(root, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    finally:
        blocks.close()


@pytest.fixture
def page(demo_app: dict[str, Any]) -> Iterator[Any]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(demo_app["url"])
        page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=30_000)
        try:
            yield page
        finally:
            browser.close()


def test_demo_tabs_render_with_generated_pairs(demo_app: dict[str, Any], page: Any) -> None:
    from visrl.review import status_counts
    from visrl.store import Store

    pending = status_counts(Store.open(demo_app["root"]))["pending"]
    assert pending > 0  # the shipped model writes boxes, so the first pairs exist
    assert f"0 / {pending}" in page.locator("body").inner_text().replace(",", "")
    screenshot(page, "demo-pairs", demo_app["root"])
    for tab, marker in (("Generate", "#generate-start"), ("Train", "#train-config"),
                        ("Evaluate", "#eval-start")):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_selector(marker, state="visible", timeout=10_000)
        time.sleep(0.5)
        screenshot(page, f"demo-{tab.lower()}", demo_app["root"])
    # Before/after without running anything: the card's numbers and the benchmark's arms.
    table = page.locator("#eval-table").inner_text()
    assert "models/tiny-demo" in table and "learning benchmark" in table and "VisRL" in table


def test_demo_chat_runs_the_shipped_model(demo_app: dict[str, Any], page: Any) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-model input").fill("models/tiny-demo")
    page.locator("#chat-model input").press("Enter")
    page.locator("#chat-item input").click()
    page.get_by_role("option").first.click()
    question = wait_for(lambda: page.locator("#chat-question textarea, #chat-question input").first.input_value(),
                        what="the picked item's question")
    assert "pattern" in question
    page.locator("#chat-ask").click()
    answer = wait_for(lambda: page.locator("#chat-answer textarea").input_value().strip()
                      if "done" in page.locator("#chat-status").inner_text() else None,
                      timeout=90, what="the streamed answer")
    assert answer in ("horizontal", "vertical", "checkered")
    box_text = page.locator("#chat-box textarea, #chat-box input").first.input_value()
    assert box_text.startswith("[0.") and box_text.count(",") == 3  # a Visual-CoT box
    assert "no box parsed" not in page.locator("#chat-status").inner_text()
    page.wait_for_selector("#chat-crop img", timeout=10_000)
    page.wait_for_selector("#chat-focus img", timeout=10_000)
    screenshot(page, "demo-chat", demo_app["root"])
