"""CLI commands for data: ``import``, ``export``, ``datasets``, ``stats``, ``demo``.

The format may come first (``visrl import viscot FILE``, ``visrl export trl-dpo OUT``) or as an
option (``visrl import FILE --format viscot``, ``visrl export --format trl-dpo --out OUT``).
"""

from __future__ import annotations

import json

import click

from visrl.cli import cli, workspace_option
from visrl.vocabulary import PAIR_STATUSES

IMPORT_FORMATS = ("auto", "viscot", "vqa", "sharegpt")
EXPORT_FORMATS = ("llamafactory", "trl-sft", "trl-dpo")
STATUSES = PAIR_STATUSES
RECENT_JOBS = 10  # `visrl stats` shows the failed ones among the last 10 jobs
TAIL_LINES = 5  # of a failed job's log tail


def _format_and_path(args: tuple[str, ...], fmt: str | None, path: str | None, formats: tuple[str, ...],
                     what: str) -> tuple[str | None, str | None]:
    """Split ``[FORMAT] PATH`` positionals; an option given as well must agree."""
    if len(args) > 2:
        raise click.UsageError(f"expected [FORMAT] {what}, got {' '.join(args)}")
    if len(args) == 2 or (len(args) == 1 and args[0] in formats and fmt is None):
        if args[0] not in formats:
            raise click.UsageError(f"unknown format {args[0]!r}; use one of {', '.join(formats)}")
        fmt, args = args[0], args[1:]
    if args:
        if path and path != args[0]:
            raise click.UsageError(f"{what} given twice: {args[0]} and an option")
        path = args[0]
    return fmt, path


@cli.command("import")
@click.argument("args", nargs=-1, metavar="[FORMAT] PATH")
@workspace_option
@click.option("--format", "fmt", type=click.Choice(IMPORT_FORMATS), default=None,
              help="File format (default: auto, guessed from the first record).")
@click.option("--dataset", "-d", default=None, help="Dataset name in the workspace (default: the file's stem).")
@click.option("--split", default=None, help="Split of every record (default: each record's own, else train).")
@click.option("--images-root", "--image-root", "images_root", type=click.Path(file_okay=False, exists=True),
              default=None, help="Folder the records' image paths are relative to (default: the file's folder).")
@click.option("--box-format", default=None,
              help="Format of boxes the file does not declare (vqa: pixels; sharegpt: viscot).")
def import_command(args: tuple[str, ...], workspace: str | None, fmt: str | None, dataset: str | None,
                   split: str | None, images_root: str | None, box_format: str | None) -> None:
    """Import PATH (Visual-CoT, plain VQA JSON/JSONL, or LLaMA-Factory sharegpt ranking).

    All or nothing: a bad record stops the import with an error naming it, and the workspace is
    left unchanged. Images are decoded once to check them (at most 64 M pixels each) and copied
    into the workspace under images/DATASET/, named by their content hash. A phone photo with an
    EXIF orientation is stored upright (re-encoded, the tag removed): sizes and boxes in the file
    refer to the photo as a viewer or annotation tool shows it.
    """
    from visrl.formats import import_file
    from visrl.store import Store

    fmt, path = _format_and_path(args, fmt, None, IMPORT_FORMATS, "PATH")
    if not path:
        raise click.UsageError("give the file to import: visrl import [FORMAT] PATH")
    summary = import_file(Store.open(workspace), path, fmt or "auto", dataset=dataset, split=split,
                          image_root=images_root, box_format=box_format)
    splits = ", ".join(f"{n} {s}" for s, n in summary["splits"].items())
    extra = f", {summary['pairs']} pending pairs" if summary.get("pairs") else ""
    click.echo(f"imported {summary['items']} items ({splits}){extra} into dataset "
               f"{summary['dataset']!r} as {summary['format']}; {summary['images']} new images")


@cli.command("export")
@click.argument("args", nargs=-1, metavar="[FORMAT] [OUT]")
@workspace_option
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), default=None, help="Export format.")
@click.option("--out", "-o", "out", type=click.Path(file_okay=False), default=None,
              help="Folder to write (new or empty; default: exports/<format>-<time> in the workspace).")
@click.option("--status", "statuses", type=click.Choice(STATUSES), multiple=True,
              help="Pair statuses to export (repeatable; default: accepted).")
@click.option("--stage", type=click.IntRange(1, 2), default=None, help="trl-dpo: 1 = box step, 2 = box + answer.")
@click.option("--dataset", "-d", default=None, help="Only this dataset.")
@click.option("--split", default="train", show_default=True, help="trl-sft: the item split.")
@click.option("--box-format", default=None, help="How boxes are written (default: the --model's, else viscot).")
@click.option("--model", "model", default=None,
              help="Write boxes and crops as this checkpoint was trained to (its visrl_model.json contract).")
def export_command(args: tuple[str, ...], workspace: str | None, fmt: str | None, out: str | None,
                   statuses: tuple[str, ...], stage: int | None, dataset: str | None, split: str,
                   box_format: str | None, model: str | None) -> None:
    """Export pairs as TRL datasets (trl-sft, trl-dpo) or LLaMA-Factory files (llamafactory)."""
    import datetime as dt

    from visrl.formats.export import export
    from visrl.store import Store

    fmt, out = _format_and_path(args, fmt, out, EXPORT_FORMATS, "OUT")
    if fmt is None:
        raise click.UsageError(f"give the format: visrl export --format {{{','.join(EXPORT_FORMATS)}}}")
    store = Store.open(workspace)
    if out is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = str(store.workspace.exports_dir / f"{fmt}{f'-stage{stage}' if stage else ''}-{stamp}")
    contract = None
    if model:
        from visrl.models import checkpoint_contract

        contract = checkpoint_contract(model, root=store.workspace.root)
    result = export(store, store.workspace, fmt, out, statuses=statuses or ("accepted",),
                    dataset=dataset, stage=stage, box_format=box_format, split=split, contract=contract)
    click.echo(f"exported {result['rows']} rows as {fmt} to {result['path']}")


@cli.command("datasets")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def datasets_command(workspace: str | None, as_json: bool) -> None:
    """List the workspace's datasets with their item counts."""
    from visrl.store import Store

    store = Store.open(workspace, create=False)
    rows = store.dataset_summaries()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no datasets; import one with `visrl import PATH --dataset NAME`")
    for row in rows:
        click.echo(f"{row['name']:<20} {row['format']:<9} {row['items']:>7} items  {row['source']}")


@cli.command("stats")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats_command(workspace: str | None, as_json: bool) -> None:
    """Items per dataset and split, rollouts, pairs per status, and recent failed jobs.

    A job still marked running whose process is gone (killed, out of memory) is marked failed
    first, with its log tail, so it is never shown as running.
    """
    from visrl.jobs import refresh_jobs
    from visrl.store import Store

    store = Store.open(workspace, create=False)
    dead = set(refresh_jobs(store))
    stats = store.stats()
    stats["failed_jobs"] = [
        {"id": job["id"], "kind": job["kind"], "dead": job["id"] in dead, "ended_at": job["ended_at"],
         "message": job["message"] or ""}
        for job in store.jobs(limit=RECENT_JOBS) if job["status"] == "failed"]
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"workspace {stats['workspace']}")
    if not stats["datasets"]:
        click.echo("  no datasets")
    for name, ds in stats["datasets"].items():
        items = ", ".join(f"{split} {n}" for split, n in ds["items"].items()) or "none"
        pairs = ", ".join(f"{status} {ds['pairs'].get(status, 0)}" for status in STATUSES)
        click.echo(f"  {name}: items {items}; rollouts {ds['rollouts']}; pairs {pairs}")
    jobs = ", ".join(f"{status} {n}" for status, n in stats["jobs"].items()) or "none"
    click.echo(f"  jobs: {jobs}; checkpoints: {stats['checkpoints']}")
    for job in stats["failed_jobs"]:
        lines = job["message"].strip().splitlines() or ["(no message)"]
        state = "died (process gone; was marked running)" if job["dead"] else "failed"
        click.echo(f"  job {job['id']} ({job['kind']}) {state} at {job['ended_at']}: {lines[0]}")
        for line in lines[1:][-TAIL_LINES:]:
            click.echo(f"    | {line}")


@cli.command("demo")
@workspace_option
@click.option("--force", is_flag=True, help="Rebuild a complete demo workspace (its data is lost).")
@click.option("--pairs-items", type=click.IntRange(0), default=None,
              help="Train items to generate the first pairs on (0: none; default: as many as the "
                   "app's first start, so both build the same workspace).")
def demo_command(workspace: str | None, force: bool, pairs_items: int | None) -> None:
    """Create the built-in demo workspace: synthetic benchmark, tiny model, first pairs."""
    from visrl.demo import create_demo_workspace
    from visrl.workspace import resolve_root

    sizes = {} if pairs_items is None else {"n_pairs_items": pairs_items}
    root = create_demo_workspace(resolve_root(workspace), force=force, progress=lambda line: click.echo(line, err=True),
                                 **sizes)
    click.echo(f"demo workspace: {root}  (next: visrl stats -w {root}; visrl-app -w {root})")
