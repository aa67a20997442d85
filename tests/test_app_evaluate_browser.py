"""The Evaluate and Chat tabs in headless Chromium: n, intervals and "within noise" on screen.

Issue 19's cases: a 40-item evaluation at +0.020 against a 200-item baseline and a +0.005 arm
were green "better". Screenshots at 1440x900 and 1024x768 go to ``$VISRL_SCREENSHOTS`` (default
a temporary folder) and /tmp/visrl-screens/ for a person to look at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from test_app_browser import free_port, screenshot, wait_for

pytestmark = pytest.mark.browser

SIZES = ((1440, 900), (1024, 768))


@pytest.fixture(scope="module")
def eval_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from test_app import seed_pairs

    from visrl.store import Store
    from visrl_app.app import launch

    root = tmp_path_factory.mktemp("evaluate") / "ws"
    ws = seed_pairs(root, n=4)
    store = Store(ws)
    store.add_evaluation({"acc50": 0.255, "answer_acc": 0.51}, "models/tiny-demo", None, "demo",
                         "test (model card)", 200)
    store.add_evaluation({"acc50": 0.26, "answer_acc": 0.47, "seeds": 1}, "learning benchmark (1 seed): "
                         "SFT warm-up (few boxes)", None, "demo", "test (model card)", 200)
    for i in range(9):  # enough rows that a fixed-height table would hide some
        store.add_evaluation({"acc50": 0.25 + 0.001 * i}, f"models/sweep-{i}", None, "demo", "test (model card)", 200)
    store.add_evaluation({"n": 40, "n_box": 40, "acc50": 0.275, "answer_acc": 0.5}, "models/tiny-demo",
                         "runs/3/adapter", "demo", "test", 40)
    port = free_port()
    blocks = launch(ws, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "root": root}
    finally:
        blocks.close()


@pytest.fixture(params=SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def page(eval_app: dict[str, Any], browser: Any, request: pytest.FixtureRequest) -> Iterator[Any]:
    width, height = request.param
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(eval_app["url"])
    page.wait_for_selector("#pairs-ticket:has-text(' v')", timeout=30_000)
    yield page
    page.close()


def test_evaluate_tab_states_n_and_within_noise(eval_app: dict[str, Any], page: Any) -> None:
    page.get_by_role("tab", name="Evaluate").click()
    chart = page.locator("#eval-plot")
    text = wait_for(lambda: chart.inner_text() if "n=40" in chart.inner_text() else None,
                    what="the chart's rows with their n")
    assert "0.275 [0.161, 0.428] · n=40" in text  # the 40-item eval: its interval and n
    assert "within noise · other items" in text  # +0.020 on other items: noise, and marked
    assert "0.260 [0.204, 0.325] · n=200" in text  # the +0.005 arm
    rows = chart.locator(".visrl-ec-verdict").all_inner_texts()
    assert rows[0] == "baseline" and len(rows) == 12
    assert not [r for r in rows if r.startswith(("better", "worse"))], rows
    assert page.locator(".visrl-ec-whisker").count() == 12  # error bars drawn
    # Every evaluation row of the table is on the page, none behind an inner scroll.
    table = page.locator("#eval-table")
    assert "models/sweep-8" in table.inner_text() and "runs/3/adapter" in table.inner_text()
    hidden = page.evaluate("""() => [...document.querySelectorAll('#eval-table *')]
        .filter(e => e.scrollHeight > e.clientHeight + 2 && getComputedStyle(e).overflowY.match(/auto|scroll/))
        .length""")
    assert hidden == 0
    time.sleep(0.3)
    size = page.viewport_size
    screenshot(page, f"evaluate-{size['width']}x{size['height']}", eval_app["root"])


def test_chat_shows_item_name_reference_and_legend(eval_app: dict[str, Any], page: Any) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-item input").click()
    option = page.get_by_role("option").first
    assert option.inner_text().startswith("item0 [train] What colour")
    option.click()
    reference = wait_for(lambda: page.locator("#chat-reference textarea, #chat-reference input").first.input_value(),
                         what="the picked item's reference answer")
    assert reference == "red"
    page.wait_for_selector("#chat-focus img", timeout=10_000)  # the image with its annotated box
    assert "annotated" in page.locator("#chat-legend").inner_text()
    time.sleep(0.3)
    size = page.viewport_size
    screenshot(page, f"chat-{size['width']}x{size['height']}", eval_app["root"])
