"""CLI commands: ``visrl jobs start|list|show|logs|stop|kill`` (background stage runs)."""

from __future__ import annotations

import json
import sys

import click

from visrl.cli import cli, workspace_option
from visrl.stages import KINDS


@cli.group(help=f"Run stages ({', '.join(KINDS)}) in the background and watch them.")
def jobs() -> None:
    pass


@jobs.command("start", context_settings={"ignore_unknown_options": True})
@click.argument("kind", type=click.Choice(KINDS))
@click.argument("config", type=click.Path(dir_okay=False))
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@workspace_option
@click.option("--launcher", type=click.Choice(["accelerate"]), default=None,
              help="Run the stage under `accelerate launch` (multi-GPU, DeepSpeed, FSDP).")
@click.option("--accelerate-config", type=click.Path(dir_okay=False, exists=True), default=None,
              help="accelerate config YAML (with --launcher accelerate).")
@click.option("--num-processes", type=int, default=None, help="Processes (GPUs) for accelerate.")
def start(kind: str, config: str, extra: tuple[str, ...], workspace: str | None, launcher: str | None,
          accelerate_config: str | None, num_processes: int | None) -> None:
    """Start KIND CONFIG as a background job; EXTRA arguments go to the stage command."""
    from visrl.errors import ConfigError
    from visrl.jobs import Launcher, start_job
    from visrl.workspace import Workspace

    if launcher is None and (accelerate_config or num_processes):
        raise ConfigError("--accelerate-config and --num-processes need --launcher accelerate")
    spec = Launcher(launcher, accelerate_config, num_processes) if launcher else None
    job_id = start_job(workspace, kind, config, launcher=spec, extra_args=extra)
    root = Workspace.open(workspace).root
    click.echo(f"started job {job_id}; watch it with `visrl jobs logs {job_id} --follow -w {root}`")


@jobs.command("list")
@workspace_option
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
@click.option("--limit", type=int, default=50, show_default=True, help="Newest N jobs.")
def list_command(workspace: str | None, as_json: bool, limit: int) -> None:
    """List jobs, newest first (jobs whose process died are marked failed)."""
    from visrl.jobs import list_jobs

    rows = list_jobs(workspace, limit=limit)
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    click.echo(f"{'id':>4}  {'kind':<9} {'status':<10} {'progress':>8}  {'started':<25} message")
    for job in rows:
        message = (job["message"] or "").splitlines()[0][:60] if job["message"] else ""
        click.echo(f"{job['id']:>4}  {job['kind']:<9} {job['status']:<10} "
                   f"{100 * (job['progress'] or 0):>7.1f}%  {job['started_at'] or '':<25} {message}")


@jobs.command("show")
@click.argument("job_id", type=int)
@workspace_option
def show(job_id: int, workspace: str | None) -> None:
    """Show one job as JSON, with its latest metrics."""
    from visrl.jobs import job_status

    click.echo(json.dumps(job_status(workspace, job_id), indent=2, default=str))


@jobs.command("logs")
@click.argument("job_id", type=int)
@workspace_option
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
@click.option("--lines", "-n", type=int, default=200, show_default=True, help="Last N lines.")
def logs(job_id: int, workspace: str | None, follow: bool, lines: int) -> None:
    """Print a job's log (its stdout and stderr)."""
    from visrl.jobs import follow_log, log_tail

    if not follow:
        click.echo(log_tail(workspace, job_id, lines=lines), nl=False)
        return
    for chunk in follow_log(workspace, job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@jobs.command("stop")
@click.argument("job_id", type=int)
@workspace_option
@click.option("--force", is_flag=True, help="Kill the job if it has not stopped after --grace seconds.")
@click.option("--grace", type=float, default=10.0, show_default=True, help="Seconds to wait with --force.")
@click.option("--wait", type=float, default=0.0, help="Seconds to wait for the job to exit.")
def stop(job_id: int, workspace: str | None, force: bool, grace: float, wait: float) -> None:
    """Ask a job to stop: it finishes its current step, saves, and exits.

    Asking again while it is stopping sends nothing more; `visrl jobs kill` kills it now."""
    from visrl.jobs import stop_job

    job = stop_job(workspace, job_id, force=force, timeout=wait, grace=grace)
    click.echo(f"job {job_id}: {job['status']}")


@jobs.command("kill")
@click.argument("job_id", type=int)
@workspace_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def kill(job_id: int, workspace: str | None, yes: bool) -> None:
    """Kill a job now (SIGKILL): work since its last checkpoint is lost. Prefer `stop`."""
    from visrl.jobs import kill_job

    if not yes:
        click.confirm(f"Kill job {job_id} without saving?", abort=True, err=True)
    job = kill_job(workspace, job_id)
    click.echo(f"job {job_id}: {job['status']} ({job['message']})")
