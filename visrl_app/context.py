"""What every tab shares: the workspace and its store (no per-browser state lives here).

Per-browser state (the pair on screen, its version, the job being watched) is ``gr.State``;
this object is read-only after start. The :class:`~visrl.store.Store` is safe to share between
gradio's worker threads: it opens one SQLite connection per thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from visrl.model_files import is_adapter
from visrl.models import split_adapter
from visrl.store import Store
from visrl.workspace import Workspace

# configs/ of a source checkout (the demo recipes); absent in an installed wheel.
REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@dataclass(frozen=True)
class AppContext:
    """``user``: the reviewer named on audit rows when the app runs without a login (``--user``,
    else ``$VISRL_USER``, else the OS login); under ``--auth`` each browser's login name wins."""

    workspace: Workspace
    store: Store
    user: str = "local"

    @classmethod
    def open(cls, workspace: str | Path | Workspace, user: str | None = None) -> AppContext:
        from visrl.desk import default_reviewer

        ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        return cls(ws, Store(ws), user or default_reviewer())

    @property
    def root(self) -> Path:
        return self.workspace.root

    def config_dirs(self) -> list[Path]:
        """Where YAML recipes are looked for: the workspace's configs/, then the repo's."""
        dirs = [self.root / "configs", self.root / "configs" / "demo", REPO_CONFIGS / "demo", REPO_CONFIGS]
        return [d for d in dirs if d.is_dir()]


def warn(message: str) -> str:
    """Show ``message`` as a warning toast (a ``UserWarning`` outside a request) and return it."""
    gr.Warning(message)
    return message


def model_choices(ctx: AppContext) -> list[tuple[str, str]]:
    """(label, workspace-relative path) of every model and adapter the workspace knows.

    Folders under ``models/`` holding ``config.json`` (full or merged models) or
    ``adapter_config.json`` (LoRA adapters), plus checkpoints recorded in the store.
    """
    seen: dict[str, str] = {}
    models = ctx.workspace.models_dir
    for folder in sorted(p for p in models.glob("*") if p.is_dir()) if models.is_dir() else []:
        kind = _model_kind(folder)
        if kind:
            seen[ctx.workspace.relative(folder)] = kind
    for row in ctx.store.checkpoints():
        path = Path(row["path"])
        absolute = ctx.workspace.resolve(path)
        if absolute.is_dir() and ctx.workspace.contains(absolute):
            seen.setdefault(ctx.workspace.relative(absolute), f"{row['stage']} checkpoint")
    return [(f"{path} ({kind})", path) for path, kind in seen.items()]


def _model_kind(folder: Path) -> str | None:
    if is_adapter(folder):
        return "adapter"
    if (folder / "config.json").is_file():
        return "model"
    return None


def resolve_model(ctx: AppContext, choice: str) -> tuple[str, str | None]:
    """(model path, adapter path or None) for a :func:`model_choices` value (workspace-relative).

    An adapter's base is the one :func:`visrl.models.split_adapter` finds, as loading does (the
    adapter's VisRL record, then peft's ``base_model_name_or_path``); a base inside the workspace
    is given relative to it, like the choices.
    """
    base, adapter = split_adapter(ctx.workspace.absolute(choice), None)
    if adapter is None:  # a full or merged model
        return choice, None
    if Path(base).is_absolute() and ctx.workspace.contains(base):
        return ctx.workspace.relative(base), choice
    return str(base), choice


def model_dropdown(ctx: AppContext, current: str | None = None) -> gr.Dropdown:
    """The model picker re-read from disk and store (a checkpoint trained since start shows up)."""
    choices = model_choices(ctx)
    values = [value for _, value in choices]
    return gr.Dropdown(choices=choices, value=current if current in values else (values[-1] if values else None))
