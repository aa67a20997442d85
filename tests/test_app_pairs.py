"""The Pairs desk's handlers (no browser) on issue 19's findings: live counts with two reviewers,
the all-done state, edits kept on screen, the side a new box replaces, stale scores, history."""

from __future__ import annotations

import html
from types import SimpleNamespace
from typing import Any

import pytest
from test_app import FILTERS, NO_EDITS, seed_pairs, view_dict

from visrl import desk, review
from visrl.boxes import Box

PENDING_BY_PRIORITY = ("pending", "any", None, None, "", "priority")


@pytest.fixture
def ctx(tmp_path: Any) -> Any:
    from visrl_app.context import AppContext

    return AppContext.open(seed_pairs(tmp_path / "ws"))


def login(ctx: Any, who: str, filters: tuple = FILTERS) -> dict[str, Any]:
    from visrl_app import pairs_tab

    return view_dict(pairs_tab.load(ctx, pairs_tab.empty_state(), *filters, request=SimpleNamespace(username=who)))


def test_counts_follow_other_reviewers_and_decisions_not_actions(ctx: Any) -> None:
    """"N match the filters" and the team line are recounted on every answer: bo's accept, undo
    and reject show on ana's next key press (issue 19: the count lagged, undone actions counted)."""
    from visrl_app import pairs_tab

    ana, bo = login(ctx, "ana"), login(ctx, "bo")
    assert "4 match the filters" in ana["progress"]
    bo = view_dict(pairs_tab.act(ctx, "accept", bo["state"], *NO_EDITS, *FILTERS))
    undo = view_dict(pairs_tab.act(ctx, "undo", bo["state"], *NO_EDITS, *FILTERS))
    assert "Undone: bo's accept" in undo["ticket"] and "is pending again" in undo["ticket"]
    bo = view_dict(pairs_tab.act(ctx, "reject", undo["state"], *NO_EDITS, *FILTERS))
    bo = view_dict(pairs_tab.act(ctx, "accept", bo["state"], *NO_EDITS, *FILTERS))
    ana = view_dict(pairs_tab.act(ctx, "swap", ana["state"], *NO_EDITS, *FILTERS))
    assert "2 match the filters" in ana["progress"]  # bo decided 2 of the 4 pending pairs
    assert "ana: nothing decided yet" in ana["progress"]
    assert "Team: bo 1 accepted, 1 rejected" in ana["progress"]
    assert desk.team_progress(ctx.store) == desk.recount_decisions(ctx.store)
    # A filter with a search is recounted too (it was carried and moved by this tab only).
    searched = ("pending", "any", None, None, "square", "oldest")
    ana = view_dict(pairs_tab.show_first(ctx, ana["state"], *NO_EDITS, *searched))
    pair = review.get_pair(ctx.store, 4)
    review.reject(ctx.store, 4, pair["version"], reviewer="bo")
    ana = view_dict(pairs_tab.navigate(ctx, False, ana["state"], *NO_EDITS, *searched))
    assert "1 match the filters" in ana["progress"]


def test_all_done_state_and_keys_that_do_nothing(ctx: Any) -> None:
    from visrl_app import pairs_tab

    view = login(ctx, "ana")
    for _ in range(4):
        view = view_dict(pairs_tab.act(ctx, "accept", view["state"], *NO_EDITS, *FILTERS))
    assert view["state"]["pair_id"] is None and "All done" in view["info"]
    assert view["ticket"].startswith("All done: no pair matches the filters")
    counts = review.status_counts(ctx.store)
    pressed = view_dict(pairs_tab.act(ctx, "reject", view["state"], *NO_EDITS, *FILTERS))
    assert "nothing to reject: no pair on screen" in pressed["ticket"]
    assert review.status_counts(ctx.store) == counts == {"pending": 0, "accepted": 4, "rejected": 0}
    back = view_dict(pairs_tab.act(ctx, "undo", pressed["state"], *NO_EDITS, *FILTERS))
    assert back["state"]["pair_id"] == 4 and review.get_pair(ctx.store, 4)["status"] == "pending"


def test_an_edit_that_cannot_be_saved_is_reported_as_kept(ctx: Any) -> None:
    """The answer that keeps edits on screen carries the marker keyboard.js keeps dirty on."""
    from visrl_app import pairs_tab

    view = login(ctx, "ana")
    review.reject(ctx.store, 1, 1, reviewer="bo")  # bo acts on the pair ana is editing
    with pytest.warns(UserWarning, match="changed elsewhere while you edited it"):
        stay = view_dict(pairs_tab.navigate(ctx, False, view["state"], None, "typed by ana", None, *FILTERS))
    assert pairs_tab.EDITS_KEPT in stay["ticket"] and stay["chosen_answer"] == {"__type__": "update"}
    assert review.get_pair(ctx.store, 1)["chosen_answer"] == "red"


def test_a_new_box_replaces_the_side_picked(ctx: Any) -> None:
    """Issue 19: a new box always replaced the chosen box; "A new box replaces the" picks the side."""
    from visrl_app import pairs_info, pairs_tab, render

    view = login(ctx, "ana")
    boxes = [dict(b) for b in view["annotated"]["boxes"]]
    state = pairs_tab.choose_new_side(view["state"], "rejected")
    scale, pad = state["scale"], state["pad"]
    drawn = render.to_display(Box(10, 10, 90, 90), scale, pad)
    boxes.append({"xmin": drawn.x1, "ymin": drawn.y1, "xmax": drawn.x2, "ymax": drawn.y2, "label": "chosen"})
    before = review.get_pair(ctx.store, 1)
    pairs_tab.save_boxes(ctx, state, {"image": None, "boxes": boxes}, *FILTERS)
    after = review.get_pair(ctx.store, 1)
    assert after["chosen_box"] == before["chosen_box"]
    assert review.pair_boxes(after)["rejected"].as_list() == pytest.approx([10, 10, 90, 90], abs=1)
    info = pairs_info.info_markdown(after)  # no judge keys on the seeded rollouts: marked, not kept
    assert "~~0.00~~ *edited — not re-scored*" in info and "scores partly stale" in info


def test_history_uses_labels_and_cuts_long_lines(ctx: Any) -> None:
    from visrl_app import pairs_team

    long = "a very long answer " * 20
    review.edit_answer(ctx.store, 1, 1, "chosen", long, reviewer="ana")
    review.edit_answer(ctx.store, 1, 2, "chosen", "<b>bold</b> | piped", reviewer="ana")
    history = pairs_team.history_markdown(ctx.store and ctx, 1)
    assert "edit_chosen_answer" not in history and "| ana | edit chosen answer" in history
    long_line = next(line for line in history.splitlines() if "<details>" in line)
    summary = long_line.split("<summary>")[1].split("</summary>")[0]
    assert len(html.unescape(summary)) <= pairs_team.HISTORY_CHARS and long.strip() in long_line
    assert "&lt;b>bold&lt;/b> &#124; piped" in history
