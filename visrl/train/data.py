"""Training rows for each stage, from the store or from an exported folder.

Rows are the dicts of :mod:`visrl.formats.trl`, deferred: from the store they are records
(:func:`visrl.formats.trl.deferred_rows`) that become rows, images opened and cut, only when the
Trainer indexes them, so RAM and the time to the first step stay flat in the number of rows
(bench/bench_rows.py); from an exported folder they hold references to its files. ``sft`` rows carry
``images`` + ``messages``; ``dpo`` rows the box step (``images``, ``prompt``, ``chosen``,
``rejected``, ``pair_id``); ``visrl`` rows add both answer steps, each with its own crop.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.store import Store
from visrl.train.config import TrainConfig, resolve_path
from visrl.workspace import Workspace

Row = dict[str, Any]
STAGE2_KEYS = ("chosen_answer_images", "chosen_answer_prompt", "chosen_answer",
               "rejected_answer_images", "rejected_answer_prompt", "rejected_answer")


def stage_rows(cfg: TrainConfig, store: Store, ws: Workspace, contract: TwoStepContract | None = None) -> list[Row]:
    """The rows ``cfg.stage`` trains on; an empty selection is a DataError that says why.
    Box texts and crops follow ``contract`` (default: the config's box format and crop margin)."""
    from visrl.formats import trl as trl_format

    contract = contract or TwoStepContract(box_format=cfg.box_format, crop_margin=cfg.crop_margin)
    # Rows from the store stay records until the Trainer indexes them (built, images opened, cut
    # and prepared by the contract then): RAM and the time to the first step stay flat in the
    # number of rows. An exported folder's rows hold references to its image files.
    folder = _exported_folder(ws, cfg.dataset)
    if folder is not None:
        rows = trl_format.load_rows(folder, lazy=True)
        _check_exported(rows, cfg, folder)
    elif cfg.stage == "sft":
        records = trl_format.sft_records(store, dataset=cfg.dataset or None, split=cfg.split)
        rows = trl_format.deferred_rows(records, "sft", contract, ws)
    else:
        stage = 2 if cfg.stage == "visrl" else 1
        records = trl_format.pair_records(store, statuses=tuple(cfg.pair_status), stage=stage,
                                          dataset=cfg.dataset or None)
        rows = trl_format.deferred_rows(records, f"dpo{stage}", contract, ws)
    if not rows:
        raise DataError(_empty_message(cfg))
    return rows


def _exported_folder(ws: Workspace, dataset: str) -> Path | None:
    if not dataset or not any(sep in dataset for sep in ("/", "\\", ".")):
        return None  # a plain name is a store dataset
    path = Path(resolve_path(ws.root, dataset) or dataset)
    return path if path.is_dir() else None


def _check_exported(rows: list[Row], cfg: TrainConfig, folder: Path) -> None:
    if not rows:
        return
    pair = ("images", "prompt", "chosen", "rejected")  # a DPO row; stage 2 adds the answer step's
    needed = ("images", "messages") if cfg.stage == "sft" else (*pair, *(STAGE2_KEYS if cfg.stage == "visrl" else ()))
    missing = [key for key in needed if key not in rows[0]]
    if missing:
        raise DataError(f"{folder} has no column(s) {', '.join(missing)} needed by stage {cfg.stage}; "
                        f"export it for that stage (visrl export --format trl)")


def _empty_message(cfg: TrainConfig) -> str:
    where = f"dataset {cfg.dataset!r}" if cfg.dataset else "the workspace"
    if cfg.stage == "sft":
        return (f"no items with a ground-truth box in split {cfg.split!r} of {where}: "
                "sft needs boxed items (import Visual-CoT data or set split/dataset)")
    return (f"no pairs with status {', '.join(cfg.pair_status)} in {where}: generate pairs "
            "(visrl generate) and review them, or set pair_status: [pending, accepted]")


def split_rows(rows: list[Row], val_size: float, seed: int) -> tuple[list[Row], list[Row]]:
    """(train, validation): ``val_size`` < 1 is a fraction, >= 1 a count; shuffled by ``seed``."""
    if val_size <= 0:
        return rows, []
    n_val = int(round(val_size * len(rows))) if val_size < 1 else int(val_size)
    n_val = min(max(n_val, 1), len(rows) - 1)
    if n_val < 1:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_val])
    return ([r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held])


def pair_ids(rows: list[Row]) -> list[int]:
    return [int(row["pair_id"]) for row in rows if row.get("pair_id") is not None]


def to_dataset(rows: list[Row]) -> Any:
    """A ``datasets.Dataset`` (what the trl trainers require); reference rows open their images
    when a row is indexed."""
    from visrl.formats.trl import to_dataset as formats_to_dataset

    return formats_to_dataset(rows)
