"""``visrl-app``: open the VisRL app on a workspace (the built-in demo one by default)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from visrl.errors import VisRLError, WorkspaceError

BUILD_TIME = "20 s to a few minutes on a small CPU"  # measured: 20 s idle, 5.9 min at load ~11 (README)


# Runs the build, given as ``build(say)``, e.g. behind a "building…" page (visrl_app.first_start).
Builder = Callable[[Path, Callable[[Callable[[str], None]], Any]], None]


def ensure_workspace(workspace: str | None, builder: Builder | None = None) -> Path:
    """The folder to open; with none given, the demo workspace, created on first start.

    ``builder`` runs the build (the CLI serves a progress page meanwhile); without one it runs
    here, printing its steps.
    """
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
        def build(say: Callable[[str], None]) -> None:
            create_demo_workspace(root, progress=say)

        if builder is not None:
            builder(root, build)
        else:
            click.echo(f"Creating the demo workspace in {root} (first start only, {BUILD_TIME}) ...", err=True)
            build(lambda line: click.echo(line, err=True))
    return root


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workspace", "-w", type=click.Path(file_okay=False), default=None,
              envvar="VISRL_WORKSPACE",
              help="Workspace folder (default: $VISRL_WORKSPACE, else the built-in demo workspace).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything but loopback requires --auth.")
@click.option("--port", type=int, default=None, help="Port (default: gradio's, 7860 or the next free).")
@click.option("--auth", multiple=True, metavar="USER:PASSWORD", envvar="VISRL_APP_AUTH",
              help="Require a login (needed for any non-local --host); repeat it, one per reviewer "
                   "(each login is the reviewer on the audit rows).")
@click.option("--auth-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="A text file of logins, one USER:PASSWORD per line ('#' starts a comment).")
@click.option("--user", default=None, envvar="VISRL_USER", metavar="NAME",
              help="Reviewer name on audit rows when there is no login (default: $VISRL_USER, else "
                   "your OS login); under --auth each browser's login name is used.")
@click.option("--max-upload-mb", type=click.IntRange(1, 4096), default=50, show_default=True,
              help="Largest file a browser may upload (the Chat tab's image), in MB; larger ones get 413.")
def cli(workspace: str | None, host: str, port: int | None, auth: tuple[str, ...], auth_file: str | None,
        user: str | None, max_upload_mb: int) -> None:
    """Curate preference pairs, launch training, evaluate, and chat with the focus crop."""
    from visrl_app.app import check_bind, host_is_local, is_local, launch, parse_auth
    from visrl_app.first_start import build_with_page, pick_port

    credentials = parse_auth(auth, auth_file)
    check_bind(host, credentials)  # before any work: a refused start must be quick and clear
    from visrl.desk import check_reviewer

    reviewer = check_reviewer(user) if user is not None else None  # before any work, like check_bind
    chosen = {"port": port}

    def with_page(root: Path, build: Callable[[Callable[[str], None]], Any]) -> None:
        # Listen first: the address answers with the build's progress, then with the app.
        chosen["port"] = pick_port(host, port)
        build_with_page(root, build, host, chosen["port"], host_ok=host_is_local if is_local(host) else None,
                        echo=lambda line: click.echo(line, err=True))

    root = ensure_workspace(workspace, with_page)
    launch(root, host=host, port=chosen["port"], auth=credentials, user=reviewer, max_upload_mb=max_upload_mb)


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
