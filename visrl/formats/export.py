"""Export of the curated set: TRL datasets (SFT, DPO stage 1 or 2) and LLaMA-Factory files.

``llamafactory`` writes ``pairs.json`` (ranking records in VisRL's sharegpt layout, see
:mod:`visrl.formats.sharegpt`), the item images under ``images/`` (paths in the records are
relative to the folder, LLaMA-Factory's ``media_dir``), and a ``dataset_info.json`` registering
the file twice: ``visrl_stage1`` (chosen/rejected = the box steps) and ``visrl_stage2`` (the
answers, with the box steps as extra columns for VisRL's stage-2 trainer). Point LLaMA-Factory's
``dataset_dir`` at the folder. ``data/dataset_info.json`` of this repository is the same file.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.formats import trl
from visrl.formats.sharegpt import sharegpt_record
from visrl.review import pair_boxes
from visrl.store import Store
from visrl.workspace import Workspace

EXPORT_FORMATS: tuple[str, ...] = ("llamafactory", "trl-sft", "trl-dpo")
PAIRS_FILE = "pairs.json"


def llamafactory_dataset_info(file_name: str = PAIRS_FILE) -> dict[str, Any]:
    """The ``dataset_info.json`` entries of an export (stage 1 and stage 2 views of one file)."""
    base = {"file_name": file_name, "ranking": True, "formatting": "sharegpt"}
    return {
        "visrl_stage1": {**base, "columns": {"messages": "conversations", "chosen": "chosen_step",
                                             "rejected": "rejected_step", "images": "images"}},
        "visrl_stage2": {**base, "columns": {"messages": "conversations", "chosen": "chosen",
                                             "rejected": "rejected", "chosen_step": "chosen_step",
                                             "rejected_step": "rejected_step", "images": "images"}},
    }


def export(store: Store, ws: Workspace, fmt: str, out_dir: str | Path,
           statuses: Iterable[str] = ("accepted",), dataset: str | None = None,
           stage: int | None = None, box_format: str | None = None, crop_margin: float | None = None,
           split: str | None = "train", contract: TwoStepContract | None = None) -> dict[str, Any]:
    """Write the export into ``out_dir`` (new or empty); returns ``{"rows": n, "path": ...}``.

    Pair exports also return ``edited_not_rescored``: the exported pairs a reviewer edited whose
    judge scores could not be recomputed (:mod:`visrl.rescore`). No export carries scores; every
    pair goes out with the box and answer the reviewer left, by its status alone.

    Box texts and crops follow ``contract`` (e.g. a checkpoint's, :func:`visrl.contract.read_contract`;
    default Visual-CoT boxes, no margin), with ``box_format`` / ``crop_margin`` overriding it.
    ``split`` applies to ``trl-sft`` only (items); pair exports take every split.
    """
    contract = (contract or TwoStepContract()).override(box_format=box_format, crop_margin=crop_margin)
    statuses = tuple(statuses)
    out = Path(out_dir)
    if fmt not in EXPORT_FORMATS:
        raise DataError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    if stage is not None and fmt != "trl-dpo":
        raise DataError("--stage applies to trl-dpo only")
    if fmt == "llamafactory":
        return {**export_llamafactory(store, ws, out, statuses, dataset, contract),
                "edited_not_rescored": _stale(store, statuses, dataset)}
    if fmt == "trl-sft":
        rows = trl.sft_rows(store, ws, dataset=dataset, split=split, contract=contract)
        what = "items with a box and an answer" + (f" in split {split!r}" if split else "")
        description = "VisRL two-step SFT rows (images: [full, crop]; messages)."
    else:
        stage = stage or 1
        rows = trl.dpo_rows(store, ws, statuses=statuses, stage=stage, dataset=dataset,
                            contract=contract)
        what = f"pairs with status {', '.join(statuses)} (and boxes on both sides)"
        description = f"VisRL DPO stage {stage} rows ({'box step' if stage == 1 else 'box + answer steps'})."
    if not rows:
        raise DataError(f"nothing to export: no {what}" + (f" in dataset {dataset!r}" if dataset else ""))
    result = {"rows": len(rows), "path": str(out), "format": fmt, "stage": stage}
    if fmt == "trl-dpo":
        result["edited_not_rescored"] = stale = _stale(store, statuses, dataset)
        description += (f" {stale} pairs were edited by a reviewer after judging and not re-scored: "
                        "they train as edited, by their status, like every pair.") if stale else ""
    trl.save_dataset(rows, out, description=description)
    return result


def _stale(store: Store, statuses: tuple[str, ...], dataset: str | None) -> int:
    from visrl.rescore import count_stale

    return count_stale(trl.selected_pairs(store, statuses, dataset))


def export_llamafactory(store: Store, ws: Workspace, out: Path, statuses: tuple[str, ...],
                        dataset: str | None, contract: TwoStepContract | None = None) -> dict[str, Any]:
    contract = contract or TwoStepContract()
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; export into a new folder")
    records, images = [], {}
    for pair in trl.selected_pairs(store, statuses, dataset):
        texts = trl.side_texts(store, pair, contract)
        if texts["chosen"] is None or texts["rejected"] is None:
            continue
        relative = pair["image"].removeprefix("images/")
        images[relative] = ws.absolute(pair["image"])
        gt = pair_boxes(pair)["gt"]
        bbox = None if gt is None else contract.format(gt, (pair["width"], pair["height"]))
        records.append(sharegpt_record(pair, f"images/{relative}", texts["chosen"], texts["rejected"], bbox))
    if not records:
        raise DataError(f"nothing to export: no pairs with status {', '.join(statuses)}"
                        + (f" in dataset {dataset!r}" if dataset else ""))
    out.mkdir(parents=True, exist_ok=True)
    for relative, source in images.items():
        dest = out / "images" / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, dest)
    (out / PAIRS_FILE).write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    info = llamafactory_dataset_info()
    (out / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return {"rows": len(records), "path": str(out), "format": "llamafactory", "stage": None,
            "dataset_info": info}
