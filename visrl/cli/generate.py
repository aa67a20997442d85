"""CLI commands: ``visrl generate CONFIG`` (rollouts -> judges -> pairs) and ``visrl pairs CONFIG``."""

from __future__ import annotations

import click

from visrl.cli import cli, workspace_option


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
@click.option("--limit", type=int, default=None, help="Only the first N items (overrides the config).")
@click.option("--job-id", type=int, default=None, hidden=True)
def generate(config: str, workspace: str | None, limit: int | None, job_id: int | None) -> None:
    """Roll out boxes and answers on a dataset split, judge them, store preference pairs.

    Resumable: run the same CONFIG again after a stop or crash and it continues.
    """
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_generate
    from visrl.jobs import run_stage

    cfg = load_config(GenerateConfig, config, {"limit": limit} if limit else None)
    report = run_stage(workspace, job_id, "generate",
                       lambda progress: run_generate(workspace, cfg, progress, job_id=job_id))
    click.echo(
        f"run {report.run_key}: {report.items_generated} items generated now "
        f"({report.items_done_before} of {report.items} done before), {report.rollouts} rollouts "
        f"({report.failed} failed, box parse rate {report.parse_rate:.0%}), "
        f"{report.items_per_s:.2f} items/s; pairs: {report.pairs} new, {report.pairs_total} in this run"
        + (f"; {report.unscored} rollouts dropped: the judge replied without a score" if report.unscored else "")
        + ("; stopped early (run again to resume)" if report.stopped else ""))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
def pairs(config: str, workspace: str | None) -> None:
    """Rebuild preference pairs from a generate CONFIG's judged rollouts (its thresholds)."""
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_key_for
    from visrl.pairs import build_pairs
    from visrl.store import Store

    cfg = load_config(GenerateConfig, config)
    run_key = cfg.run_key or run_key_for(cfg)
    report = build_pairs(Store.open(workspace), cfg.pairs_config(), run_key=run_key)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())) or "none"
    click.echo(f"run {run_key}: {report.items} items, {report.pairs_added} new pairs, "
               f"{report.pairs_total} in this run; {report.pairs_removed} pending pairs removed (these "
               f"thresholds no longer allow them, or pick another), {report.kept_reviewed} kept because a "
               f"person reviewed them; {report.unscored} rollouts dropped (judge replied without a score); "
               f"skipped: {skipped}")
