"""One training run, top to bottom: rows -> model -> trainer -> train -> save -> register.

:func:`train` is what ``visrl train CONFIG`` (and a background job) calls. It resumes from the
last checkpoint of ``output_dir`` when ``resume_from_checkpoint: auto``; a stop request ends it
after the current step with a checkpoint (registered in the store, marked ``stopped``); a finished
run saves the adapter (or full model) and the processor in ``output_dir`` and registers it.

Under ``accelerate launch`` every rank runs this function; only the main process writes files
(the merged base, the processor, ``visrl_model.json``; the Trainer saves weights on rank 0) and
rows of the store (the checkpoint). The others return the same :class:`TrainResult` without a
``checkpoint_id``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visrl.config import to_dict
from visrl.errors import ConfigError
from visrl.model_files import copy_processor_files
from visrl.models import locate_model, write_model_info
from visrl.progress import Progress
from visrl.runtime import is_main_process
from visrl.stages import stage_named
from visrl.store import Store
from visrl.train.callbacks import ProgressCallback
from visrl.train.config import TrainConfig, merged_base_dir, resolve_output, resolve_path
from visrl.train.data import pair_ids, split_rows, stage_rows, to_dataset
from visrl.train.grpo import grpo_rows
from visrl.train.lengths import check_training_rows
from visrl.train.lora import load_train_model, save_merged_base, training_contract
from visrl.train.plan import check_will_train, last_complete_checkpoint
from visrl.workspace import Workspace


@dataclass
class TrainResult:
    """Where the run left its weights, and how far it got."""

    path: Path  # output_dir when finished; the last checkpoint-N when stopped
    base: str  # what the adapter applies to (load_model(base, adapter=path))
    stage: str
    global_step: int
    stopped: bool
    checkpoint_id: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def build_trainer(cfg: TrainConfig, tm: Any, train_ds: Any, eval_ds: Any | None, output_dir: Path,
                  callbacks: list[Any]) -> Any:
    """The stage's trainer, built by the function its record in :mod:`visrl.stages` names."""
    build = stage_named(cfg.stage).trainer_builder
    return build(cfg, tm, train_ds, eval_ds, output_dir, callbacks)


def resume_checkpoint(cfg: TrainConfig, output_dir: Path, root: Path) -> str | None:
    """The checkpoint to resume from: ``auto`` = the last one in output_dir (or none)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "auto":
        return last_complete_checkpoint(output_dir)
    path = Path(resolve_path(root, cfg.resume_from_checkpoint) or "")
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint {cfg.resume_from_checkpoint!r} is not a folder; "
                          "use auto, false, or a checkpoint-N folder of a previous run")
    return str(path)


def train(workspace: str | Path | Workspace | None, cfg: TrainConfig,
          progress: Progress | None = None, job_id: int | None = None) -> TrainResult:
    """Run ``cfg`` in ``workspace``; returns where the result is (see :class:`TrainResult`).

    One run per output folder at a time: a second one gets a JobError ("already running")
    before any model loads, as does a run whose output already holds a finished run
    (:func:`visrl.train.plan.check_will_train`). Under ``accelerate launch`` only rank 0 holds that lease.
    """
    store = Store.open(workspace)
    if int(os.environ.get("RANK", "0") or 0) != 0:
        return _train(cfg, store, job_id, progress)
    check_will_train(to_dict(cfg), store.workspace.root)  # a finished run: say so, train nothing
    output_dir = resolve_output(store.workspace.root, cfg.output_dir)
    with store.acquire_lease(f"train:{output_dir.resolve()}", job_id=job_id):
        return _train(cfg, store, job_id, progress)


def _train(cfg: TrainConfig, store: Store, job_id: int | None, progress: Progress | None) -> TrainResult:
    ws = store.workspace
    output_dir = resolve_output(ws.root, cfg.output_dir)
    source = locate_model(cfg.model_name_or_path, ws.root)  # a folder or a cached Hub id
    model_path, adapter_path = source.label, resolve_path(ws.root, cfg.adapter_name_or_path)
    contract = training_contract(cfg, source, adapter_path)  # rows and model agree on boxes and crops
    rows = (grpo_rows(cfg, store, ws, contract=contract) if cfg.stage == "grpo"
            else stage_rows(cfg, store, ws, contract=contract))
    if cfg.stage != "grpo":  # GRPO cuts no prompt (grpo.py); the others truncate at max_length
        check_training_rows(rows, cfg.max_length, source.path, contract)
    train_rows, val_rows = split_rows(rows, cfg.val_size, cfg.seed)
    tm = load_train_model(cfg, model_path, adapter_path, contract)
    if tm.merged_adapter:
        # Every rank trains on the merged weights it holds; only the main one writes them (the
        # others would write the same multi-GB files into the same folder at once).
        save_merged_base(tm, merged_base_dir(output_dir), write=is_main_process())
    progress = progress or Progress(None, None, desc=f"train {cfg.stage}")
    callback = ProgressCallback(progress)
    trainer = build_trainer(cfg, tm, to_dataset(train_rows), to_dataset(val_rows) if val_rows else None,
                            output_dir, [callback])
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(cfg, output_dir, ws.root))
    step = trainer.state.global_step
    if callback.stopped:
        path = output_dir / f"checkpoint-{step}"
    else:
        trainer.save_model(str(output_dir))
        path = output_dir
    if trainer.is_world_process_zero():
        # The base's processor files, as the base has them (chat template included): loads anywhere.
        copy_processor_files(locate_model(tm.base_path).path, path)
        write_model_info(path, tm.contract, base=tm.base_path)  # what it taught, and on which base
    result = TrainResult(path=path, base=tm.base_path, stage=cfg.stage, global_step=step,
                         stopped=callback.stopped, metrics=dict(output.metrics))
    if trainer.is_world_process_zero():
        result.checkpoint_id = store.add_checkpoint(
            _stored(ws, path), _stored(ws, Path(tm.base_path)), cfg.stage, job_id,
            pairs=pair_ids(train_rows) or None,
            config={**to_dict(cfg), "global_step": step, "stopped": callback.stopped,
                    "rows": len(train_rows), "merged_adapter": tm.merged_adapter})
    return result


def _stored(ws: Workspace, path: Path) -> str:
    """Paths inside the workspace are stored relative to it (the workspace can move); a name that
    is no folder (a Hub id the base was found under) is stored as it is."""
    if not path.is_absolute() and not path.exists():
        return str(path)
    return ws.relative(path) if ws.contains(path) else str(Path(path).resolve())
