"""The ``visrl`` command line. Each command parses, calls one library function, prints.

Commands live in small modules by area (data, models, generate, train, jobs) and register on
the one :data:`cli` group. Library errors (:class:`visrl.errors.VisRLError`) become a one-line
``Error: ...`` with exit status 1 instead of a traceback.
"""

from __future__ import annotations

import sys

import click

from visrl.errors import VisRLError
from visrl.stages import KINDS, single_process_kinds

# Commands that run a model in this process: the stages' (visrl.stages) and two that are no
# stage. They choose torch's thread count first (see visrl.runtime); the ones in SINGLE_PROCESS
# refuse to run as one of several launcher ranks.
MODEL_COMMANDS = (*KINDS, "serve", "infer")
SINGLE_PROCESS = (*single_process_kinds(), "serve", "infer")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="visrl")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="VISRL_NUM_THREADS",
              show_envvar=True, help="torch CPU threads of a model command (default: OMP_NUM_THREADS, "
              "else the cores available / the processes on this machine).")
@click.pass_context
def cli(ctx: click.Context, threads: int | None) -> None:
    """VisRL: teach a vision-language model to look (a box) before it answers."""
    if ctx.invoked_subcommand not in MODEL_COMMANDS:
        return
    import os

    from visrl.runtime import THREADS_ENV, apply_threads, single_process_only

    if ctx.invoked_subcommand in SINGLE_PROCESS:
        single_process_only(ctx.invoked_subcommand)
    if threads is not None:
        os.environ[THREADS_ENV] = str(threads)
    apply_threads()  # before torch is imported; run_stage says the choice in the log


workspace_option = click.option(
    "--workspace", "-w", type=click.Path(file_okay=False), default=None, envvar="VISRL_WORKSPACE",
    help="Workspace folder (default: $VISRL_WORKSPACE, else the built-in demo workspace).",
)


def _register() -> None:
    # Imported for their side effect of adding commands to ``cli``; each module imports only
    # click and lightweight visrl modules at top level, so `visrl --help` stays fast.
    from visrl.cli import data, evaluate, generate, jobs, models, review, train  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    _register()
    try:
        cli.main(args=argv, standalone_mode=False)
    except VisRLError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
