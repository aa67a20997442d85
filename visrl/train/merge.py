"""Merge a LoRA adapter into its base and export a plain model folder.

The export is a standard ``transformers`` folder: ``config.json`` and safetensors, plus the base's
own processor files (``preprocessor_config.json``, tokenizer, chat template, copied byte for byte:
:func:`visrl.model_files.copy_processor_files`), so it loads with
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor`` exactly as its base does,
with :func:`visrl.models.load_model`, and in vLLM, and it is the base of the next stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError, ModelError
from visrl.model_files import ADAPTER_CONFIG, is_adapter
from visrl.progress import Progress
from visrl.store import Store
from visrl.train.config import resolve_output, resolve_path, translate_foreign_keys
from visrl.workspace import Workspace

DTYPES = ("bfloat16", "float16", "float32", "auto")


@dataclass
class MergeConfig:
    """``visrl merge CONFIG``: keys as in LLaMA-Factory's export config."""

    model_name_or_path: str = field(metadata={"help": "Base model folder (relative: in the workspace)."})
    adapter_name_or_path: str = field(metadata={"help": "LoRA adapter folder (a training output_dir)."})
    export_dir: str = field(metadata={"help": "Where the merged model goes (relative: in the workspace)."})
    export_dtype: str = field(default="bfloat16", metadata={
        "help": "bfloat16 | float16 | float32 | auto (the base's dtype)."})
    export_size: int = field(default=5, metadata={"help": "Largest safetensors shard, in GB."})
    register: bool = field(default=True, metadata={
        "help": "Record the merged model as a checkpoint (stage 'merged') in the store."})

    def __post_init__(self) -> None:
        if self.export_dtype not in DTYPES:
            raise ConfigError(f"export_dtype must be one of {', '.join(DTYPES)}, got {self.export_dtype!r}")
        if not self.export_size >= 1:
            raise ConfigError(f"export_size must be >= 1 (GB), got {self.export_size}")


# Keys of LLaMA-Factory / VisRL-seed export (merge) YAMLs with no meaning here, and why; loading
# warns and drops them (as visrl.train.config.FOREIGN_IGNORED does for training YAMLs).
MERGE_FOREIGN_IGNORED: dict[str, str] = {
    "template": "the chat template comes with the model's processor",
    "trust_remote_code": "models load with transformers' own classes; no remote code runs",
    "finetuning_type": "merging always folds a LoRA adapter in",
    "export_device": "merging runs on the CPU in float32, then casts to export_dtype",
    "export_legacy_format": "exports are always safetensors",
}


def parse_merge_config(data: dict[str, Any], source: str = "config") -> MergeConfig:
    """A merge recipe's mapping (ours, or an LLaMA-Factory / VisRL-seed export config) as the
    config; errors name ``source``. The loaders live here, beside the class, not in
    :mod:`visrl.train.config`: there they made the ``config <-> merge`` import cycle."""
    from visrl.config import from_dict

    data = translate_foreign_keys(data, source=source, cls=MergeConfig, aliases={}, ignored=MERGE_FOREIGN_IGNORED)
    return from_dict(MergeConfig, data, source=source)


def load_merge_config(path: str | Path, overrides: dict[str, Any] | None = None) -> MergeConfig:
    """Read a merge YAML, apply ``overrides`` and build the config (:func:`parse_merge_config`)."""
    from visrl.config import read_yaml

    return parse_merge_config({**read_yaml(path), **(overrides or {})}, source=str(path))


def merge_lora(workspace: str | Path | Workspace | None, cfg: MergeConfig,
               progress: Progress | None = None, job_id: int | None = None) -> Path:
    """Merge ``cfg.adapter_name_or_path`` into ``cfg.model_name_or_path``; returns the export dir."""
    store = Store.open(workspace)
    ws = store.workspace
    from visrl.models import locate_model

    source = locate_model(cfg.model_name_or_path, ws.root)  # a folder or a cached Hub id
    base = source.label
    adapter = resolve_path(ws.root, cfg.adapter_name_or_path)
    if not adapter or not Path(adapter).is_dir():
        raise ConfigError(f"adapter_name_or_path {adapter!r} is not a folder")
    if not is_adapter(adapter):
        raise ModelError(f"{adapter} has no {ADAPTER_CONFIG}: not a LoRA adapter "
                         "(a full fine-tune needs no merge; use its folder directly)")
    import torch
    from peft import PeftModel

    from visrl.model_files import copy_processor_files
    from visrl.models import load_model, write_model_info

    out = resolve_output(ws.root, cfg.export_dir)
    if progress:
        progress.set_total(3)
    # Merging in float32 then casting keeps the sum W + BA exact before rounding to the export dtype.
    loaded = load_model(base, adapter=adapter, dtype="float32", device="cpu")
    model = loaded.model
    if not isinstance(model, PeftModel):
        raise ModelError(f"loading {adapter} on {base} gave no LoRA model to merge")
    _advance(progress, "merging")
    model = model.merge_and_unload()
    if cfg.export_dtype != "auto":
        model = model.to(getattr(torch, cfg.export_dtype))
    model.config.use_cache = True  # training turned it off; inference wants it
    _advance(progress, "saving")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size=f"{cfg.export_size}GB")
    copy_processor_files(source.path, out)  # never the image-only class VisRL may run (PITFALLS.md)
    _copy_generation_config(source.path, out)
    write_model_info(out, loaded.contract)  # the adapter's contract; a fresh model_id
    _advance(progress, "done")
    if cfg.register:
        stored = ws.relative(out) if ws.contains(out) else str(out)
        store.add_checkpoint(stored, cfg.model_name_or_path, "merged", job_id,
                             config={"adapter": cfg.adapter_name_or_path, "dtype": cfg.export_dtype})
    return out


def merge_for_inference(loaded: Any) -> bool:
    """Fold a LoRA adapter into the weights of a model loaded for inference (in memory, in place).

    Sampling through an unmerged adapter runs every adapted projection twice (W x and B A x):
    measured 1.34x the time of merged weights on the demo model. Generation has no use for the
    separate adapter, so it merges once after loading. Returns whether there was one to merge.
    """
    from peft import PeftModel

    if not isinstance(loaded.model, PeftModel):
        return False
    loaded.model = loaded.model.merge_and_unload().eval()
    return True


def merge_reasoner_adapter(reasoner: Any) -> bool:
    """:func:`merge_for_inference` on a local reasoner's model (a remote one has none)."""
    loaded = getattr(reasoner, "loaded", None)
    if loaded is None or not merge_for_inference(loaded):
        return False
    reasoner.model = loaded.model  # the Reasoner generates with its own reference to the model
    return True


def _advance(progress: Progress | None, message: str) -> None:
    if progress:
        progress.update(message=message)


def _copy_generation_config(base: Path, out: Path) -> None:
    """Keep the base's sampling defaults (eos ids, temperature) in the export."""
    import shutil

    source = base / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, out / "generation_config.json")
