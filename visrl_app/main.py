"""``visrl-app``: open the VisRL app on a workspace (the built-in demo one by default)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from visrl.errors import VisRLError, WorkspaceError


def ensure_workspace(workspace: str | None) -> Path:
    """The folder to open; with none given, the demo workspace, created on first start."""
    from visrl.workspace import DB_NAME, demo_root, resolve_root

    if workspace:
        return resolve_root(workspace)
    root = demo_root()
    try:
        from visrl.demo import COMPLETE, create_demo_workspace  # builds the benchmark + model once
    except ImportError:
        if (root / DB_NAME).is_file():
            return root
        raise WorkspaceError(f"no demo workspace at {root} and this install cannot build one; "
                             "pass --workspace DIR") from None
    if not (root / COMPLETE).is_file():  # first start, or a build that was cut off: (re)build it
        click.echo(f"Creating the demo workspace in {root} (first start only, ~30 s) ...", err=True)
        create_demo_workspace(root, progress=lambda line: click.echo(line, err=True))
    return root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workspace", "-w", type=click.Path(file_okay=False), default=None,
              envvar="VISRL_WORKSPACE",
              help="Workspace folder (default: $VISRL_WORKSPACE, else the built-in demo workspace).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback requires --auth.")
@click.option("--port", type=int, default=None, help="Port (default: gradio's, 7860 or the next free).")
@click.option("--auth", default=None, metavar="USER:PASSWORD", envvar="VISRL_APP_AUTH",
              help="Require this login (needed for any non-local --host).")
def cli(workspace: str | None, host: str, port: int | None, auth: str | None) -> None:
    """Curate preference pairs, launch training, evaluate, and chat with the focus crop."""
    from visrl_app.app import check_bind, launch, parse_auth

    credentials = parse_auth(auth)
    check_bind(host, credentials)  # before any work: a refused start must be quick and clear
    launch(ensure_workspace(workspace), host=host, port=port, auth=credentials)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, standalone_mode=False)
    except VisRLError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)


if __name__ == "__main__":
    main()
