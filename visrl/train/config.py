"""The training config: one dataclass for the four stages, keys named as in LLaMA-Factory.

``stage`` picks the method: ``sft`` (two-step conversations of items with a gt box), ``dpo``
(VisRL stage 1: preference on the box step), ``visrl`` (VisRL stage 2: 0.5·DPO(box) +
0.5·DPO(answer), each answer conditioned on its own crop), ``grpo`` (online RL on the box step:
sampled boxes rewarded by their IoU with the gt box, as Ground-R1 / VLM-R1 do, and/or by the
answer given on their crop). Paths that are
relative name folders of the workspace (``models/tiny-demo``); see :func:`resolve_path`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from visrl.contract_fields import ContractFields
from visrl.errors import ConfigError
from visrl.stages import TRAIN_STAGES, stage_named
from visrl.vocabulary import BOX_FORMATS, PAIR_STATUSES
from visrl.workspace import Workspace

log = logging.getLogger(__name__)

# Every projection of the language model's decoder layers, none of the vision tower or merger
# (``all-linear`` would adapt those too; see shared/PITFALLS.md). peft full-matches a string.
LANGUAGE_MODEL_TARGET = (
    r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)
# trl 1.16 DPOTrainer's loss_type values (its loss dispatch in trl/trainer/dpo_trainer.py); stage 2 computes its two DPO
# terms with the same trl code. LLaMA-Factory's orpo / simpo are reference-free losses of other
# trainers: DPOTrainer raises on them at the first step, so they are refused here, before loading.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# Regexes of the vision side's modules in the VLM families we load (transformers 5 naming):
# Qwen2/2.5/3-VL keep tower (blocks) and projector (merger, Qwen3's deepstack mergers) under
# ``visual``; LLaVA-style models use ``vision_tower`` + ``multi_modal_projector``; mllama
# ``vision_model``. ``patch_embed`` is a Conv3d that LoRA cannot wrap (LLaMA-Factory's conflict key).
VISION_TOWER_MODULES = (r"visual\.blocks", r"visual\.patch_embed", r"visual\.pos_embed", "vision_tower",
                        "vision_model")
PROJECTOR_MODULES = (r"visual\.merger", r"visual\.deepstack_merger_list", "multi_modal_projector")
LORA_CONFLICT_MODULES = ("patch_embed",)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig(ContractFields):
    """One training run. :func:`load_train_config` maps LLaMA-Factory keys and rejects unknown ones."""

    stage: str = field(metadata=_help(" | ".join(stage_named(name).title for name in TRAIN_STAGES)))
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
        "language_model (every decoder projection) | all (every linear layer but lm_head, as in "
        "LLaMA-Factory: the vision tower and projector only when their freeze_* key is false) | "
        "comma-separated module names | a regex"))
    freeze_vision_tower: bool = field(default=True, metadata=_help(
        "Keep the vision tower out of training: no LoRA on it (lora_target all or names), frozen in "
        "full fine-tuning. As LLaMA-Factory's key of the same name."))
    freeze_multi_modal_projector: bool = field(default=True, metadata=_help(
        "Keep the vision-to-text projector (Qwen's merger) out of training, like freeze_vision_tower."))
    split: str = field(default="train", metadata=_help("Item split for sft and grpo rows."))
    pair_status: list[str] = field(default_factory=lambda: ["accepted"], metadata=_help(
        f"Pair statuses trained on by dpo/visrl ({', '.join(PAIR_STATUSES)})."))
    # A run teaches the boxes and crops its recipe reads, whatever the starting checkpoint recorded:
    # so, unlike the other stages, box_format and crop_margin default to the contract's documented
    # defaults, not to None ("the checkpoint's"). The pixel budgets stay the mixin's (None).
    box_format: str = field(default="viscot", kw_only=True, metadata=_help(
        f"Box text format the run teaches ({', '.join(BOX_FORMATS)})."))
    crop_margin: float = field(default=0.0, kw_only=True, metadata=_help(
        "Widen each crop by this fraction of the box per side (0.1 = 10%)."))
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
    pref_loss: str = field(default="sigmoid", metadata=_help(
        f"DPO loss type (trl's loss_type): {', '.join(DPO_LOSSES)}."))
    pref_ftx: float = field(default=0.0, metadata=_help(
        "dpo, visrl: weight of an SFT term on the chosen completions added to the DPO loss "
        "(LLaMA-Factory's pref_ftx; trl's loss_type [pref_loss, sft]). It keeps the chosen text "
        "likely: plain DPO can push both completions down, which broke the demo's box format."))
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
    grpo_iou_reward: bool = field(default=True, metadata=_help(
        "grpo: reward the IoU of the sampled box with the item's annotated box. false: no box is "
        "read, so items without one become rows too and the answer reward (grpo_answer_reward: "
        "true, required then) is the judge: VisRL's setting, answer rewards instead of region labels."))
    assistant_only_loss: bool = field(default=True, metadata=_help(
        "sft: loss on the assistant turns (box and answer) only."))
    max_length: int | None = field(default=None, metadata=_help(
        "Token cap per sequence, image tokens included; null = no truncation. A row whose sequence "
        "is longer is refused before training, by name (cutting image tokens breaks the model's image "
        "features): two images at ~1280 visual tokens each need more than 2048."))
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
        if self.stage not in TRAIN_STAGES:
            raise ConfigError(f"stage must be one of {', '.join(TRAIN_STAGES)}, got {self.stage!r}")
        if self.finetuning_type not in ("lora", "full"):
            raise ConfigError(f"finetuning_type must be lora or full, got {self.finetuning_type!r}")
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
        if self.pref_ftx < 0:
            raise ConfigError(f"pref_ftx must be >= 0 (the SFT term's weight), got {self.pref_ftx}")
        if self.pref_ftx and self.pref_loss == "sft":
            raise ConfigError("pref_ftx adds an SFT term to a preference loss; pref_loss is already sft")
        if self.pref_loss not in DPO_LOSSES:
            hint = " (LLaMA-Factory's reference-free losses are not DPO)" if self.pref_loss in ("orpo", "simpo") else ""
            raise ConfigError(f"pref_loss {self.pref_loss!r} is not a loss trl's DPOTrainer has{hint}; "
                              f"use one of {', '.join(DPO_LOSSES)} (the paper: sigmoid)")
        if self.lr_scheduler_type not in SCHEDULERS:
            raise ConfigError(f"lr_scheduler_type must be one of {', '.join(SCHEDULERS)}, "
                              f"got {self.lr_scheduler_type!r}")
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
        for name in ("lora_alpha", "save_total_limit", "max_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("weight_decay", "crop_margin", "dataloader_num_workers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        # One 28x28 patch merge unit (Qwen-VL's factor) is the least an image can be.
        for name in ("image_min_pixels", "image_max_pixels", "full_max_pixels", "crop_min_pixels"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and value >= 28 * 28):
                raise ConfigError(f"{name} must be >= 784 (one 28x28 unit) or null, got {value!r}")
        self.check_contract()  # box format, min <= max, margin range: named here

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
        if self.stage == "grpo" and not (self.grpo_iou_reward or self.grpo_answer_reward):
            # The format reward alone pays for any parseable box: nothing about the task is learned.
            raise ConfigError("grpo_iou_reward and grpo_answer_reward are both false: grpo needs one "
                              "reward that reads the task; set grpo_answer_reward: true to reward "
                              "answers alone (no annotated boxes), or grpo_iou_reward: true")
        rows = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if self.stage == "grpo" and rows % self.num_generations:
            # trl generates whole groups per optimizer step; a partial group has no advantage.
            raise ConfigError(
                f"per_device_train_batch_size * gradient_accumulation_steps ({rows}) must be a multiple "
                f"of num_generations ({self.num_generations}) for stage grpo; e.g. set "
                f"per_device_train_batch_size: {self.num_generations}")

    @property
    def is_preference(self) -> bool:
        return stage_named(self.stage).preference

    def lora_targets(self) -> str | list[str]:
        """The peft ``target_modules`` value for :attr:`lora_target`."""
        if self.lora_target == "language_model":
            return LANGUAGE_MODEL_TARGET
        if self.lora_target == "all":
            return "all-linear"  # peft: every linear layer but the output head; lora_exclude() trims it
        if re.fullmatch(r"[\w.]+(\s*,\s*[\w.]+)*", self.lora_target):
            return [name.strip() for name in self.lora_target.split(",")]
        return self.lora_target

    def frozen_modules(self) -> str | None:
        """Regex (full match on a module or parameter name) of what the freeze_* keys keep frozen."""
        names: list[str] = []
        if self.freeze_vision_tower and self.freeze_multi_modal_projector:
            names.append("visual")  # all of Qwen's vision side, whatever else it grows
        if self.freeze_vision_tower:
            names += VISION_TOWER_MODULES
        if self.freeze_multi_modal_projector:
            names += PROJECTOR_MODULES
        return _under_any(names) if names else None

    def lora_exclude(self) -> str:
        """The peft ``exclude_modules`` regex: the frozen vision side, and modules LoRA cannot wrap.

        LLaMA-Factory's ``lora_target: all`` is every linear layer except ``lm_head``, minus the
        vision tower and projector while they are frozen (its default); peft's ``all-linear``
        alone adapts both (shared/PITFALLS.md). Qwen2.5-VL's vision MLP reuses the names
        gate_proj/up_proj/down_proj, so named targets get the same exclusion.
        """
        names = list(LORA_CONFLICT_MODULES)
        if self.freeze_vision_tower and self.freeze_multi_modal_projector:
            names.append("visual")
        names += VISION_TOWER_MODULES if self.freeze_vision_tower else ()
        names += PROJECTOR_MODULES if self.freeze_multi_modal_projector else ()
        return _under_any(names)


def _under_any(names: list[str]) -> str:
    """A regex matching a dotted name that is, or lies under, one of ``names`` (regex parts)."""
    return rf"(.*\.)?({'|'.join(names)})(\..*)?"


def _resume_value(value: Any) -> str | bool:
    """``auto``, ``false`` or a path; YAML ``no``/``false``/``null`` all mean false."""
    if value in (None, False, "false", "False", "no", "none", ""):
        return False
    if value is True or value == "true":
        return "auto"
    return str(value)


def resolve_path(root: Path, path: str | None) -> str | None:
    """A relative path names a folder of the workspace when one is there, else the CWD's
    (:meth:`visrl.workspace.Workspace.resolve`)."""
    return str(Workspace(root).resolve(path, search_cwd=True)) if path else path


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
    """Output folders that are relative always go inside the workspace (:meth:`Workspace.resolve`)."""
    return Workspace(root).resolve(path)


# Keys of LLaMA-Factory / the VisRL seed's training YAMLs that mean one of our fields.
# key -> (our field, value converter).
FOREIGN_ALIASES: dict[str, tuple[str, Any]] = {
    "cutoff_len": ("max_length", lambda v: v),  # token cap per sequence (LLaMA-Factory default 2048)
    "train_on_prompt": ("assistant_only_loss", lambda v: not v if isinstance(v, bool) else v),
}
# Keys of those YAMLs with no meaning here, and why; loading warns and drops them.
FOREIGN_IGNORED: dict[str, str] = {
    "do_train": "`visrl train` always trains",
    "do_eval": "held-out rows are evaluated every save_steps when val_size > 0",
    "template": "the chat template comes with the model's processor",
    "trust_remote_code": "models load with transformers' own classes; no remote code runs",
    "preprocessing_num_workers": "rows are built in the training process",
    "overwrite_cache": "rows are built from the store on each run; nothing is cached",
    "overwrite_output_dir": "a run resumes from output_dir (resume_from_checkpoint: auto; false starts over)",
    "plot_loss": "losses go to the store; `visrl-app` plots them",
    "ddp_timeout": "the Trainer's default collective timeout (1800 s) applies",
    "flash_attn": "attention is transformers' default (sdpa)",
    "max_samples": "every selected row is trained on; narrow the data with dataset / split / pair_status",
    "per_device_eval_batch_size": "evaluation uses per_device_train_batch_size",
    "eval_strategy": "held-out rows are evaluated every save_steps when val_size > 0",
    "eval_steps": "held-out rows are evaluated every save_steps when val_size > 0",
    "video_max_pixels": "VisRL trains on images only",
    "video_fps": "VisRL trains on images only",
}


def translate_foreign_keys(data: dict[str, Any], source: str = "config", cls: type = TrainConfig,
                           aliases: dict[str, tuple[str, Any]] | None = None,
                           ignored: dict[str, str] | None = None) -> dict[str, Any]:
    """``data`` with LLaMA-Factory / VisRL-seed keys mapped onto ``cls``'s; the meaningless ones
    dropped with one logged warning naming them. A key that is a field of ``cls`` is always ours;
    unknown keys stay for :func:`visrl.config.from_dict` to refuse by name. Tables default to
    the training ones (:data:`FOREIGN_ALIASES`, :data:`FOREIGN_IGNORED`)."""
    aliases = FOREIGN_ALIASES if aliases is None else aliases
    ignored_keys = FOREIGN_IGNORED if ignored is None else ignored
    ours = {f.name for f in fields(cls)}
    out = dict(data)
    for key, (target, convert) in aliases.items():
        if key not in out or key in ours:
            continue
        value = convert(out.pop(key))
        if target in out and out[target] != value:
            raise ConfigError(f"{source}: {key} ({value!r} as {target}) contradicts {target}: {out[target]!r}; "
                              f"keep one of them")
        out[target] = value
    dropped = sorted(k for k in out if k in ignored_keys and k not in ours)
    if dropped:
        log.warning("%s: ignoring key(s) with no meaning in visrl: %s", source,
                    "; ".join(f"{k} ({ignored_keys[k]})" for k in dropped))
        for key in dropped:
            del out[key]
    return out


def parse_train_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """A training recipe's mapping (ours, or LLaMA-Factory / VisRL-seed style; see
    :func:`translate_foreign_keys`) as the config; errors name ``source``."""
    from visrl.config import from_dict

    return from_dict(TrainConfig, translate_foreign_keys(data, source=source), source=source)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML, apply ``overrides`` and build the config (:func:`parse_train_config`)."""
    from visrl.config import read_yaml

    return parse_train_config({**read_yaml(path), **(overrides or {})}, source=str(path))
