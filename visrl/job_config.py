"""What a background job's recipe must hold before it starts, and what it writes.

:func:`validate_config` (a file) and :func:`validate_text` (YAML typed in the app) parse a
recipe as its stage does (the stage's record in :mod:`visrl.stages`: config class, parser,
output field); given the workspace they also check what the run will
need, so a mistake is reported in a second instead of minutes into a child process:

* the model resolves as the loader resolves it (a folder, or a Hub id in the local HF cache)
  and its ``config.json`` names a supported family; the adapter folder exists;
* the dataset exists in the store (or, for training, is an exported folder that exists);
* the output folder can be created and written;
* the environment variables named for API keys (``api_key_env`` of the remote backend,
  ``judge_api_key_env`` of model judges) are set, as the job (a child of this process) reads them;
* every server the config names (the remote policy's ``base_url``, a model judge's
  ``judge_base_url``) answers ``GET /models`` with those keys and lists the model the run asks
  for: a dead server, a refused key or a wrong model name fails here in ~4 s, with the URL and
  the reason (:func:`visrl.remote.check_servers`), not hours into a run.

:func:`job_target` names what a job writes (a folder, or for generation the store's rollout
run), so :mod:`visrl.jobs` can refuse a second active job into the same place.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError, VisRLError
from visrl.model_files import ADAPTER_CONFIG
from visrl.stages import KINDS, Stage, stage_of_kind
from visrl.workspace import Workspace


def validate_config(kind: str, config_path: str | Path,
                    workspace: str | Path | Workspace | None = None) -> dict[str, Any]:
    """The recipe in ``config_path`` as a plain mapping, checked; see :func:`validate_text`."""
    from visrl.config import read_yaml

    stage = stage_of_kind(kind)
    return _checked(stage, read_yaml(config_path), str(config_path), workspace)


def validate_text(kind: str, text: str, workspace: str | Path | Workspace | None = None,
                  source: str = "recipe") -> dict[str, Any]:
    """Parse ``text`` as a ``kind`` recipe with its config class; with ``workspace`` also check
    that its model, dataset and output folder are there (ConfigError / NotFoundError if not).

    Generation's mapping carries its effective ``run_key`` (the store run it writes).
    """
    from visrl.config import parse_yaml  # bounded; errors name ``source`` with line and column

    stage = stage_of_kind(kind)
    return _checked(stage, parse_yaml(text, source), source, workspace)


def _checked(stage: Stage, data: dict[str, Any], source: str,
             workspace: str | Path | Workspace | None) -> dict[str, Any]:
    """``data`` parsed as the stage parses its recipe (LLaMA-Factory / VisRL-seed keys of training
    and merge recipes mapped), so a recipe the stage accepts is never refused here."""
    from visrl.config import to_dict

    cfg = stage.parse(data, source)
    config = to_dict(cfg)
    ws = None
    if workspace is not None:
        ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
        check_needs(stage.kind, cfg, ws)
    if stage.kind == "generate":  # keyed by the model's weights, found where the run finds them
        from visrl.generate import run_key_for

        config["run_key"] = cfg.run_key or run_key_for(cfg, ws)
    return config


# ---------------------------------------------------------------------- what the run needs

def check_needs(kind: str, cfg: Any, ws: Workspace) -> None:
    """Raise a user error naming the first thing ``cfg`` needs that ``ws`` lacks."""
    stage = stage_of_kind(kind)
    if getattr(cfg, "backend", "local") == "local":
        _check_model(ws, "model_name_or_path", cfg.model_name_or_path)
    if getattr(cfg, "adapter_name_or_path", None):
        _check_adapter(ws, cfg.adapter_name_or_path)
    if stage.rolls_out:
        _check_dataset(ws, cfg.dataset)
        _check_api_keys(cfg)
        _check_servers(cfg)
    elif kind == "train" and cfg.dataset:
        if any(sep in cfg.dataset for sep in ("/", "\\", ".")):  # an exported folder (train/data.py)
            if not _absolute(ws, cfg.dataset).is_dir():
                raise ConfigError(f"dataset folder {cfg.dataset!r} does not exist "
                                  f"(relative paths are looked up in {ws.root})")
        else:
            _check_dataset(ws, cfg.dataset)
    output = stage.output_field
    if output and getattr(cfg, output, None):
        _check_writable(ws, output, getattr(cfg, output))


def _absolute(ws: Workspace, path: str) -> Path:
    return ws.resolve(path)


def _check_model(ws: Workspace, key: str, path: str) -> None:
    """The model resolves as the stage will load it (:func:`visrl.models.locate_model`: a folder
    of the workspace or the current directory, or a Hub id in the local HF cache; an adapter
    folder counts as its recorded base) and names a supported family."""
    from visrl.models import detect_family, locate_model, split_adapter

    try:
        source = locate_model(Path(path).expanduser(), ws.root)
        base, _ = split_adapter(source.path, None)
        detect_family(locate_model(base, ws.root).path if base != source.path else source.path)
    except VisRLError as exc:
        raise ConfigError(f"{key} {path!r}: {exc}") from None


def _check_adapter(ws: Workspace, path: str) -> None:
    folder = _absolute(ws, path)
    config = folder / ADAPTER_CONFIG
    if not config.is_file():
        raise ConfigError(f"adapter_name_or_path {path!r} is not a LoRA adapter folder (no {config.name}; "
                          f"relative paths are looked up in {ws.root})")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config}: {exc}") from None


def _check_api_keys(cfg: Any) -> None:
    """The key variables the run will read are set (the same checks, so the same messages, as
    the run's own: :func:`visrl.remote.api_key_from_env`); the key itself is never shown."""
    from visrl.judges import model_judge_key
    from visrl.remote import api_key_from_env

    if cfg.backend == "remote":
        api_key_from_env(cfg.api_key_env, "api_key_env")
    model_judge_key(cfg.judge_api_key_env, cfg.answer_judge, getattr(cfg, "crop_judge", "none"))


def _check_servers(cfg: Any) -> None:
    from visrl.remote import check_servers, servers_of

    check_servers(servers_of(cfg))


def _check_dataset(ws: Workspace, name: str) -> None:
    from visrl.store import Store

    Store(ws).dataset(name)  # NotFoundError listing the datasets there are


def _check_writable(ws: Workspace, key: str, path: str) -> None:
    folder = _absolute(ws, path)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key} {path!r} is a file, not a folder")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    # A real write (a temporary file, removed at once): permission bits say nothing for root,
    # read-only mounts or /proc.
    try:
        if not existing.is_dir():
            raise OSError(f"{existing} is not a folder")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"{key} {path!r} cannot be written: {exc}") from None


# ---------------------------------------------------------------------- what a job writes

def job_target(kind: str, config: dict[str, Any], root: Path) -> str | None:
    """The place job ``kind`` with validated ``config`` writes: a resolved folder, or
    ``rollouts run KEY`` for generation; None when every job gets its own (eval without
    ``output_dir`` writes ``runs/<job>/``)."""
    if kind == "generate":
        key = config.get("run_key")
        return f"rollouts run {key}" if key else None
    field = stage_of_kind(kind).output_field if kind in KINDS else None
    value = config.get(field) if field else None
    if not value:
        return None
    return str(Workspace(root).resolve(value).resolve())
