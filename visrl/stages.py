"""The pipeline's stages, one record each: the one place a stage is named and described.

A stage is a config dataclass (YAML keys = its fields) and a run function (house rule 4). Its
record says which command runs it (``kind``: ``visrl KIND CONFIG`` and ``visrl jobs start KIND
CONFIG``), how its recipe is read, what folder it writes, and whether it must run as one process.
The four training methods are one command, ``visrl train``, told apart by the recipe's ``stage``.

Read from here: job validation and job targets (:mod:`visrl.job_config`), the launcher
(:func:`visrl.jobs.start_job`), the CLI (``jobs start`` choices, which commands refuse several
ranks, ``visrl train``), :class:`visrl.train.config.TrainConfig` (its ``stage`` values),
:func:`visrl.train.run.build_trainer`, and the app's Train tab (its Stage choices). A new stage
is one record below (and its code); a test fails if its names are listed anywhere else.

Classes and functions are named as ``"module:attribute"`` and imported when used: importing this
module imports nothing heavy (no torch) and no other visrl module, so every module can read it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError, JobError


@dataclass(frozen=True)
class Stage:
    """One stage. Stages of one ``kind`` share its config, parser, run function, output field
    and process count (they are one command); tests/test_stages.py checks that they do."""

    name: str  # a train recipe's ``stage:`` value; else the command itself
    kind: str  # the command that runs it, and the kind of its background job
    title: str  # one line: help texts and the app's Stage choice
    config: str  # "module:Class" of its config dataclass
    run: str  # "module:function" called as f(workspace, cfg, progress=None, job_id=None)
    output_field: str | None  # the config field naming the folder it writes; None: the store only
    single_process: bool  # True: refused as one of several `accelerate launch` ranks
    recipe: str  # its recipe's file name in configs/ and configs/demo/
    app_tab: str  # the app tab that offers it
    # "module:function" f(data, source) -> config, for recipes whose keys may be LLaMA-Factory's;
    # None: the config class reads the mapping as it is (visrl.config.from_dict).
    parser: str | None = None
    rolls_out: bool = False  # runs the policy on a store dataset and judges answers (keys, servers)
    preference: bool = False  # trains on preference pairs (pair_status selects them)
    trainer: str | None = None  # training stages: "module:function" that builds its trainer

    @property
    def config_class(self) -> type:
        return _resolve(self.config)

    @property
    def run_function(self) -> Callable[..., Any]:
        return _resolve(self.run)

    @property
    def trainer_builder(self) -> Callable[..., Any]:
        if self.trainer is None:
            raise ConfigError(f"stage {self.name!r} trains nothing; training stages: {', '.join(TRAIN_STAGES)}")
        return _resolve(self.trainer)

    def parse(self, data: dict[str, Any], source: str = "recipe") -> Any:
        """``data`` (a recipe's mapping) as this stage's config; errors name ``source``."""
        if self.parser is not None:
            return _resolve(self.parser)(data, source=source)
        from visrl.config import from_dict

        return from_dict(self.config_class, data, source=source)

    def load(self, path: str | Path, overrides: dict[str, Any] | None = None) -> Any:
        """Read the recipe at ``path``, apply ``overrides`` (e.g. from the CLI), parse it."""
        from visrl.config import read_yaml

        return self.parse({**read_yaml(path), **(overrides or {})}, source=str(path))


def _training(name: str, title: str, recipe: str, trainer: str, preference: bool = False) -> Stage:
    # Several ranks train one model together (accelerate: DDP, DeepSpeed, FSDP).
    return Stage(name, "train", title, "visrl.train.config:TrainConfig", "visrl.train.run:train",
                 "output_dir", single_process=False, recipe=recipe, app_tab="train",
                 parser="visrl.train.config:parse_train_config", preference=preference, trainer=trainer)


# In the pipeline's order. Generation and evaluation batch on one device (many GPUs: a vLLM
# server and backend: remote); each rank of a merge would write the same export.
STAGES: tuple[Stage, ...] = (
    Stage("generate", "generate", "generate (rollouts, judges, preference pairs)", "visrl.generate:GenerateConfig",
          "visrl.generate:run_generate", None, single_process=True, recipe="generate.yaml",
          app_tab="generate", rolls_out=True),
    _training("sft", "sft", "train_sft.yaml", "visrl.train.sft:build_sft_trainer"),
    _training("dpo", "dpo (VisRL stage 1: box step)", "train_rl_stage1.yaml",
              "visrl.train.dpo:build_dpo_trainer", preference=True),
    _training("visrl", "visrl (VisRL stage 2: box + answer)", "train_rl_stage2.yaml",
              "visrl.train.joint:build_visrl_trainer", preference=True),
    _training("grpo", "grpo (online RL: IoU reward)", "train_grpo.yaml", "visrl.train.grpo:build_grpo_trainer"),
    Stage("merge", "merge", "merge LoRA", "visrl.train.merge:MergeConfig", "visrl.train.merge:merge_lora",
          "export_dir", single_process=True, recipe="merge_lora.yaml", app_tab="train",
          parser="visrl.train.merge:parse_merge_config"),
    Stage("eval", "eval", "eval (two-step vs direct answers)", "visrl.evaluate:EvalConfig",
          "visrl.evaluate:run_eval", "output_dir", single_process=True, recipe="eval.yaml",
          app_tab="evaluate", rolls_out=True),
)
NAMES: tuple[str, ...] = tuple(stage.name for stage in STAGES)
# The commands (and job kinds) that run a stage, in the pipeline's order.
KINDS: tuple[str, ...] = tuple(dict.fromkeys(stage.kind for stage in STAGES))
TRAIN_STAGES: tuple[str, ...] = tuple(stage.name for stage in STAGES if stage.trainer is not None)


def stage_named(name: str) -> Stage:
    for stage in STAGES:
        if stage.name == name:
            return stage
    raise ConfigError(f"unknown stage {name!r}; use one of {', '.join(NAMES)}")


def stage_of_kind(kind: str) -> Stage:
    """The record of job kind ``kind`` (for ``train``: its first stage; the four share what a
    job reads: config class, parser, run function, output field, process count)."""
    for stage in STAGES:
        if stage.kind == kind:
            return stage
    raise JobError(f"unknown job kind {kind!r}; use one of {', '.join(KINDS)}")


def stage_of_job(kind: str, config: dict[str, Any]) -> Stage | None:
    """The stage a job of ``kind`` with recorded ``config`` runs: a kind with several stages
    (``train``) tells them apart by the config's ``stage``. None: no such stage."""
    of_kind = [stage for stage in STAGES if stage.kind == kind]
    if len(of_kind) == 1:
        return of_kind[0]
    return next((stage for stage in of_kind if stage.name == config.get("stage")), None)


def single_process_kinds() -> tuple[str, ...]:
    return tuple(kind for kind in KINDS if stage_of_kind(kind).single_process)


def _resolve(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)
