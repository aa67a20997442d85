"""CLI commands: ``visrl eval CONFIG`` (two-step vs direct metrics) and ``visrl evals``."""

from __future__ import annotations

import click

from visrl.cli import cli, workspace_option


@cli.command("eval")
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
@click.option("--limit", type=int, default=None, help="Only the first N items (overrides the config).")
@click.option("--job-id", type=int, default=None, hidden=True)
def eval_command(config: str, workspace: str | None, limit: int | None, job_id: int | None) -> None:
    """Evaluate a model on a split: box Acc@0.5, mean IoU, answer accuracy vs the direct baseline.

    Writes metrics.json, report.md and predictions.jsonl and stores the result for comparison
    (`visrl evals`).
    """
    from visrl.config import load_config
    from visrl.evaluate import EvalConfig, run_eval
    from visrl.jobs import run_stage

    cfg = load_config(EvalConfig, config, {"limit": limit} if limit else None)
    report = run_stage(workspace, job_id, "eval",
                       lambda progress: run_eval(workspace, cfg, progress, job_id=job_id))
    click.echo(report.table, nl=False)
    click.echo(f"results in {report.output_dir}"
               + ("; stopped early, not stored" if report.stopped else f" (evaluation {report.evaluation_id})"))


@cli.command("evals")
@workspace_option
def evals_command(workspace: str | None) -> None:
    """Compare every stored evaluation (one markdown table)."""
    from visrl.evaluate import compare_table
    from visrl.store import Store

    click.echo(compare_table(Store.open(workspace)), nl=False)
