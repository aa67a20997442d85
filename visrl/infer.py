"""``visrl infer``: the two steps on one image, with the settings of an :class:`InferConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.contract_fields import ContractFields
from visrl.errors import ConfigError
from visrl.images import FILE_MAX_PIXELS, open_bounded
from visrl.policy import check_range


@dataclass
class InferConfig(ContractFields):
    """Settings of ``visrl infer`` (configs/infer.yaml), the contract keys (:class:`ContractFields`)
    among them; command-line options override them."""

    model_name_or_path: str = field(metadata={"help": "Model folder (absolute, or relative to the workspace)."})
    adapter_name_or_path: str | None = field(default=None, metadata={"help": "Optional LoRA adapter folder."})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (temperature > 0)."})
    max_new_tokens: int = field(default=64, metadata={"help": "Per step; a Visual-CoT box is ~30 tokens."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda, cuda:1, ..."})

    def __post_init__(self) -> None:
        check_range("temperature", self.temperature, 0.0, 100.0)  # 0 = greedy; negative is a mistake
        check_range("top_p", self.top_p, 0.0, 1.0, low_open=True)
        if not self.max_new_tokens >= 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        self.check_contract()  # box_format, crop_margin, pixel budgets: named before a model loads


def run_infer(cfg: InferConfig, image_path: str | Path, question: str, crop_out: str | Path,
              workspace: str | Path | None = None) -> dict[str, Any]:
    """Box, crop (saved to ``crop_out``), answer for one image; the result as a JSON-ready dict.

    The image is read upright (:func:`visrl.images.upright`): ``image_size`` and ``box`` are of the
    photo as a viewer shows it. ``box`` is pixels of the original image, or None when the model's
    box text did not parse (the answer is then given on the whole image, which is what
    ``crop_out`` holds).
    """
    from visrl.models import load_model
    from visrl.policy import resolve_model_path
    from visrl.reasoning import Reasoner, Sampling
    from visrl.workspace import Workspace, resolve_root

    # Read (upright, within the import's pixel budget) before the model loads: a bad image fails in
    # milliseconds, and a phone photo is seen as its viewer shows it, like an imported one.
    image = open_bounded(Path(image_path), max_pixels=FILE_MAX_PIXELS, where=f"--image {image_path}")
    ws = Workspace(resolve_root(workspace))  # only to resolve models/...; nothing is created
    loaded = load_model(resolve_model_path(ws, cfg.model_name_or_path),
                        adapter=resolve_model_path(ws, cfg.adapter_name_or_path), dtype=cfg.dtype, device=cfg.device,
                        overrides=cfg.contract_overrides())
    reasoner = Reasoner(loaded)
    sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    result = reasoner.two_step([image], [question], sampling)[0][0]
    result.crop.save(crop_out)
    return {"model": loaded.path, "adapter": loaded.adapter, "box_format": reasoner.box_format,
            "image": str(image_path), "image_size": list(image.size), "question": question,
            "box_text": result.box_text,
            "box": [round(v, 1) for v in result.box.as_list()] if result.box is not None else None,
            "crop": str(crop_out), "crop_size": list(result.crop.size), "answer": result.answer,
            "timings": result.timings}
