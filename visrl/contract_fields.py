"""The contract keys a stage's config may set, declared once for every config that loads a model.

A checkpoint carries its :class:`visrl.contract.TwoStepContract` in ``visrl_model.json``; a config
key only overrides one field of it. :class:`ContractFields` holds those keys (the same YAML keys and
CLI flags in generate, eval, infer and train), their help, their check and the one
function that lays them over a contract (:meth:`ContractFields.over`).

Defaults. Every key defaults to None: "the checkpoint's" (its ``visrl_model.json``), falling back
to the documented defaults of :class:`visrl.contract.TwoStepContract` and the model family's box
format (:func:`visrl.contract.read_contract`). :class:`visrl.train.config.TrainConfig` alone sets
``box_format: viscot`` and ``crop_margin: 0.0`` as its defaults, so a run teaches the contract
its recipe reads, whatever the starting checkpoint recorded; it says so beside its fields.

This module imports no model code, so a config is cheap to build and check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from visrl.vocabulary import BOX_FORMATS

if TYPE_CHECKING:
    from visrl.contract import TwoStepContract

# The contract fields a config may override; the others (crop_min_size, resize_factor,
# prompt_layout) come from the checkpoint and the processor alone.
CONTRACT_KEYS: tuple[str, ...] = ("box_format", "crop_margin", "image_min_pixels", "image_max_pixels",
                                  "full_max_pixels", "crop_min_pixels")


@dataclass(kw_only=True)
class ContractFields:
    """Contract keys of a config (module doc). Keyword-only, so a config's own required fields
    keep their places; ``None`` = the checkpoint's value."""

    box_format: str | None = field(default=None, metadata={
        "help": f"Box text format ({', '.join(BOX_FORMATS)}); null = the checkpoint's (visrl_model.json, "
                "else its family's; the remote backend: the server's, else viscot)."})
    crop_margin: float | None = field(default=None, metadata={
        "help": "Widen each crop by this fraction of the box per side (0.1 = 10%); null = the checkpoint's "
                "(what it was trained on)."})
    image_min_pixels: int | None = field(default=None, metadata={
        "help": "Processor pixel budget per image, lower bound (area in px, at most image_max_pixels); "
                "null = the checkpoint's, else the processor's."})
    image_max_pixels: int | None = field(default=None, metadata={
        "help": "Processor pixel budget per image, upper bound (e.g. 1003520 = 1280 x 28 x 28, ~1280 visual "
                "tokens); null = the checkpoint's, else the processor's."})
    full_max_pixels: int | None = field(default=None, metadata={
        "help": "Shrink the full image to at most this many pixels before the processor (e.g. 401408 = "
                "512 x 28 x 28); null = the checkpoint's, else as is."})
    crop_min_pixels: int | None = field(default=None, metadata={
        "help": "Enlarge the crop to at least this many pixels before the processor, so it shows more detail "
                "(e.g. 200704 = 256 x 28 x 28); null = the checkpoint's, else as is."})

    def contract_overrides(self) -> dict[str, Any]:
        """The contract fields this config sets (None: the checkpoint's value stands)."""
        return {name: getattr(self, name) for name in CONTRACT_KEYS}

    def over(self, contract: TwoStepContract) -> TwoStepContract:
        """``contract`` (a checkpoint's or a server's) with this config's keys on top."""
        return contract.override(**self.contract_overrides())

    def check_contract(self) -> None:
        """ConfigError naming a bad value (unknown box format, margin out of range, min over max
        pixels) before any model loads."""
        from visrl.contract import TwoStepContract

        self.over(TwoStepContract())
