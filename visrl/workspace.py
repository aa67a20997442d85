"""A workspace is a folder: ``visrl.db``, ``images/``, ``runs/<job>/``, ``exports/``, ``models/``.

One function, :func:`resolve_root`, decides which folder is meant (explicit argument, then
``VISRL_WORKSPACE``, then the built-in demo workspace under ``VISRL_HOME``), so tests point every
command at a temporary folder with one environment variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from visrl.errors import DataError, WorkspaceError

DB_NAME = "visrl.db"
SUBDIRS = ("images", "runs", "exports", "models")


def visrl_home() -> Path:
    """Where VisRL keeps its own state (the demo workspace): ``VISRL_HOME`` or ``~/.visrl``."""
    return Path(os.environ.get("VISRL_HOME") or Path.home() / ".visrl").expanduser()


def demo_root() -> Path:
    return visrl_home() / "demo"


def resolve_root(workspace: str | Path | None = None) -> Path:
    """The workspace folder meant: the argument, else ``VISRL_WORKSPACE``, else the demo one."""
    if workspace:
        return Path(workspace).expanduser().resolve()
    env = os.environ.get("VISRL_WORKSPACE")
    if env:
        return Path(env).expanduser().resolve()
    return demo_root().resolve()


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace. Create with :meth:`open`; the store lives at :attr:`db_path`."""

    root: Path

    @classmethod
    def open(cls, workspace: str | Path | None = None, create: bool = True) -> Workspace:
        """Open (and by default create) the workspace folder and its sub-folders."""
        root = resolve_root(workspace)
        if root.exists() and not root.is_dir():
            raise WorkspaceError(f"workspace {root} exists but is not a folder")
        if not create and not (root / DB_NAME).is_file():
            raise WorkspaceError(
                f"no workspace at {root} (no {DB_NAME}); create one with `visrl demo --workspace {root}` "
                "or `visrl import ... --workspace DIR`"
            )
        root.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (root / sub).mkdir(exist_ok=True)
        return cls(root)

    @property
    def db_path(self) -> Path:
        return self.root / DB_NAME

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    def run_dir(self, job_id: int) -> Path:
        path = self.runs_dir / str(job_id)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def contains(self, path: str | Path) -> bool:
        """True when ``path`` resolves (symlinks followed) to a place inside the workspace."""
        try:
            Path(path).resolve().relative_to(self.root.resolve())
        except ValueError:
            return False
        return True

    def relative(self, path: str | Path) -> str:
        """``path`` as a POSIX path relative to the root; a path outside it is a DataError."""
        resolved = Path(path).resolve()
        try:
            return resolved.relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise DataError(f"{path} is outside the workspace {self.root}") from None

    def resolve(self, path: str | Path, search_cwd: bool = False) -> Path:
        """The place a config's ``path`` names: an absolute path (``~`` expanded) as it is; a
        relative one inside the workspace. With ``search_cwd``, a relative path the workspace has
        nothing at but the current directory has is that (resolved): ``models/x`` is the
        workspace's when both have one. Nothing is created or required to exist. The one resolver
        of config paths: model folders, output folders, datasets and checkpoints all go through it."""
        given = Path(path).expanduser()
        if given.is_absolute():
            return given
        inside = self.root / given
        if search_cwd and not inside.exists() and given.exists():
            return given.resolve()
        return inside

    def absolute(self, relative: str | Path) -> Path:
        """The absolute path of a stored workspace-relative path; refuses paths that leave it."""
        path = (self.root / relative).resolve()
        if not self.contains(path):
            raise DataError(f"{relative} leaves the workspace {self.root}")
        return path
