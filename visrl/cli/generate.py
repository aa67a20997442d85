"""CLI commands: ``visrl generate CONFIG`` (rollouts -> judges -> pairs) and ``visrl pairs CONFIG``."""

from __future__ import annotations

import click

from visrl.cli import cli, workspace_option


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
@click.option("--limit", type=int, default=None, help="Only the first N items (overrides the config).")
@click.option("--job-id", type=int, default=None, hidden=True)
@click.option("--dry-run", is_flag=True, help="Print the plan (run key, model identity, items and attempts "
              "to do, judges, what is reused or judged again) and exit; loads no model, asks no server.")
def generate(config: str, workspace: str | None, limit: int | None, job_id: int | None, dry_run: bool) -> None:
    """Roll out boxes and answers on a dataset split, judge them, store preference pairs.

    Resumable: run the same CONFIG again after a stop or crash and it continues. The run is
    keyed by the model's weights: other weights start a new run, other judges re-judge the
    stored rollouts.
    """
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_generate
    from visrl.jobs import run_stage

    cfg = load_config(GenerateConfig, config, {"limit": limit} if limit else None)
    if dry_run:
        from visrl.generate import plan_run
        from visrl.store import Store

        click.echo("\n".join(plan_run(Store.open(workspace), cfg).describe()))
        return
    report = run_stage(workspace, job_id, "generate",
                       lambda progress: run_generate(workspace, cfg, progress, job_id=job_id))
    click.echo(
        f"run {report.run_key}: {report.items_generated} items generated now "
        f"({report.items_done_before} of {report.items} done before), {report.rollouts} rollouts "
        f"({report.failed} failed, box parse rate {report.parse_rate:.0%}), "
        f"{report.items_per_s:.2f} items/s; pairs: {report.pairs} new, {report.pairs_total} in this run"
        + (f"; {report.rejudged} stored rollouts judged again (new judges)" if report.rejudged else "")
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
    store = Store.open(workspace)
    run_key = cfg.run_key or run_key_for(cfg, store.workspace)
    report = build_pairs(store, cfg.pairs_config(), run_key=run_key)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())) or "none"
    click.echo(f"run {run_key}: {report.items} items, {report.pairs_added} new pairs, "
               f"{report.pairs_total} in this run; {report.pairs_removed} pending pairs removed (these "
               f"thresholds no longer allow them, or pick another), {report.kept_reviewed} kept because a "
               f"person reviewed them; {report.unscored} rollouts dropped (judge replied without a score); "
               f"skipped: {skipped}")
