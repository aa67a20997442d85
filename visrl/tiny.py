"""Tiny random-weight VLMs of real architectures, built offline.

Tests and the demo need a model without the Hugging Face hub. :func:`build_tiny_model` writes a
folder (weights, tokenizer, processor, chat template) that :func:`visrl.models.load_model` reads
back exactly like a real checkpoint, so every code path a 7B model takes is exercised.

Presets:
- ``test``: Qwen2-VL, text 128 wide x 2 layers, vision 64 wide x 2 blocks (~0.6M parameters):
  fast enough for unit tests of generation, SFT, DPO and merge.
- ``test-qwen3``: the same size in Qwen3-VL (vision position embeddings, deepstack).
- ``demo``: the demo model's Qwen3-VL shape (:class:`visrl.tiny_qwen3.TinyQwen3Spec`), random weights
  (the shipped, trained one lives in ``data/demo-model``).

The tokenizer is a byte-level BPE trained on the demo prompts; Qwen2's pre-tokenizer splits
digits, so box coordinates come out one token per digit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from visrl.errors import ConfigError

PRESETS = ("test", "test-qwen3", "demo")


def build_tiny_model(out_dir: str | Path, preset: str = "test", seed: int = 0) -> Path:
    """Write a randomly initialised tiny VLM of ``preset`` to ``out_dir`` and return the folder."""
    from visrl.models import write_model_info
    from visrl.tiny_qwen3 import TinyQwen3Spec, build_tiny_qwen3

    if preset not in PRESETS:
        raise ConfigError(f"unknown tiny-model preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "demo":
        out = build_tiny_qwen3(out_dir, TinyQwen3Spec(), seed=seed)
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


def _qwen2_image_processor() -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    # 56x56 .. 112x112 px: 4 to 16 visual tokens per image keeps the tiny model's sequences short.
    return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                    min_pixels=56 * 56, max_pixels=112 * 112)


def _trl_template(name: str) -> str:
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text(encoding="utf-8")
