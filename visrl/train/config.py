"""The training config: one dataclass for the four stages, keys named as in LLaMA-Factory.

``stage`` picks the method: ``sft`` (two-step conversations of items with a gt box), ``dpo``
(VisRL stage 1: preference on the box step), ``visrl`` (VisRL stage 2: 0.5·DPO(box) +
0.5·DPO(answer), each answer conditioned on its own crop), ``grpo`` (online RL on the box step:
sampled boxes rewarded by their IoU with the gt box, as Ground-R1 / VLM-R1 do). Paths that are
relative name folders of the workspace (``models/tiny-demo``); see :func:`resolve_path`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError

STAGES = ("sft", "dpo", "visrl", "grpo")
# Every projection of the language model's decoder layers, none of the vision tower or merger
# (``all-linear`` would adapt those too; see shared/PITFALLS.md). peft full-matches a string.
LANGUAGE_MODEL_TARGET = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
BOX_FORMATS = ("viscot", "qwen2", "qwen2_5", "qwen3", "normalized")
PAIR_STATUSES = ("pending", "accepted", "rejected")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """One training run. Unknown YAML keys are rejected by :func:`visrl.config.load_config`."""

    stage: str = field(metadata=_help(
        "sft | dpo (VisRL stage 1, box step) | visrl (stage 2, box + answer) | "
        "grpo (online RL on the box step, IoU reward)"))
    model_name_or_path: str = field(metadata=_help("Base model folder (relative: inside the workspace)."))
    output_dir: str = field(metadata=_help("Where checkpoints and the final adapter/model go."))
    dataset: str = field(default="", metadata=_help(
        "Store dataset name, or a folder exported with `visrl export --format trl`; empty = all datasets."))
    adapter_name_or_path: str | None = field(default=None, metadata=_help(
        "Adapter of the previous stage; merged into the base before a new LoRA is trained "
        "(the merged base is saved beside the result so the checkpoint loads)."))
    finetuning_type: str = field(default="lora", metadata=_help("lora | full"))
    lora_rank: int = field(default=8, metadata=_help("LoRA rank r."))
    lora_alpha: int | None = field(default=None, metadata=_help("LoRA alpha; default 2 * lora_rank."))
    lora_dropout: float = field(default=0.0, metadata=_help("Dropout on the LoRA input, 0-1."))
    lora_target: str = field(default="language_model", metadata=_help(
        "language_model (every decoder projection, not the vision tower) | all (all-linear) | "
        "comma-separated module names | a regex"))
    split: str = field(default="train", metadata=_help("Item split for sft and grpo rows."))
    pair_status: list[str] = field(default_factory=lambda: ["accepted"], metadata=_help(
        "Pair statuses trained on by dpo/visrl (pending, accepted, rejected)."))
    box_format: str = field(default="viscot", metadata=_help("How boxes are written in prompts."))
    crop_margin: float = field(default=0.0, metadata=_help("Extra margin around a crop, fraction of its size."))
    image_max_pixels: int | None = field(default=None, metadata=_help(
        "Cap on pixels per image fed to the model (e.g. 262144 = 512x512); null = processor's."))
    val_size: float = field(default=0.0, metadata=_help(
        "Held-out rows for evaluation: a fraction (<1) or a count (>=1); 0 = none."))
    per_device_train_batch_size: int = field(default=1, metadata=_help(
        "Rows per device per step (grpo: completions, i.e. prompts x num_generations)."))
    gradient_accumulation_steps: int = field(default=1, metadata=_help("Steps per optimizer update."))
    learning_rate: float = field(default=5e-6, metadata=_help("Peak learning rate."))
    num_train_epochs: float = field(default=1.0, metadata=_help("Epochs (ignored when max_steps > 0)."))
    max_steps: int = field(default=-1, metadata=_help("Optimizer steps; -1 = from num_train_epochs."))
    lr_scheduler_type: str = field(default="cosine", metadata=_help("transformers scheduler name."))
    warmup_ratio: float = field(default=0.0, metadata=_help("Fraction of steps warming up, 0-1."))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay."))
    logging_steps: int = field(default=1, metadata=_help("Log (and report to the store) every N steps."))
    save_steps: int = field(default=500, metadata=_help("Save a checkpoint every N steps."))
    save_total_limit: int | None = field(default=2, metadata=_help("Keep at most N checkpoints."))
    pref_beta: float = field(default=0.1, metadata=_help("DPO beta (dpo, visrl)."))
    pref_loss: str = field(default="sigmoid", metadata=_help("DPO loss type (trl's loss_type)."))
    box_weight: float = field(default=0.5, metadata=_help("visrl: weight of DPO(box step)."))
    answer_weight: float = field(default=0.5, metadata=_help("visrl: weight of DPO(answer step)."))
    num_generations: int = field(default=8, metadata=_help(
        "grpo: boxes sampled per question (the group whose rewards are compared); "
        "per_device_train_batch_size * gradient_accumulation_steps must be a multiple of it."))
    max_completion_length: int = field(default=64, metadata=_help(
        "grpo: token cap of a sampled box step (a box text is ~20-30 tokens), and of the answer "
        "step when grpo_answer_reward is on."))
    temperature: float = field(default=1.0, metadata=_help("grpo: sampling temperature of the box step."))
    grpo_beta: float = field(default=0.04, metadata=_help(
        "grpo: KL coefficient to the reference (the adapter-disabled policy with LoRA); "
        "0 = no KL term and no reference forward pass."))
    grpo_answer_reward: bool = field(default=False, metadata=_help(
        "grpo: also reward the answer a greedy second step gives on the sampled box's crop "
        "(rule judge, 0-1); costs one extra generation per completion."))
    assistant_only_loss: bool = field(default=True, metadata=_help(
        "sft: loss on the assistant turns (box and answer) only."))
    max_length: int | None = field(default=None, metadata=_help(
        "Token cap per sequence; null = no truncation (never cut image tokens)."))
    bf16: bool = field(default=True, metadata=_help("bf16 mixed precision (forced off without a GPU)."))
    gradient_checkpointing: bool = field(default=True, metadata=_help(
        "Trade compute for memory (forced off without a GPU)."))
    seed: int = field(default=42, metadata=_help("Random seed."))
    resume_from_checkpoint: str | bool | None = field(default="auto", metadata=_help(
        "auto (the last checkpoint in output_dir, if any) | a checkpoint folder | false"))
    report_to: str = field(default="none", metadata=_help("none | tensorboard | wandb ..."))
    dataloader_num_workers: int = field(default=0, metadata=_help("Data loading processes."))
    deepspeed: str | None = field(default=None, metadata=_help("DeepSpeed JSON config (multi-GPU)."))

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.finetuning_type not in ("lora", "full"):
            raise ConfigError(f"finetuning_type must be lora or full, got {self.finetuning_type!r}")
        if self.box_format not in BOX_FORMATS:
            raise ConfigError(f"box_format must be one of {', '.join(BOX_FORMATS)}, got {self.box_format!r}")
        if isinstance(self.pair_status, str):
            self.pair_status = [self.pair_status]
        bad = [s for s in self.pair_status if s not in PAIR_STATUSES]
        if bad or not self.pair_status:
            raise ConfigError(f"pair_status must be a non-empty list of {', '.join(PAIR_STATUSES)}, "
                              f"got {self.pair_status!r}")
        self._check_positive()
        self._check_grpo()
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"max_steps must be -1 (use epochs) or > 0, got {self.max_steps}")
        if self.val_size < 0:
            raise ConfigError(f"val_size must be >= 0, got {self.val_size}")
        if self.box_weight < 0 or self.answer_weight < 0 or self.box_weight + self.answer_weight == 0:
            raise ConfigError(f"box_weight and answer_weight must be >= 0 and not both 0, "
                              f"got {self.box_weight} and {self.answer_weight}")
        if self.lora_target not in ("language_model", "all"):
            try:
                re.compile(self.lora_target)
            except re.error as exc:
                raise ConfigError(f"lora_target {self.lora_target!r} is not a valid regex: {exc}") from None
        self.resume_from_checkpoint = _resume_value(self.resume_from_checkpoint)

    def _check_positive(self) -> None:
        for name in ("lora_rank", "per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "pref_beta", "num_train_epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    def _check_grpo(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(f"num_generations must be >= 2 (GRPO compares rewards within a group), "
                              f"got {self.num_generations}")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (GRPO samples), got {self.temperature}")
        if self.grpo_beta < 0:
            raise ConfigError(f"grpo_beta must be >= 0, got {self.grpo_beta}")
        rows = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.stage == "grpo" and rows % self.num_generations:
            # trl generates whole groups per optimizer step; a partial group has no advantage.
            raise ConfigError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({rows}) must be a multiple "
                f"of num_generations ({self.num_generations}) for stage grpo; e.g. set "
                f"per_device_train_batch_size: {self.num_generations}")

    @property
    def is_preference(self) -> bool:
        return self.stage in ("dpo", "visrl")

    def lora_targets(self) -> str | list[str]:
        """The peft ``target_modules`` value for :attr:`lora_target`."""
        if self.lora_target == "language_model":
            return LANGUAGE_MODEL_TARGET
        if self.lora_target == "all":
            return "all-linear"
        if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", self.lora_target):
            return [name.strip() for name in self.lora_target.split(",")]
        return self.lora_target


def _resume_value(value: Any) -> str | bool:
    """``auto``, ``false`` or a path; YAML ``no``/``false``/``null`` all mean false."""
    if value in (None, False, "false", "False", "no", "none", ""):
        return False
    if value is True or value == "true":
        return "auto"
    return str(value)


def resolve_path(root: Path, path: str | None) -> str | None:
    """A relative path names a folder of the workspace when one is there, else the CWD's."""
    if not path or Path(path).is_absolute():
        return path
    in_ws = root / path
    return str(in_ws) if in_ws.exists() or not Path(path).exists() else str(Path(path).resolve())


MERGED_BASE_DIR = "base"  # train/run.py writes base + previous adapter here, beside the new adapter


def merged_base_dir(output_dir: str | Path) -> Path:
    """Where a run that folded ``adapter_name_or_path`` in saves that merged base (its new adapter's base)."""
    return Path(output_dir) / MERGED_BASE_DIR


def result_base(cfg: TrainConfig) -> str:
    """The model a finished LoRA run's ``output_dir`` applies to, as the config names paths.

    ``model_name_or_path`` itself, or :func:`merged_base_dir` when a previous stage's adapter was
    merged in first (the new adapter is relative to that merged model, not to the raw base).
    """
    if cfg.adapter_name_or_path:
        return merged_base_dir(cfg.output_dir).as_posix()
    return cfg.model_name_or_path


def resolve_output(root: Path, path: str) -> Path:
    """Output folders that are relative always go inside the workspace."""
    return Path(path) if Path(path).is_absolute() else root / path


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    from visrl.config import load_config

    return load_config(TrainConfig, path, overrides)
