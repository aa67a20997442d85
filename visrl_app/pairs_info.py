"""What the desk says about the pair on screen (facts, scores, stale scores), the team's
progress line, and the all-done state: markdown text made from store rows."""

from __future__ import annotations

from typing import Any

from visrl import desk, rescore, review
from visrl.boxes import Box
from visrl_app.context import AppContext


def team_line(ctx: AppContext, reviewer: str) -> str:
    others = {who: counts for who, counts in desk.team_progress(ctx.store).items() if who != reviewer}
    if not others:
        return ""
    return "  \nTeam: " + " · ".join(f"{who} {desk.decisions_text(counts)}" for who, counts in sorted(others.items()))


def all_done_markdown(flt: review.PairFilter) -> str:
    """The desk when the filter has run empty: say so, and what to do next."""
    what = f"{flt.status} pairs" if flt.status else "pairs"
    return (f"### All done ✓\nNo {what} match these filters"
            + (f" (dataset `{flt.dataset}`)" if flt.dataset else "") + ". The review keys do nothing "
            "here; Undo (U) brings back your last decision. Set Status to *any* to look at decided pairs.")


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _box_text(box: Box | None) -> str:
    return "—" if box is None else "[" + ", ".join(f"{v:.0f}" for v in box.as_list()) + "]"


def _score(pair: dict[str, Any], column: str, stale: set[str]) -> str:
    """A score cell; one that describes the side before a reviewer's edit says so."""
    return f"~~{_fmt(pair[column])}~~ *{rescore.STALE_LABEL}*" if column in stale else _fmt(pair[column])


def info_markdown(pair: dict[str, Any]) -> str:
    boxes = review.pair_boxes(pair)
    stale = rescore.stale_set(pair)
    edited = (f" · edited, scores {'partly stale' if stale else 'current'}") if pair.get("edited") else ""
    margin = _fmt(pair["margin"]) + (f" *({rescore.STALE_LABEL})*" if stale & {"chosen_score", "rejected_score"} else "")
    return "\n".join([
        f"### Pair {pair['id']} — **{pair['status']}** (version {pair['version']}{edited})",
        "",
        f"**Question:** {pair['question']}",
        "",
        f"**Reference answer:** {pair['reference'] or '—'}",
        "",
        "| | box (px) | answer score | crop score |",
        "|---|---|---|---|",
        *(f"| <span style='color:{color}'>■</span> {side} | {_box_text(boxes[side])} | "
          f"{_score(pair, f'{side}_score', stale)} | {_score(pair, f'{side}_crop_score', stale)} |"
          for side, color in (("chosen", "#22c55e"), ("rejected", "#ef4444"))),
        f"| <span style='color:#2563eb'>┅</span> annotated | {_box_text(boxes['gt'])} | | |",
        "",
        f"margin {margin} · priority {_fmt(pair['priority'])} · dataset `{pair['dataset']}` "
        f"· split {pair['split']} · {pair['width']}×{pair['height']} px · source {pair.get('source') or '—'}",
    ])
