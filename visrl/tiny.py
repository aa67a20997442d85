"""Tiny random-weight VLMs of real architectures, built offline.

Tests and the demo need a model without the Hugging Face hub. :func:`build_tiny_model` writes a
folder (weights, tokenizer, processor, chat template) that :func:`visrl.models.load_model` reads
back exactly like a real checkpoint, so every code path a 7B model takes is exercised.

Presets:
- ``test``: Qwen2-VL, text 128 wide x 2 layers, vision 64 wide x 2 blocks (~0.6M parameters):
  fast enough for unit tests of generation, SFT, DPO and merge.
- ``test-qwen3``: the same size in Qwen3-VL (vision position embeddings, deepstack).
- ``test-qwen2_5``: the same size in Qwen2.5-VL (windowed vision attention), with its processor
  files laid out as the Hub's Qwen2.5-VL repositories have them (:func:`save_hub_processor`);
  :func:`build_tiny_qwen2_5` builds any :class:`Qwen25Shape`, up to the real 7B's geometry.
- ``demo``: the demo model's Qwen3-VL shape (:class:`visrl.tiny_qwen3.TinyQwen3Spec`), random weights
  (the shipped, trained one lives in ``data/demo-model``).

The tokenizer is a byte-level BPE trained on the demo prompts; Qwen2's pre-tokenizer splits
digits, so box coordinates come out one token per digit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError

PRESETS = ("test", "test-qwen3", "test-qwen2_5", "demo")
# The transformers processor class each family's Hub repositories name.
HUB_PROCESSOR_CLASS = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                       "qwen3_vl": "Qwen3VLProcessor"}


@dataclass
class Qwen25Shape:
    """Sizes of a random Qwen2.5-VL. Defaults: the ``test`` size. The real 7B: text 3584 wide x 28
    layers (28 heads, 4 KV heads, MLP 18944, vocabulary 152064, untied), vision 1280 wide x 32
    blocks (16 heads, MLP 3420, full attention in blocks 7, 15, 23, 31, 112 px windows)."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 4  # head_dim = hidden / heads, a multiple of 16 (mrope sections 1:1.5:1.5)
    text_kv_heads: int = 2
    text_intermediate: int = 256
    vocab_size: int | None = None  # None: the tokenizer's length
    tie_word_embeddings: bool = True
    vision_hidden: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 128
    window_size: int = 112  # px: windowed attention over 8x8 patches of 14 px
    fullatt_block_indexes: tuple[int, ...] = (1,)
    min_pixels: int = 56 * 56  # processor budget, px area (the 7B ships 3136 .. 12845056)
    max_pixels: int = 112 * 112


def build_tiny_model(out_dir: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """Write a randomly initialised tiny VLM of ``preset`` to ``out_dir`` and return the folder."""
    from visrl.models import write_model_info
    from visrl.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3

    if preset not in PRESETS:
        raise ConfigError(f"unknown tiny-model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "demo":
        out = build_tiny_qwen3(out_dir, TinyQwen3Spec(), seed=seed)
    elif preset == "test-qwen2_5":
        out = build_tiny_qwen2_5(out_dir, Qwen25Shape(), seed=seed)
    elif preset == "test-qwen3":
        spec = TinyQwen3Spec(text_hidden=128, text_layers=2, text_heads=4, text_kv_heads=2,
                             text_intermediate=256, vision_hidden=64, vision_depth=2, vision_heads=2,
                             vision_intermediate=128)
        out = build_tiny_qwen3(out_dir, spec, seed=seed)
    else:
        out = _build_tiny_qwen2(Path(out_dir), seed)
    # Tiny models learn the demo data's Visual-CoT boxes, whatever their family's native form.
    write_model_info(out, "viscot")
    return Path(out)


def _build_tiny_qwen2(out: Path, seed: int) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from visrl.models import image_only_processor
    from visrl.tiny_qwen3 import SPECIAL_TOKENS, build_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = _trl_template("qwen2_5_vl")  # Qwen2-VL's template, as trl ships it
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = 32  # hidden 128 / 4 heads; mrope sections (t, h, w) sum to head_dim / 2
    text = {
        "vocab_size": len(tokenizer), "hidden_size": 128, "intermediate_size": 256,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 4, 4]},
        "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    assert sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    vision = {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    processor = image_only_processor("qwen2_vl", tokenizer, _qwen2_image_processor())
    processor.save_pretrained(str(out))
    return out


def build_tiny_qwen2_5(out_dir: str | Path, shape: Qwen25Shape, seed: int = 0, device: str = "cpu",
                       dtype: str = "float32") -> Path:
    """Write a random Qwen2.5-VL of ``shape`` with processor files as the Hub lays them out.
    ``device`` / ``dtype``: where the weights are initialised (a 7B shape takes minutes and 32 GB
    in float32 on a CPU, seconds in bfloat16 on a GPU)."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from visrl.tiny_qwen3 import SPECIAL_TOKENS, build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = _trl_template("qwen2_5_vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = shape.text_hidden // shape.text_heads
    if head_dim % 16:
        raise ConfigError(f"text_hidden / text_heads must be a multiple of 16, got {head_dim}")
    text = {
        "vocab_size": shape.vocab_size or len(tokenizer), "hidden_size": shape.text_hidden,
        "intermediate_size": shape.text_intermediate, "num_hidden_layers": shape.text_layers,
        "num_attention_heads": shape.text_heads, "num_key_value_heads": shape.text_kv_heads,
        "max_position_embeddings": 32768, "tie_word_embeddings": shape.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                            "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
        "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {"depth": shape.vision_depth, "hidden_size": shape.vision_hidden, "num_heads": shape.vision_heads,
              "intermediate_size": shape.vision_intermediate, "out_hidden_size": shape.text_hidden,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3,
              "window_size": shape.window_size, "fullatt_block_indexes": list(shape.fullatt_block_indexes),
              "tokens_per_second": 2}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"],
                              tie_word_embeddings=shape.tie_word_embeddings)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                               min_pixels=shape.min_pixels, max_pixels=shape.max_pixels)
    save_hub_processor(out, "qwen2_5_vl", tokenizer, image_processor)
    return out


def save_hub_processor(out: str | Path, family: str, tokenizer: Any, image_processor: Any) -> None:
    """Write a processor into the model folder ``out`` as the Hub's Qwen-VL repositories lay it out:
    ``preprocessor_config.json`` naming the stock processor class, the tokenizer's files,
    ``chat_template.json`` (and, for Qwen3-VL, ``video_preprocessor_config.json``); no processor
    file of VisRL's own (``processor_config.json`` naming an image-only class) is left behind."""
    out = Path(out)
    processor_class = HUB_PROCESSOR_CLASS[family]
    for name in ("processor_config.json", "processor_class.json", "tokenizer_config.json"):
        (out / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(str(out))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    tokenizer_config.pop("processor_class", None)  # a tokenizer loaded from VisRL's folder names its class
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    config = {**image_processor.to_dict(), "image_processor_type": "Qwen2VLImageProcessor",
              "processor_class": processor_class}
    _write_json(out / "preprocessor_config.json", config)
    _write_json(out / "chat_template.json", {"chat_template": tokenizer.chat_template})
    if family == "qwen3_vl":
        keep = ("size", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
        _write_json(out / "video_preprocessor_config.json", {
            **{k: config[k] for k in keep if k in config}, "processor_class": processor_class,
            "video_processor_type": "Qwen3VLVideoProcessor"})


def to_hub_layout(folder: str | Path) -> Path:
    """Rewrite a tiny model folder's processor files (VisRL's image-only class) in the Hub's layout."""
    from visrl.models import detect_family, load_processor

    family = detect_family(folder)
    processor = load_processor(folder, family)
    save_hub_processor(folder, family, processor.tokenizer, processor.image_processor)
    return Path(folder)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _qwen2_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 56x56 .. 112x112 px: 4 to 16 visual tokens per image keeps the tiny model's sequences short.
    return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                    min_pixels=56 * 56, max_pixels=112 * 112)


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
