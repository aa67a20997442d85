"""CLI commands: ``visrl train CONFIG`` and ``visrl merge CONFIG``."""

from __future__ import annotations

import click

from visrl.cli import cli, workspace_option
from visrl.stages import TRAIN_STAGES, stage_named

TRAIN_HELP = f"""Train a stage from a YAML CONFIG; its `stage` is one of: {"; ".join(
    stage_named(name).title for name in TRAIN_STAGES)}.

Resumes from the last checkpoint in output_dir (resume_from_checkpoint: auto). A stop
(Ctrl-C once, or `visrl jobs stop`) saves a checkpoint after the current step. An output_dir
that holds a finished run is refused (it would train nothing): --output-dir starts fresh
elsewhere, a larger --max-steps continues it.
"""


@cli.command(help=TRAIN_HELP, short_help=f"Train a stage ({', '.join(TRAIN_STAGES)}) from a YAML CONFIG.")
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps (overrides the config).")
@click.option("--output-dir", default=None, help="Write to this folder (overrides the config's output_dir).")
@click.option("--job-id", type=int, default=None, hidden=True)
def train(config: str, workspace: str | None, max_steps: int | None, output_dir: str | None,
          job_id: int | None) -> None:
    from visrl.train import load_train_config

    # The config first: a bad value is reported in ~0.3 s, before the store (sqlite-utils, pandas:
    # ~0.9 s) and torch (seconds) are imported.
    overrides = {k: v for k, v in (("max_steps", max_steps), ("output_dir", output_dir)) if v}
    cfg = load_train_config(config, overrides or None)
    if job_id is None:  # said as this command's options (a job's child says it as recipe keys)
        from visrl.config import to_dict
        from visrl.train.plan import check_will_train
        from visrl.workspace import Workspace

        check_will_train(to_dict(cfg), Workspace.open(workspace).root, flags=True)
    from visrl.jobs import run_stage
    from visrl.train.run import train as run_train
    result = run_stage(workspace, job_id, f"train {cfg.stage}",
                       lambda progress: run_train(workspace, cfg, progress, job_id=job_id))
    state = "stopped" if result.stopped else "finished"
    click.echo(f"{cfg.stage} {state} at step {result.global_step}: {result.path} "
               f"(base {result.base}; checkpoint #{result.checkpoint_id})"
               + ("; run the same command again to resume" if result.stopped else ""))


@cli.command()
@click.argument("config", type=click.Path(dir_okay=False))
@workspace_option
@click.option("--job-id", type=int, default=None, hidden=True)
def merge(config: str, workspace: str | None, job_id: int | None) -> None:
    """Merge a LoRA adapter into its base model and export a standalone model folder."""
    from visrl.jobs import run_stage
    from visrl.train.merge import load_merge_config, merge_lora

    cfg = load_merge_config(config)
    out = run_stage(workspace, job_id, "merge",
                    lambda progress: merge_lora(workspace, cfg, progress, job_id=job_id))
    click.echo(f"merged {cfg.adapter_name_or_path} into {cfg.model_name_or_path}: {out}")
