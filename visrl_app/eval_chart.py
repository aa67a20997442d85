"""The Evaluate tab's chart: one horizontal bar per evaluation, with its 95% interval and n.

Plain HTML (a CSS grid), not a gradio plot: gradio's native plots draw no error bars, and a bar
whose noise is invisible is what made +0.005 look like a gain. Bars start at 0 (a rate's axis
is 0-1); the baseline's interval is a grey band through every row, so "does this whisker reach
the band" is the question the colour answers (:func:`visrl.uncertainty.verdict`).
"""

from __future__ import annotations

import html
from typing import Any

COLOURS = {"baseline": "#475569", "better": "#16a34a", "worse": "#dc2626", "within noise": "#60a5fa",
           "not compared": "#cbd5e1", "no baseline": "#60a5fa"}
LEGEND = ("baseline", "better", "worse", "within noise")
# Scoped by class: the tab's other components keep the theme's styles.
STYLE = """<style>
.visrl-ec{font-size:13px;line-height:1.35}
.visrl-ec-title{font-weight:600;margin:0 0 6px}
.visrl-ec-grid{display:grid;grid-template-columns:minmax(130px,26%) minmax(160px,1fr) minmax(190px,30%);
  column-gap:10px;row-gap:6px;align-items:center}
.visrl-ec-label{overflow-wrap:normal;word-break:normal}
.visrl-ec-track{position:relative;height:22px;background:rgba(148,163,184,.12);border-left:1px solid #64748b}
.visrl-ec-band{position:absolute;top:-4px;bottom:-4px;background:rgba(71,85,105,.16)}
.visrl-ec-bar{position:absolute;left:0;top:4px;height:14px;opacity:.9}
.visrl-ec-other{background-image:repeating-linear-gradient(135deg,rgba(255,255,255,.55) 0 3px,transparent 3px 7px)}
.visrl-ec-whisker{position:absolute;top:10px;height:2px;background:#0f172a}
.visrl-ec-whisker:before,.visrl-ec-whisker:after{content:"";position:absolute;top:-5px;width:2px;height:12px;
  background:#0f172a}
.visrl-ec-whisker:before{left:0}.visrl-ec-whisker:after{right:0}
.visrl-ec-text{font-variant-numeric:tabular-nums}
.visrl-ec-verdict{font-weight:600}
.visrl-ec-axis{position:relative;height:16px;font-size:11px;color:#64748b}
.visrl-ec-axis span{position:absolute;transform:translateX(-50%)}
.visrl-ec-axis span:first-child{transform:none}
.visrl-ec-legend{margin-top:8px;font-size:12px;color:#475569}
.visrl-ec-legend i{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px;vertical-align:-1px}
</style>"""


def _pct(value: float, top: float) -> str:
    return f"{100 * max(0.0, min(value, top)) / top:.2f}%"


def _axis_top(rows: list[dict[str, Any]], rate: bool) -> float:
    """1 for a rate; else a round number above the largest value (bars still start at 0)."""
    if rate:
        return 1.0
    largest = max((float(r["value"]) for r in rows), default=1.0)
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10_000, 100_000):
        if largest <= step:
            return float(step)
    return largest * 1.1


def _row(row: dict[str, Any], top: float, band: tuple[float, float] | None) -> str:
    verdict = str(row["vs baseline"])
    colour = COLOURS.get(verdict, COLOURS["not compared"])
    other = row.get("items") == "other items"
    parts = []
    if band is not None:
        parts.append(f"<div class='visrl-ec-band' style='left:{_pct(band[0], top)};"
                     f"width:calc({_pct(band[1], top)} - {_pct(band[0], top)})'></div>")
    parts.append(f"<div class='visrl-ec-bar{' visrl-ec-other' if other else ''}' "
                 f"style='width:{_pct(float(row['value']), top)};background-color:{colour}'></div>")
    low, high = row.get("low"), row.get("high")
    if low is not None and high is not None:
        parts.append(f"<div class='visrl-ec-whisker' style='left:{_pct(float(low), top)};"
                     f"width:calc({_pct(float(high), top)} - {_pct(float(low), top)})'></div>")
    numbers = f"{float(row['value']):.3f}"
    if low is not None and high is not None:
        numbers += f" [{float(low):.3f}, {float(high):.3f}]"
    if row.get("n") is not None:
        numbers += f" · n={int(row['n'])}"
    notes = [verdict] + (["other items"] if other else []) + ([str(row["spread"])] if row.get("spread") else [])
    return (f"<div class='visrl-ec-label'>{html.escape(str(row['evaluation']))}</div>"
            f"<div class='visrl-ec-track'>{''.join(parts)}</div>"
            f"<div class='visrl-ec-text'>{html.escape(numbers)}<br>"
            f"<span class='visrl-ec-verdict' style='color:{colour if verdict != 'within noise' else '#1d4ed8'}'>"
            f"{html.escape(' · '.join(notes))}</span></div>")


def chart_html(rows: list[dict[str, Any]], metric_label: str, rate: bool) -> str:
    """The chart of :func:`visrl_app.evaluate_tab.comparison_frame`'s rows (one dict per
    evaluation: evaluation, value, low, high, n, vs baseline, items, spread)."""
    if not rows:
        return "<div class='visrl-ec'>No evaluation with this metric yet.</div>"
    top = _axis_top(rows, rate)
    base = next((r for r in rows if r["vs baseline"] == "baseline"), None)
    band = (float(base["low"]), float(base["high"])) if base and base.get("low") is not None else None
    ticks = [0, 0.25, 0.5, 0.75, 1.0] if rate else [0, top / 2, top]
    axis = "".join(f"<span style='left:{_pct(t, top)}'>{t:g}</span>" for t in ticks)
    legend = "".join(f"<i style='background:{COLOURS[k]}'></i>{k}" for k in LEGEND)
    title = (f"{html.escape(metric_label)} per evaluation: bars start at 0; whiskers are 95% intervals"
             if rate else f"{html.escape(metric_label)} per evaluation (no interval: not compared)")
    return (f"{STYLE}<div class='visrl-ec'><div class='visrl-ec-title'>{title}</div>"
            f"<div class='visrl-ec-grid'>{''.join(_row(r, top, band) for r in rows)}"
            f"<div></div><div class='visrl-ec-axis'>{axis}</div><div></div></div>"
            f"<div class='visrl-ec-legend'>{legend}<i class='visrl-ec-other' style='background-color:#94a3b8'>"
            "</i>striped: other items than the baseline (another split or n)<br>A bar is better or worse "
            "only when its 95% interval does not overlap the baseline's (the grey band); otherwise it is "
            "within noise. Intervals: Wilson on the metric's n, widened by the seeds' spread where "
            "there are seeds.</div></div>")
