"""The model a stage runs, wherever it lives: a local folder (plus an adapter) or a server.

Generation and evaluation both read a dataset of the workspace with a policy; the settings they
share, their checks and the loading of the reasoner live here once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from visrl.boxes import QWEN2_5_MAX_PIXELS, QWEN2_5_MIN_PIXELS
from visrl.contract import TwoStepContract
from visrl.contract_fields import ContractFields
from visrl.errors import ConfigError
from visrl.workspace import Workspace


@dataclass
class PolicyConfig(ContractFields):
    """Keys every policy-running stage takes (subclasses add their own), the contract keys
    (:class:`ContractFields`) among them. Paths may be workspace-relative."""

    model_name_or_path: str = field(default="", metadata={
        "help": "Model folder (local backend); relative paths are looked up in the workspace."})
    adapter_name_or_path: str | None = field(default=None, metadata={
        "help": "LoRA adapter folder applied on the model (e.g. the SFT warm-up or a trained checkpoint), or null."})
    backend: str = field(default="local", metadata={
        "help": "'local' (the model in this process) or 'remote' (an OpenAI-compatible server such as vLLM)."})
    base_url: str | None = field(default=None, metadata={
        "help": "Remote backend: the server's base URL, e.g. http://127.0.0.1:8000/v1."})
    remote_model: str | None = field(default=None, metadata={"help": "Remote backend: the served model name."})
    api_key_env: str | None = field(default=None, metadata={
        "help": "Remote backend: NAME of the environment variable holding the server's API key "
                "(e.g. VLLM_API_KEY); never the key itself (configs are stored with each job). null = no key."})
    remote_min_pixels: int = field(default=QWEN2_5_MIN_PIXELS, metadata={
        "help": "Remote backend, box_format qwen2_5: the server processor's min_pixels (Qwen2.5-VL's default); "
                "its boxes are pixels of the image resized into this budget. Unused when the server publishes "
                "its contract (`visrl serve` does)."})
    remote_max_pixels: int = field(default=QWEN2_5_MAX_PIXELS, metadata={
        "help": "Remote backend, box_format qwen2_5: the server processor's max_pixels (Qwen2.5-VL's default)."})
    dataset: str = field(default="", metadata={"help": "Dataset name in the workspace store (`visrl stats`)."})
    split: str = field(default="train", metadata={"help": "Split of the dataset."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N items (by id); null = all."})
    max_new_tokens: int = field(default=64, metadata={"help": "Token budget of each step's reply."})
    batch_size: int = field(default=8, metadata={"help": "Items per generate call."})

    def __post_init__(self) -> None:
        if self.backend not in ("local", "remote"):
            raise ConfigError(f"backend must be 'local' or 'remote', not {self.backend!r}")
        if self.backend == "local" and not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required for the local backend")
        if self.backend == "remote" and not (self.base_url and self.remote_model):
            raise ConfigError("the remote backend needs base_url and remote_model")
        if not self.dataset:
            raise ConfigError("dataset is required: the name of a dataset in the workspace (`visrl stats`)")
        self.check_contract()  # names a bad value before a model loads
        # Comparisons are written `not (value >= low)` so that NaN, which compares false, fails too.
        for name in ("batch_size", "max_new_tokens", "remote_min_pixels"):
            if not getattr(self, name) >= 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.remote_max_pixels >= self.remote_min_pixels:
            raise ConfigError(f"remote_max_pixels must be at least remote_min_pixels ({self.remote_min_pixels}), "
                              f"got {self.remote_max_pixels}")
        if self.limit is not None and not self.limit >= 1:
            raise ConfigError(f"limit must be at least 1 or null, got {self.limit}")

    def remote_contract(self, served: dict[str, Any] | None = None) -> TwoStepContract:
        """The remote backend's contract, with the config's keys on top: the one the server
        publishes (``served``: ``visrl serve`` does, from its checkpoint), else Visual-CoT boxes in
        the frame of ``remote_min_pixels``/``remote_max_pixels`` (the server processor's budget)."""
        base = (TwoStepContract.from_dict(served) if served else
                TwoStepContract(image_min_pixels=self.remote_min_pixels, image_max_pixels=self.remote_max_pixels))
        return self.over(base)


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    """ConfigError unless ``low <= value <= high`` (``low < value`` when ``low_open``); NaN fails."""
    inside = (low < value if low_open else low <= value) and value <= high
    if not inside:
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ConfigError(f"{name} must be in {bound}, got {value}")


def resolve_model_path(ws: Workspace, path: str | None) -> str | None:
    """A relative model path names a folder of the workspace when one is there (``models/x``),
    else a folder of the current directory; any other name (a Hub id) is kept as given for
    :func:`visrl.models.locate_model`."""
    if not path:
        return path
    found = ws.resolve(path, search_cwd=True)
    return str(found) if found.exists() else path


def load_reasoner(ws: Workspace, cfg: PolicyConfig) -> Any:
    """The policy: an in-process :class:`visrl.reasoning.Reasoner` (the checkpoint's contract with
    the config's overrides) or a remote one."""
    if cfg.backend == "remote":
        from visrl.remote import RemoteReasoner, api_key_from_env, served_contract

        api_key = api_key_from_env(cfg.api_key_env, "api_key_env")
        served = served_contract(cfg.base_url, cfg.remote_model, api_key=api_key)
        return RemoteReasoner(cfg.base_url, cfg.remote_model, contract=cfg.remote_contract(served), api_key=api_key)
    from visrl.models import load_model
    from visrl.reasoning import Reasoner

    loaded = load_model(resolve_model_path(ws, cfg.model_name_or_path),
                        adapter=resolve_model_path(ws, cfg.adapter_name_or_path),
                        overrides=cfg.contract_overrides())
    return Reasoner(loaded)


def policy_contract(ws: Workspace, cfg: PolicyConfig) -> TwoStepContract:
    """The contract :func:`load_reasoner` would give, read from the checkpoint's files without
    loading its weights (e.g. to crop for a judge when no rollout is left to generate)."""
    if cfg.backend == "remote":
        return cfg.remote_contract()
    from visrl.models import checkpoint_contract

    return checkpoint_contract(resolve_model_path(ws, cfg.model_name_or_path) or cfg.model_name_or_path,
                               adapter=resolve_model_path(ws, cfg.adapter_name_or_path),
                               overrides=cfg.contract_overrides())
