"""CLI commands: ``visrl review list|show|accept|reject|reset|swap|undo|edit-box|edit-answer|bulk|
undo-bulk|progress`` — the curation desk's actions for scripts and CI, over :mod:`visrl.desk`.

Every action is audited under ``--user`` (default ``$VISRL_USER``, else the OS login) and checks
the pair's version like the app does: ``--version V`` refuses if the pair changed since you read
version V; without it the current version is used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import click

from visrl.cli import cli, workspace_option
from visrl.vocabulary import PAIR_STATUSES

SIDES = click.Choice(["chosen", "rejected"])


def user_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--user", "-u", default=None, envvar="VISRL_USER", metavar="NAME",
                        help="Reviewer named on the audit rows (default: $VISRL_USER, else your OS login).")(fn)


def filter_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The desk's filters, as options (the same meaning as the app's filter row)."""
    for option in reversed([
        click.option("--status", type=click.Choice([*PAIR_STATUSES, "any"]), default="pending",
                     show_default=True, help="Pairs with this status ('any': all)."),
        click.option("--dataset", "-d", default=None, help="Only this dataset."),
        click.option("--min-margin", type=float, default=None, help="Chosen minus rejected score at least this."),
        click.option("--max-margin", type=float, default=None, help="Chosen minus rejected score at most this."),
        click.option("--search", default=None, help="Literal text in the question or either answer (any case)."),
    ]):
        fn = option(fn)
    return fn


def _filter(status: str, dataset: str | None, min_margin: float | None, max_margin: float | None,
            search: str | None) -> Any:
    from visrl.review import PairFilter

    return PairFilter(status=None if status == "any" else status, dataset=dataset, min_margin=min_margin,
                      max_margin=max_margin, search=search or None)


def _open(workspace: str | None) -> Any:
    from visrl.store import Store

    return Store.open(workspace, create=False)


def _who(user: str | None) -> str:
    from visrl.desk import check_reviewer, default_reviewer

    return check_reviewer(user) if user is not None else default_reviewer()


def _line(pair: dict[str, Any]) -> str:
    return (f"pair {pair['id']} v{pair['version']} {pair['status']}: chosen {pair['chosen_answer']!r} "
            f"rejected {pair['rejected_answer']!r}")


@cli.group()
def review() -> None:
    """Review preference pairs from scripts: list, accept, reject, edit, bulk, undo."""


@review.command("list")
@workspace_option
@filter_options
@click.option("--sort", type=click.Choice(["priority", "oldest", "newest"]), default="priority", show_default=True,
              help="Order of the list.")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many pairs.")
@click.option("--offset", type=int, default=0, help="Skip this many first.")
@click.option("--json", "as_json", is_flag=True, help="Print the pairs as JSON.")
def list_command(workspace: str | None, status: str, dataset: str | None, min_margin: float | None,
                 max_margin: float | None, search: str | None, sort: str, limit: int, offset: int,
                 as_json: bool) -> None:
    """List the pairs the filters match, in desk order."""
    from visrl.review import page_pairs

    rows = page_pairs(_open(workspace), _filter(status, dataset, min_margin, max_margin, search), sort,
                      offset=offset, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for pair in rows:
        click.echo(f"{pair['id']:>7}  v{pair['version']:<3} {pair['status']:<9} margin {pair['margin'] or 0:+.2f}  "
                   f"{pair['question'][:70]}")


@review.command("show")
@click.argument("pair_id", type=int)
@workspace_option
def show(pair_id: int, workspace: str | None) -> None:
    """Show one pair and its history (who did what, when) as JSON."""
    from visrl.review import get_pair, reviews

    store = _open(workspace)
    click.echo(json.dumps({**get_pair(store, pair_id), "history": reviews(store, pair_id)}, indent=2, default=str))


def _action_command(name: str, summary: str) -> None:
    @review.command(name, help=summary)
    @click.argument("pair_id", type=int)
    @workspace_option
    @user_option
    @click.option("--version", "version", type=int, default=None,
                  help="Refuse if the pair is no longer at this version (default: its current one).")
    def command(pair_id: int, workspace: str | None, user: str | None, version: int | None) -> None:
        from visrl.desk import apply

        click.echo(_line(apply(_open(workspace), name, pair_id, _who(user), version)))


for _name, _summary in (("accept", "Accept pair PAIR_ID (it trains as chosen over rejected)."),
                        ("reject", "Reject pair PAIR_ID (it is left out of training)."),
                        ("reset", "Put pair PAIR_ID back to pending."),
                        ("swap", "Exchange the chosen and rejected sides of pair PAIR_ID."),
                        ("undo", "Undo your latest change to pair PAIR_ID (only your own).")):
    _action_command(_name, _summary)


@review.command("edit-box")
@click.argument("pair_id", type=int)
@click.argument("side", type=SIDES)
@click.argument("coords", type=float, nargs=4, metavar="X1 Y1 X2 Y2")
@workspace_option
@user_option
@click.option("--version", type=int, default=None, help="Refuse if the pair is no longer at this version.")
def edit_box(pair_id: int, side: str, coords: tuple[float, float, float, float], workspace: str | None,
             user: str | None, version: int | None) -> None:
    """Set SIDE's box of pair PAIR_ID to X1 Y1 X2 Y2 (pixels of the original image)."""
    from visrl.boxes import Box
    from visrl.desk import apply

    pair = apply(_open(workspace), "edit-box", pair_id, _who(user), version, side=side, box=Box(*coords))
    click.echo(f"{_line(pair)} {side} box {pair[f'{side}_box']}")


@review.command("edit-answer")
@click.argument("pair_id", type=int)
@click.argument("side", type=SIDES)
@click.argument("answer")
@workspace_option
@user_option
@click.option("--version", type=int, default=None, help="Refuse if the pair is no longer at this version.")
def edit_answer(pair_id: int, side: str, answer: str, workspace: str | None, user: str | None,
                version: int | None) -> None:
    """Set SIDE's answer of pair PAIR_ID to ANSWER."""
    from visrl.desk import apply

    click.echo(_line(apply(_open(workspace), "edit-answer", pair_id, _who(user), version, side=side, answer=answer)))


@review.command("bulk")
@click.argument("action", type=click.Choice(["accept", "reject", "reset"]))
@workspace_option
@user_option
@filter_options
@click.option("--expect", type=int, default=None,
              help="Apply only if exactly this many pairs would change (scripts; no prompt).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask to confirm the count.")
def bulk(action: str, workspace: str | None, user: str | None, status: str, dataset: str | None,
         min_margin: float | None, max_margin: float | None, search: str | None, expect: int | None,
         yes: bool) -> None:
    """ACTION every pair the filters match, as one undoable unit (`visrl review undo-bulk`)."""
    from visrl.desk import bulk_apply, bulk_preview

    store, flt = _open(workspace), _filter(status, dataset, min_margin, max_margin, search)
    if expect is None:
        expect = bulk_preview(store, flt, action)
        if expect == 0:
            click.echo(f"no pair matching the filters would change by {action}")
            return
        if not yes:
            click.confirm(f"{action} {expect} pairs?", abort=True)
    batch, count = bulk_apply(store, flt, action, _who(user), expect)
    click.echo(f"{action}: {count} pairs, batch {batch} (undo with `visrl review undo-bulk {batch}`)")


@review.command("undo-bulk")
@click.argument("batch", required=False)
@workspace_option
@user_option
def undo_bulk(batch: str | None, workspace: str | None, user: str | None) -> None:
    """Undo bulk action BATCH as one unit (default: your latest); pairs changed since are kept."""
    from visrl.desk import last_batch, undo_batch
    from visrl.errors import DataError

    store, who = _open(workspace), _who(user)
    batch = batch or last_batch(store, who)
    if batch is None:
        raise DataError(f"{who} has no bulk action left to undo")
    reverted, skipped = undo_batch(store, batch, who)
    click.echo(f"undid {batch}: {reverted} pairs reverted, {skipped} changed since and kept")


@review.command("progress")
@workspace_option
@click.option("--dataset", "-d", default=None, help="Only this dataset's pairs.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def progress(workspace: str | None, dataset: str | None, as_json: bool) -> None:
    """Pairs per status and what each reviewer has done."""
    from visrl.desk import team_progress
    from visrl.review import status_counts

    store = _open(workspace)
    out = {"pairs": status_counts(store, dataset), "reviewers": team_progress(store)}
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(" · ".join(f"{status} {n}" for status, n in out["pairs"].items()))
    for who, counts in out["reviewers"].items():
        click.echo(f"{who}: " + ", ".join(f"{n} {action}" for action, n in counts.items()))
