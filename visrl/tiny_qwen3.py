"""A small Qwen3-VL built locally: the architecture of the demo model that learns on a CPU.

Qwen2-VL's vision tower has no absolute position embedding, and a tiny one trained from scratch
cannot tell where things are (shared/PITFALLS.md, "Learning on this CPU"). Qwen3-VL's tower adds a
learned position embedding (``num_position_embeddings``, bilinearly interpolated to each image's
patch grid), so a few million parameters learn to point at objects in minutes.

Everything is built offline: a byte-level BPE tokenizer trained on the demo prompts (Qwen2's
pre-tokenizer splits every digit, so box coordinates are one token per digit), Qwen3-VL's image
processor (PIL backend, no torchvision), an image-only processor class (the video processor needs
torchvision, which this machine lacks), and trl's Qwen3-VL chat template.

:func:`build_tiny_qwen3` writes a folder that ``AutoModelForImageTextToText.from_pretrained`` and
:func:`load_processor` read back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.prompts import BOX_PROMPT, DIRECT_SUFFIX

SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|box_start|>", "<|box_end|>",
    "<think>", "</think>",
)
PROCESSOR_FILE = "processor_class.json"  # marks a folder whose processor is ImageOnlyQwen3VLProcessor


@dataclass
class TinyQwen3Spec:
    """Sizes of the model and the pixel budget of its images."""

    text_hidden: int = field(default=256, metadata={"help": "Text model width."})
    text_layers: int = field(default=4, metadata={"help": "Text decoder layers."})
    text_heads: int = field(default=4, metadata={"help": "Attention heads (head_dim = 64 -> mrope [16, 8, 8])."})
    text_kv_heads: int = field(default=2, metadata={"help": "Key/value heads."})
    text_intermediate: int = field(default=512, metadata={"help": "Text MLP width."})
    vision_hidden: int = field(default=128, metadata={"help": "Vision tower width."})
    vision_depth: int = field(default=4, metadata={"help": "Vision tower blocks."})
    vision_heads: int = field(default=4, metadata={"help": "Vision attention heads."})
    vision_intermediate: int = field(default=256, metadata={"help": "Vision MLP width."})
    num_position_embeddings: int = field(default=64, metadata={
        "help": "Learned vision positions (a square grid, 8x8), interpolated to each image."})
    vocab_size: int = field(default=400, metadata={"help": "BPE vocabulary size before special tokens."})
    min_pixels: int = field(default=128 * 96, metadata={
        "help": "Smallest image the processor feeds (crops are enlarged to about this)."})
    max_pixels: int = field(default=128 * 96, metadata={
        "help": "Largest image the processor feeds (448x336 scenes shrink to 128x96: 12 tokens)."})


def _corpus() -> list[str]:
    """Text the tokenizer is trained on: the demo prompts, answers and box texts."""
    from visrl.synthetic import (
        COLOURS,
        DOT_COLOURS,
        DOT_QUESTION_TEMPLATES,
        PATTERN_QUESTION_TEMPLATES,
        PATTERNS,
        QUESTION_TEMPLATES,
        SHAPES,
    )

    lines = [BOX_PROMPT, DIRECT_SUFFIX, "user assistant system You are a helpful assistant."]
    for template in (*QUESTION_TEMPLATES, *DOT_QUESTION_TEMPLATES, *PATTERN_QUESTION_TEMPLATES):
        for colour in COLOURS:
            for shape in SHAPES:
                lines.append(template.format(colour=colour, shape=shape))
    lines += [" ".join(DOT_COLOURS), " ".join(PATTERNS), " ".join(str(d) for d in range(10)),
              "[0.123, 0.456, 0.789, 0.901]", '{"bbox_2d": [12, 345, 678, 999]}', "(12,345),(678,999)"]
    # Answers repeated so that BPE merges each into a token or two (short, reliable answers).
    answers = [" ".join(DOT_COLOURS), " ".join(PATTERNS)] * 40
    return lines * 4 + answers


def build_tokenizer(vocab_size: int = 400) -> Any:
    """A Qwen2 tokenizer (byte-level BPE) trained on :func:`_corpus`, with the Qwen-VL special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = chat_template()
    return tokenizer


def chat_template() -> str:
    """trl's copy of the Qwen3-VL chat template (the model's own, shipped with trl)."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / "qwen3_vl.jinja").read_text(encoding="utf-8")


def image_only_processor_class() -> type:
    """Qwen3-VL's processor without the video part (whose processor needs torchvision)."""
    from transformers import Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        # ProcessorMixin reads the parts from these class attributes and the __init__ signature.
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor: Any = None, tokenizer: Any = None,
                     chat_template: str | None = None, **kwargs: Any) -> None:
            self.video_processor = None
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    return ImageOnlyQwen3VLProcessor


def build_processor(tokenizer: Any, min_pixels: int, max_pixels: int) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
        max_pixels=max_pixels, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=tokenizer.chat_template)


def build_config(spec: TinyQwen3Spec, tokenizer: Any) -> Any:
    from transformers import Qwen3VLConfig

    head_dim = spec.text_hidden // spec.text_heads
    quarter = head_dim // 8  # mrope sections (t, h, w) sum to head_dim / 2, in Qwen3-VL's 2:1:1
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = {
        "vocab_size": len(tokenizer), "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_intermediate, "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads, "num_key_value_heads": spec.text_kv_heads,
        "head_dim": head_dim, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                            "mrope_section": [2 * quarter, quarter, quarter], "mrope_interleaved": True},
        "bos_token_id": None, "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": spec.vision_depth, "hidden_size": spec.vision_hidden, "num_heads": spec.vision_heads,
        "intermediate_size": spec.vision_intermediate, "patch_size": 16, "spatial_merge_size": 2,
        "temporal_patch_size": 2, "out_hidden_size": spec.text_hidden,
        "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": [spec.vision_depth // 2 - 1] if spec.vision_depth > 1 else [],
    }
    return Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                         video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                         vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)


def build_tiny_qwen3(out_dir: str | Path, spec: TinyQwen3Spec | None = None, seed: int = 0) -> Path:
    """Write a randomly initialised small Qwen3-VL with its tokenizer and processor to ``out_dir``."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    spec = spec or TinyQwen3Spec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    processor = build_processor(tokenizer, spec.min_pixels, spec.max_pixels)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(build_config(spec, tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    save_processor(processor, out)
    return out


def save_processor(processor: Any, out: str | Path) -> None:
    processor.save_pretrained(str(out))
    Path(out, PROCESSOR_FILE).write_text(json.dumps({"processor_class": "ImageOnlyQwen3VLProcessor"}) + "\n",
                                         encoding="utf-8")


def load_processor(path: str | Path) -> Any:
    """The processor of a folder written by :func:`build_tiny_qwen3` (AutoProcessor would return the
    tokenizer alone for a custom processor class)."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path))
    template = tokenizer.chat_template or chat_template()
    return image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template)
