"""What a generation run is: the policy that samples it (its weights, not its folder's name)
and the settings that make rollouts differ. The run key is derived from both.

:func:`policy_identity` names the policy: for the local backend the content fingerprint of the
base model's weights (:mod:`visrl.fingerprint`) and of the adapter's, when there is one; for
``backend: remote`` the served model name and the server's base URL (the client cannot see the
weights behind them). :func:`run_parts` holds everything a rollout depends on; the run key
hashes it, and the *lineage* hashes it without the identity, so a run whose model changed can
be told from a run with other settings ("the model changed since run K").
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from visrl.errors import VisRLError
from visrl.fingerprint import folder_fingerprint
from visrl.workspace import Workspace


def policy_identity(cfg: Any, workspace: Workspace | None = None) -> dict[str, Any]:
    """The identity of ``cfg``'s policy (a :class:`visrl.policy.PolicyConfig`).

    Local: ``{"model": name, "weights": fingerprint | None, "model_id": id | None}`` plus
    ``"adapter"`` / ``"adapter_weights"`` with an adapter. ``weights`` is None when the model is
    not here (a test's stand-in name; the run then fails to load it anyway). Relative paths are
    looked up in ``workspace`` first, as the loader does. ``model_id`` (VisRL's record in
    ``visrl_model.json``) is shown, not keyed: the weights decide.
    """
    if cfg.backend == "remote":
        return {"remote_model": cfg.remote_model, "base_url": (cfg.base_url or "").rstrip("/")}
    base, adapter = _folders(cfg, workspace)
    identity: dict[str, Any] = {"model": str(base or cfg.model_name_or_path),
                                "weights": folder_fingerprint(base) if base else None,
                                "model_id": _model_id(base)}
    if adapter is not None or cfg.adapter_name_or_path:
        identity["adapter"] = str(adapter or cfg.adapter_name_or_path)
        identity["adapter_weights"] = folder_fingerprint(adapter) if adapter else None
    return identity


def _folders(cfg: Any, workspace: Workspace | None) -> tuple[Path | None, Path | None]:
    """The base model folder and adapter folder ``cfg`` loads (None: not found here)."""
    from visrl.models import locate_model, split_adapter
    from visrl.policy import resolve_model_path

    root = workspace.root if workspace is not None else None
    model = resolve_model_path(workspace, cfg.model_name_or_path) if workspace else cfg.model_name_or_path
    adapter = resolve_model_path(workspace, cfg.adapter_name_or_path) if workspace else cfg.adapter_name_or_path
    try:
        base_name, adapter_dir = split_adapter(model, adapter)
        base = locate_model(base_name, root).path
    except VisRLError:
        return None, Path(adapter) if adapter and Path(adapter).is_dir() else None
    return base, adapter_dir if adapter_dir is not None and adapter_dir.is_dir() else None


def _model_id(folder: Path | None) -> str | None:
    from visrl.contract import read_record

    return read_record(folder).get("model_id") if folder is not None else None


def keyed_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The part of an identity the run key hashes: fingerprints (content), remote name and URL."""
    keyed = {k: identity[k] for k in ("remote_model", "base_url") if k in identity}
    for name in ("weights", "adapter_weights"):
        if name in identity:
            keyed[name] = (identity[name] or {}).get("sha256")
    return keyed


def run_parts(cfg: Any) -> dict[str, Any]:
    """The settings rollouts depend on (model label, data, sampling, seed, contract keys set)."""
    parts = {"model": cfg.model_label(), "dataset": cfg.dataset, "split": cfg.split,
             "attempts": cfg.attempts, "temperature": cfg.temperature, "top_p": cfg.top_p,
             "answer_temperature": cfg.answer_temperature, "max_new_tokens": cfg.max_new_tokens,
             "seed": cfg.seed}
    # Contract keys count only when set (a config without them follows the checkpoint's contract).
    parts.update({k: v for k, v in cfg.contract_overrides().items() if v is not None})
    return parts


def digest(parts: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:10]


def run_key(cfg: Any, identity: dict[str, Any]) -> str:
    """``DATASET-SPLIT-DIGEST`` of the run's settings and its policy's (keyed) identity."""
    return f"{cfg.dataset}-{cfg.split}-{digest({**run_parts(cfg), 'identity': keyed_identity(identity)})}"


def lineage(cfg: Any) -> str:
    """The digest of the run's settings alone: runs of one lineage differ only in their model."""
    return digest(run_parts(cfg))


def describe_identity(identity: dict[str, Any]) -> str:
    """One line naming the policy: ``models/x (weights 3f2a9c01..., 2 files, 15.2 GB) + adapter ...``."""
    if "remote_model" in identity:
        return f"{identity['remote_model']!r} served at {identity['base_url']} (remote: the name and URL identify it)"
    text = f"{identity['model']} ({_weights(identity.get('weights'))})"
    if "adapter" in identity:
        text += f" + adapter {identity['adapter']} ({_weights(identity.get('adapter_weights'))})"
    return text


def _weights(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "no weights found here"
    size = fingerprint["bytes"]
    shown = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB" if size >= 1e5 else f"{size} B"
    return f"weights {fingerprint['sha256'][:12]}, {fingerprint['files']} files, {shown}"
