"""Load a vision-language model and its processor from a local folder or the local HF cache.

A model is named as transformers names it: a folder, or a Hub id (``Qwen/Qwen2.5-VL-7B-Instruct``)
found in the Hugging Face cache (``HF_HUB_CACHE`` / ``HF_HOME``) through ``huggingface_hub``,
offline: nothing is ever downloaded (:func:`locate_model`). One loader for every place that runs a model (inference, generation, training, merge, the app),
so a real 7B checkpoint and the tiny test model take the same path. The model family (from
``config.json``'s ``model_type``) decides the default box text format (DESIGN.md, "Boxes") and the
processor class. A folder may pin its two-step contract (box format, crop, pixel budgets:
:mod:`visrl.contract`) in ``visrl_model.json`` (models trained by VisRL on Visual-CoT data answer in
the Visual-CoT form whatever their family); an adapter's record also names the base it was
trained on (with its Hub revision and a weights fingerprint), and loading it on another base, or on
other weights under the same name, is refused (:func:`check_adapter_base`).

Without torchvision the Qwen video processors cannot be built and ``AutoProcessor`` either fails
or silently returns the tokenizer alone (PITFALLS.md); the loader then assembles an image-only
processor of the family from the tokenizer and the PIL image processor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.contract import (
    CONTRACT_FILE,
    TwoStepContract,
    processor_pixels,
    read_contract,
    read_record,
    write_contract,
)
from visrl.errors import ModelError
from visrl.model_files import (
    ADAPTER_CONFIG,
    folder_chat_template,
    hub_revision,
    is_adapter,
    short,
    weights_fingerprint,
)

log = logging.getLogger(__name__)

# transformers 5 renamed gradient_checkpointing; trl 1.16 and peft still use the old names, which
# warn on every load and run. The warning is addressed to those libraries, not to our users.
warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)

MODEL_FILE = CONTRACT_FILE  # {"box_format": "viscot", ...}: the contract a VisRL-trained folder keeps
# A Hub repo id: "name" or "org/name" of letters, digits, '-', '_', '.' (huggingface_hub validates
# it again; this only decides whether a name that is no folder is worth looking up in the cache).
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


@dataclass(frozen=True)
class Family:
    box_format: str
    processor_class: str  # the transformers class the image-only processor derives from


FAMILIES: dict[str, Family] = {
    "qwen2_vl": Family("qwen2", "Qwen2VLProcessor"),
    "qwen2_5_vl": Family("qwen2_5", "Qwen2_5_VLProcessor"),
    "qwen3_vl": Family("qwen3", "Qwen3VLProcessor"),
    "qwen3_vl_moe": Family("qwen3", "Qwen3VLProcessor"),
}


@dataclass
class LoadedModel:
    """A model ready for inference (eval mode, on ``device``) and what describes it."""

    model: Any
    processor: Any
    path: str
    adapter: str | None
    family: str
    contract: TwoStepContract
    device: str
    dtype: str
    hub_id: str | None = None  # the Hub id the model was found under in the cache, if any

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def box_format(self) -> str:
        return self.contract.box_format


@dataclass(frozen=True)
class ModelSource:
    """Where a named model is: its folder, and the Hub id it was found under (None for a folder)."""

    path: Path
    hub_id: str | None = None

    @property
    def label(self) -> str:
        """The name to record: the Hub id, else the folder."""
        return self.hub_id or str(self.path)


def hub_cache_dir() -> str:
    """The cache ``huggingface_hub`` reads (``HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def locate_model(name_or_path: str | Path, root: str | Path | None = None) -> ModelSource:
    """The folder of a model named as transformers names it, offline.

    Tried in order: a relative name as a folder of ``root`` (a workspace wins, as for every
    workspace path); ``name_or_path`` as a folder; a Hub id in the local Hugging Face cache
    (``snapshot_download(local_files_only=True)``: the ref ``main`` of ``models--org--name``).
    Nothing is downloaded. The error lists what was tried.
    """
    name = str(name_or_path)
    tried: list[str] = []
    candidates = [Path(name)]
    if root is not None and not Path(name).is_absolute():
        candidates.insert(0, Path(root) / name)
    for folder in candidates:
        if folder.is_dir():
            return ModelSource(folder)
        tried.append(f"folder {folder}")
    if _HUB_ID.match(name) and not name.startswith("."):
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            return ModelSource(Path(snapshot), name)
        tried.append(f"Hub id {name!r} in the local cache {hub_cache_dir()} (nothing is downloaded)")
    raise ModelError(f"model {name!r} not found: tried {'; '.join(tried)}. Give a model folder, or "
                     "download the Hub model into the cache first (huggingface-cli download ID)")


def _cached_snapshot(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError) as exc:
        log.debug("%s is not in the local HF cache: %s", repo_id, exc)
        return None


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """bf16 on GPUs; fp32 on CPUs, where bf16 matmuls are slow and fp16 is unsupported."""
    if dtype in (None, "auto"):
        return "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return dtype


def detect_family(path: str | Path) -> str:
    """The ``model_type`` of a model folder, checked against the families VisRL supports."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not folder.is_dir():
        raise ModelError(f"model folder {folder} does not exist")
    if not config_file.is_file():
        hint = " (it is a LoRA adapter: pass it as the adapter of its base)" if is_adapter(folder) else ""
        raise ModelError(f"{folder} is not a model folder: it has no config.json{hint}")
    try:
        family = json.loads(config_file.read_text(encoding="utf-8")).get("model_type", "")
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {config_file}: {exc}") from exc
    if family not in FAMILIES:
        raise ModelError(f"{folder} is a {family or 'unknown'!r} model; VisRL supports "
                         f"{', '.join(sorted(FAMILIES))}")
    return family


def split_adapter(path: str | Path, adapter: str | Path | None) -> tuple[str | Path, Path | None]:
    """(base, adapter): a LoRA folder given as the model loads on the base it records (VisRL's
    record first, then peft's ``base_model_name_or_path``, which may be a Hub id)."""
    folder = Path(path)
    if adapter is None and folder.is_dir() and not (folder / "config.json").is_file() and is_adapter(folder):
        base = (read_record(folder).get("base") or {}).get("name") or _peft_base(folder)
        if not base:
            raise ModelError(f"{folder} is a LoRA adapter without base_model_name_or_path; "
                             "pass its base as the model and it as the adapter")
        return (Path(base) if Path(base).is_dir() else base), folder
    return (folder if folder.is_dir() else path), Path(adapter) if adapter else None


def _peft_base(adapter_dir: Path) -> str | None:
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return config.get("base_model_name_or_path") or None


def load_model(path: str | Path, adapter: str | Path | None = None, dtype: str = "auto",
               device: str = "auto", overrides: dict[str, Any] | None = None) -> LoadedModel:
    """Load the model ``path`` names (a folder or a cached Hub id; plus an optional PEFT adapter,
    which must record this base or none) for inference.

    The contract is the checkpoint's (adapter over base over the family's box format) with
    ``overrides`` (config keys; None values ignored) on top; its pixel budget is set on the
    processor and the contract is bound to the processor's resize (``LoadedModel.contract``).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    base_name, adapter_dir = split_adapter(path, adapter)
    source = locate_model(base_name)
    base = source.path
    family = detect_family(base)
    if adapter_dir is not None:
        check_adapter_base(adapter_dir, source)
    contract = read_contract(base, adapter_dir, FAMILIES[family].box_format).override(**(overrides or {}))
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=getattr(torch, dtype))
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the model in {base}: {exc}") from exc
    if adapter_dir is not None:
        model = _with_adapter(model, base, adapter_dir)
    model.to(device).eval()
    processor = load_processor(base, family)
    contract.apply_budget(processor)
    return LoadedModel(model=model, processor=processor, path=str(base),
                       adapter=str(adapter_dir) if adapter_dir else None, family=family,
                       contract=contract.bound_to(processor), device=device, dtype=dtype, hub_id=source.hub_id)


# ---------------------------------------------------------------------- identities

def model_identity(source: ModelSource) -> dict[str, Any]:
    """What names a base model for an adapter's record: the folder, the Hub id, VisRL's
    ``model_id`` (minted when VisRL writes a model folder: merges, merged bases, tiny models), the
    SHA-256 of its ``config.json``, the Hub snapshot revision (None for a plain folder) and the
    fingerprint of its weights (:func:`visrl.model_files.weights_fingerprint`)."""
    config = source.path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
    return {"name": source.label, "path": str(source.path.resolve()), "hub_id": source.hub_id,
            "model_id": read_record(source.path).get("model_id"), "config_sha256": digest,
            "revision": hub_revision(source.path), "weights_fingerprint": weights_fingerprint(source.path)}


def same_model(recorded: dict[str, Any], actual: dict[str, Any]) -> bool:
    """True when two identities name one model: one VisRL ``model_id`` (a VisRL-written model is
    never the plain base it came from), else one folder, one Hub id, or (plain folders, e.g. a
    copy of a base) one ``config.json``."""
    if recorded.get("model_id") or actual.get("model_id"):
        return recorded.get("model_id") == actual.get("model_id")
    if recorded.get("path") and recorded.get("path") == actual.get("path"):
        return True
    if recorded.get("hub_id") and recorded.get("hub_id") == actual.get("hub_id"):
        return True
    return bool(recorded.get("config_sha256")) and recorded.get("config_sha256") == actual.get("config_sha256")


def recorded_base(adapter_dir: Path) -> dict[str, Any] | None:
    """The identity of the base an adapter was trained on: VisRL's record, else peft's
    ``base_model_name_or_path`` located now (None when it names nothing to be found here)."""
    record = read_record(adapter_dir).get("base")
    if isinstance(record, dict) and record:
        return record
    name = _peft_base(adapter_dir)
    if not name:
        return None
    try:
        return model_identity(locate_model(name))
    except ModelError:
        log.warning("the base %s recorded by adapter %s is not here; cannot check it", name, adapter_dir)
        return None


def check_adapter_base(adapter_dir: Path, base: ModelSource) -> None:
    """Refuse an adapter whose recorded base is another model than ``base`` (naming both)."""
    recorded = recorded_base(adapter_dir)
    if recorded is None:
        return
    actual = model_identity(base)
    if not same_model(recorded, actual):
        raise ModelError(f"the adapter {adapter_dir} was trained on {recorded.get('name') or recorded.get('path')}, "
                         f"not on {actual['name']}: load it on its own base (a later stage's adapter "
                         "applies to the merged model of the stage before, e.g. OUTPUT/base)")
    check_base_weights(adapter_dir, recorded, actual)


def check_base_weights(adapter_dir: Path, recorded: dict[str, Any], actual: dict[str, Any]) -> None:
    """Refuse an adapter whose base, though the same name, now holds other weights than it was
    trained on (a new Hub revision, weights swapped in the folder), naming both versions. A
    record without a fingerprint (adapters trained before VisRL recorded one) is accepted with a
    warning naming the adapter: refusing would break every such adapter."""
    trained, now = recorded.get("weights_fingerprint"), actual.get("weights_fingerprint")
    if not trained:
        log.warning("the adapter %s records no weights fingerprint of its base %s, so it cannot be "
                    "checked against the weights there now (revision %s, weights %s); retrain it to bind it",
                    adapter_dir, actual["name"], short(actual.get("revision")), short(now))
        return
    if trained != now:
        raise ModelError(
            f"the adapter {adapter_dir} was trained on {recorded.get('name')} at revision "
            f"{short(recorded.get('revision'))} with weights {short(trained)}, but {actual['name']} now "
            f"holds revision {short(actual.get('revision'))} with weights {short(now)}: load it on the "
            "weights it was trained on (pin that revision in the cache), or train it again on these")


def _with_adapter(model: Any, base: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    if not is_adapter(adapter_dir):
        raise ModelError(f"{adapter_dir} is not a LoRA adapter: it has no {ADAPTER_CONFIG}")
    try:
        return PeftModel.from_pretrained(model, str(adapter_dir))
    except (ValueError, RuntimeError, KeyError) as exc:  # shape mismatch, missing target modules
        raise ModelError(f"the adapter {adapter_dir} does not fit the model {base}: "
                         f"{str(exc).splitlines()[0][:300]}") from exc


def checkpoint_contract(name_or_path: str | Path, adapter: str | Path | None = None,
                        root: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TwoStepContract:
    """A checkpoint's contract without loading its weights (an adapter folder given as the model
    counts as that adapter on its recorded base), with ``overrides`` on top, bound to the base's
    image processor (the frame of ``qwen2_5`` boxes). For exports and anything that writes or
    reads a model's boxes without running it."""
    folder = Path(root, name_or_path) if root is not None and Path(root, name_or_path).is_dir() else Path(name_or_path)
    base_name, adapter_dir = split_adapter(folder if folder.is_dir() else name_or_path,
                                           Path(adapter) if adapter else None)
    base = locate_model(base_name, root).path
    family = detect_family(base)
    contract = read_contract(base, adapter_dir, FAMILIES[family].box_format).override(**(overrides or {}))
    image_processor = pil_image_processor(base)
    contract.apply_budget(image_processor)
    return contract.bound_to(image_processor)


def box_format_of(base: Path, family: str, adapter_dir: Path | None = None) -> str:
    """The adapter's pinned format, else the base folder's, else the family default."""
    return read_contract(base, adapter_dir, FAMILIES[family].box_format).box_format


def write_model_info(folder: str | Path, contract: TwoStepContract | str,
                     base: str | Path | ModelSource | None = None) -> None:
    """Record a folder's two-step contract (a bare string: the box format) in ``visrl_model.json``.

    ``base``: the model an adapter in ``folder`` was trained on (checked at load). A folder holding
    a model (``config.json``) gets a fresh ``model_id``: it is a new model, even when its
    config matches the base it came from.
    """
    if isinstance(contract, str):
        contract = TwoStepContract(box_format=contract)
    extra: dict[str, Any] = {}
    if base is not None:
        source = base if isinstance(base, ModelSource) else locate_model(base)
        extra["base"] = model_identity(source)
        _point_peft_at(Path(folder), source.label)
    if Path(folder, "config.json").is_file():
        extra["model_id"] = uuid.uuid4().hex
    write_contract(folder, contract, **extra)


def _point_peft_at(adapter_dir: Path, base: str) -> None:
    """Make peft's ``base_model_name_or_path`` name the model the adapter really applies to.

    Training merges a previous stage's adapter into the base in memory, so peft records the raw
    base although the adapter belongs to the merged one (OUTPUT/base); other tools (peft, vLLM's
    LoRA loading) read this field."""
    config_file = adapter_dir / ADAPTER_CONFIG
    if not config_file.is_file():
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("base_model_name_or_path") != base:
        config["base_model_name_or_path"] = base
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_model_info(source: str | Path, dest: str | Path, contract: TwoStepContract | None = None) -> None:
    """Record the contract (default: ``source``'s) in a model folder derived from ``source``
    (a merge, a merged base): the derived model gets its own ``model_id``, so an adapter trained on
    it is refused on ``source`` and the other way round."""
    if contract is None:
        folder = locate_model(source).path
        contract = read_contract(folder, None, FAMILIES[detect_family(folder)].box_format)
    write_contract(dest, contract, model_id=uuid.uuid4().hex)


def load_processor(path: str | Path, family: str | None = None) -> Any:
    """The family's processor; image-only when the full one cannot be built (no torchvision)."""
    from transformers import AutoProcessor, AutoTokenizer

    family = family or detect_family(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(str(path))
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        log.debug("AutoProcessor failed for %s (%s); building an image-only processor", path, exc)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if not tokenizer.chat_template:  # Hub folders may keep it only beside the processor
        tokenizer.chat_template = folder_chat_template(path)
    return image_only_processor(family, tokenizer, pil_image_processor(path))


def pil_image_processor(path: str | Path) -> Any:
    """The Qwen image processor with the PIL backend (the fast one needs torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(str(path))


_IMAGE_ONLY: dict[str, type] = {}


def image_only_processor(family: str, tokenizer: Any, image_processor: Any) -> Any:
    """An instance of the family's processor without its video part."""
    if family not in _IMAGE_ONLY:
        import transformers

        parent = getattr(transformers, FAMILIES[family].processor_class)

        def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: str | None = None, **kwargs: Any) -> None:
            self.video_processor = None
            parent.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

        # ProcessorMixin reads a processor's parts from ``attributes`` and its __init__ signature.
        _IMAGE_ONLY[family] = type(f"ImageOnly{parent.__name__}", (parent,),
                                   {"attributes": ["image_processor", "tokenizer"], "__init__": __init__,
                                    "__module__": __name__})
    return _IMAGE_ONLY[family](image_processor=image_processor, tokenizer=tokenizer,
                               chat_template=tokenizer.chat_template)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def describe(loaded: LoadedModel) -> dict[str, Any]:
    """What ``visrl models info`` prints."""
    image = loaded.processor.image_processor
    low, high = processor_pixels(image)
    return {"path": loaded.path, "hub_id": loaded.hub_id, "adapter": loaded.adapter, "family": loaded.family,
            "box_format": loaded.box_format, "crop_margin": loaded.contract.crop_margin,
            "parameters": count_parameters(loaded.model), "device": loaded.device, "dtype": loaded.dtype,
            "min_pixels": low, "max_pixels": high}
