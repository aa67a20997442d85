"""TRL rows (SFT, DPO stage 1 and 2), their folder form, and the LLaMA-Factory export round trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image

from visrl import review
from visrl.boxes import Box, crop_box, format_box, iou, random_negative_box
from visrl.contract import TwoStepContract
from visrl.errors import DataError
from visrl.formats import import_file
from visrl.formats.export import export, llamafactory_dataset_info
from visrl.formats.trl import dpo_rows, load_rows, save_dataset, sft_rows, to_dataset
from visrl.prompts import answer_prompt, assistant, box_prompt, two_step_conversation
from visrl.store import Store, box_to_json
from visrl.synthetic import SyntheticConfig, write_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA = {"detail": "dot_colour", "object_size": (80, 96)}


@pytest.fixture
def demo(store: Store, tmp_path: Path) -> Store:
    """6 train + 2 val items; pairs on the 6 train items: 1, 2, 3 accepted, 4 rejected, 5-6 pending."""
    cfg = SyntheticConfig(n_train=6, n_val=2, n_test=0, **DATA)
    for split, path in write_benchmark(tmp_path / "bench", cfg).items():
        if split != "test":
            import_file(store, path, "viscot", dataset="demo")
    rng = random.Random(0)
    for n, item in enumerate(store.items("demo", "train")):
        gt, size = store.item_box(item), (item["width"], item["height"])
        bad = random_negative_box(gt, size, rng)
        rows = []
        for attempt, (box, answer, score) in enumerate([(gt, item["answer"], 1.0), (bad, "black", 0.0)]):
            row = {"item_id": item["id"], "run_key": "r", "attempt": attempt, "kind": "policy",
                   "box": box, "box_text": format_box(box, "viscot", size), "answer": answer,
                   "answer_score": score}
            rows.append({**row, "id": store.add_rollout(row), "box": box_to_json(box)})
        pair_id = review.add_pair(store, item["id"], rows[0], rows[1])
        if n < 3:
            review.accept(store, pair_id, 1)
        elif n == 3:
            review.reject(store, pair_id, 1)
    return store


def test_sft_rows_are_two_step_conversations(demo: Store) -> None:
    rows = sft_rows(demo, demo.workspace, dataset="demo", split="train")
    items = demo.items("demo", "train")
    assert len(rows) == 6
    for row, item in zip(rows, items, strict=True):
        box = demo.item_box(item)
        full, crop = row["images"]
        assert full.size == (448, 336) and full.mode == "RGB"
        assert crop.size == (round(box.width), round(box.height))
        assert crop.tobytes() == crop_box(full, box).tobytes()
        assert row["messages"] == two_step_conversation(item["question"], format_box(box, "viscot", full.size),
                                                        item["answer"])
    assert sorted(rows[0]) == ["images", "messages"]
    assert len(sft_rows(demo, demo.workspace, split="val")) == 2
    assert len(sft_rows(demo, demo.workspace, split=None)) == 8
    wide = sft_rows(demo, demo.workspace, split="train", contract=TwoStepContract(crop_margin=0.1))[0]["images"][1]
    assert wide.size[0] > rows[0]["images"][1].size[0]


def test_dpo_stage1_rows(demo: Store) -> None:
    rows = dpo_rows(demo, demo.workspace, statuses=("accepted",), stage=1)
    assert [r["pair_id"] for r in rows] == [1, 2, 3]
    pair = review.get_pair(demo, 1)
    size = (pair["width"], pair["height"])
    boxes = review.pair_boxes(pair)
    assert sorted(rows[0]) == ["chosen", "images", "pair_id", "prompt", "rejected"]
    assert rows[0]["prompt"] == box_prompt(pair["question"])
    assert rows[0]["chosen"] == assistant(format_box(boxes["chosen"], "viscot", size))
    assert rows[0]["rejected"] == assistant(format_box(boxes["rejected"], "viscot", size))
    assert len(rows[0]["images"]) == 1
    both = dpo_rows(demo, demo.workspace, statuses=("accepted", "pending"))
    assert [r["pair_id"] for r in both] == [1, 2, 3, 5, 6]
    qwen = dpo_rows(demo, demo.workspace, contract=TwoStepContract(box_format="qwen2"))[0]["chosen"][0]["content"][0]["text"]
    assert qwen.startswith("<|box_start|>(")


def test_dpo_rows_follow_review_edits(demo: Store) -> None:
    edited = Box(10, 20, 110, 120)
    review.edit_box(demo, 2, 2, "chosen", edited)
    review.edit_answer(demo, 2, 3, "rejected", "orange")
    row = dpo_rows(demo, demo.workspace, stage=2)[1]
    assert row["pair_id"] == 2
    assert row["chosen"] == assistant(format_box(edited, "viscot", (448, 336)))
    assert row["rejected_answer"] == assistant("orange")
    assert row["chosen_answer_images"][1].size == (100, 100)


def test_dpo_stage2_rows_give_each_side_its_own_crop(demo: Store) -> None:
    rows = dpo_rows(demo, demo.workspace, stage=2)
    assert len(rows) == 3
    row, pair = rows[0], review.get_pair(demo, 1)
    boxes = review.pair_boxes(pair)
    full = row["images"][0]
    for side in ("chosen", "rejected"):
        images = row[f"{side}_answer_images"]
        assert images[0] is full and images[1].tobytes() == crop_box(full, boxes[side]).tobytes()
        text = row[side][0]["content"][0]["text"]
        assert row[f"{side}_answer_prompt"] == answer_prompt(pair["question"], text)
        assert row[f"{side}_answer"] == assistant(pair[f"{side}_answer"])
    assert row["chosen_answer"] != row["rejected_answer"]
    with pytest.raises(DataError, match="DPO stage must be 1"):
        dpo_rows(demo, demo.workspace, stage=3)


def test_trl_rows_make_a_dataset(demo: Store) -> None:
    from datasets import Image as ImageFeature

    ds = to_dataset(dpo_rows(demo, demo.workspace, stage=2))
    assert ds.num_rows == 3
    assert set(ds.column_names) == {"images", "prompt", "chosen", "rejected", "pair_id",
                                    "chosen_answer_images", "chosen_answer_prompt", "chosen_answer",
                                    "rejected_answer_images", "rejected_answer_prompt", "rejected_answer"}
    assert isinstance(ds.features["images"].feature, ImageFeature)
    assert ds[0]["chosen_answer_images"][1].size == dpo_rows(demo, demo.workspace, stage=2)[0][
        "chosen_answer_images"][1].size


@pytest.mark.parametrize("kind", ["sft", "dpo1", "dpo2"])
def test_save_and_load_rows_round_trip(demo: Store, tmp_path: Path, kind: str) -> None:
    rows = (sft_rows(demo, demo.workspace) if kind == "sft"
            else dpo_rows(demo, demo.workspace, stage=int(kind[-1])))
    out = save_dataset(rows, tmp_path / "out")
    back = load_rows(out)
    assert len(back) == len(rows)
    for a, b in zip(rows, back, strict=True):
        assert sorted(a) == sorted(b)
        for key, value in a.items():
            if key.endswith("images"):
                assert [im.tobytes() for im in value] == [im.tobytes() for im in b[key]]
            else:
                assert value == b[key]
    n_files = len(list((out / "images").iterdir()))
    assert n_files == {"sft": 12, "dpo1": 3, "dpo2": 9}[kind]  # the shared full image once per row
    assert json.loads((out / "dataset_info.json").read_text())["rows"] == len(rows)


def test_saved_folder_loads_with_datasets(demo: Store, tmp_path: Path) -> None:
    from datasets import load_dataset

    out = save_dataset(dpo_rows(demo, demo.workspace, stage=2), tmp_path / "out")
    ds = load_dataset("imagefolder", data_dir=str(out), split="train")
    assert ds.num_rows == 3
    assert {"images", "prompt", "chosen", "rejected", "chosen_answer_images"} <= set(ds.column_names)
    first = ds[0]
    assert first["images"][0].size == (448, 336)
    assert first["chosen"][0]["content"][0]["text"].startswith("[")
    assert first["pair_id"] == 1


def test_save_refuses_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("x")
    with pytest.raises(DataError, match="is not empty; export into a new folder"):
        save_dataset([], tmp_path / "out")
    with pytest.raises(DataError, match="holds no metadata.jsonl"):
        load_rows(tmp_path / "out")


# ---------------------------------------------------------------------- export()

@pytest.mark.parametrize("fmt, stage, rows, files", [
    ("trl-sft", None, 6, {"metadata.jsonl", "dataset_info.json", "README.md", "images"}),
    ("trl-dpo", 1, 3, {"metadata.jsonl", "dataset_info.json", "README.md", "images"}),
    ("trl-dpo", 2, 3, {"metadata.jsonl", "dataset_info.json", "README.md", "images"}),
    ("llamafactory", None, 3, {"pairs.json", "dataset_info.json", "images"}),
])
def test_export_formats(demo: Store, tmp_path: Path, fmt: str, stage: int | None, rows: int,
                        files: set[str]) -> None:
    result = export(demo, demo.workspace, fmt, tmp_path / "out", stage=stage)
    assert result["rows"] == rows and result["path"] == str(tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == files


def test_export_errors(demo: Store, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nothing to export: no pairs with status pending in dataset 'demo'"):
        review.accept(demo, 5, 1)
        review.accept(demo, 6, 1)
        export(demo, demo.workspace, "llamafactory", tmp_path / "a", statuses=("pending",), dataset="demo")
    assert not (tmp_path / "a").exists()
    with pytest.raises(DataError, match="unknown export format 'csv'"):
        export(demo, demo.workspace, "csv", tmp_path / "b")
    with pytest.raises(DataError, match="--stage applies to trl-dpo only"):
        export(demo, demo.workspace, "trl-sft", tmp_path / "c", stage=2)
    with pytest.raises(DataError, match="unknown pair status 'done'"):
        export(demo, demo.workspace, "trl-dpo", tmp_path / "d", statuses=("done",))


def test_rejected_stage2_export_is_one_row(demo: Store, tmp_path: Path) -> None:
    result = export(demo, demo.workspace, "trl-dpo", tmp_path / "a", statuses=("rejected",), stage=2)
    assert result["rows"] == 1 and load_rows(tmp_path / "a")[0]["pair_id"] == 4


def test_llamafactory_files_match_the_shipped_dataset_info(demo: Store, tmp_path: Path) -> None:
    export(demo, demo.workspace, "llamafactory", tmp_path / "lf")
    info = json.loads((tmp_path / "lf" / "dataset_info.json").read_text())
    assert info == json.loads((ROOT / "data" / "dataset_info.json").read_text()) == llamafactory_dataset_info()
    records = json.loads((tmp_path / "lf" / "pairs.json").read_text())
    assert len(records) == 3
    record = records[0]
    assert sorted(record) == ["answer", "bbox", "chosen", "chosen_step", "conversations", "images",
                              "rejected", "rejected_step"]
    assert record["conversations"][0]["value"].startswith("<image>")
    assert record["conversations"][0]["value"].count("<image>") == len(record["images"]) == 1
    for entry in info.values():  # every mapped column exists in the records
        assert all(column in record for column in entry["columns"].values())
    with Image.open(tmp_path / "lf" / record["images"][0]) as image:
        assert image.size == (448, 336)


@pytest.mark.parametrize("statuses", [("accepted",), ("accepted", "pending", "rejected")])
def test_llamafactory_export_import_round_trip(demo: Store, tmp_path: Path, statuses: tuple[str, ...]) -> None:
    export(demo, demo.workspace, "llamafactory", tmp_path / "lf", statuses=statuses)
    summary = import_file(demo, tmp_path / "lf" / "pairs.json", "auto", dataset="back")
    originals = [review.get_pair(demo, i) for i in range(1, 7) if review.get_pair(demo, i)["status"] in statuses]
    assert summary["pairs"] == len(originals) and summary["items"] == len(originals)
    imported = review.page_pairs(demo, review.PairFilter(status="pending", dataset="back"), sort="oldest")
    assert len(imported) == len(originals)
    for old, new in zip(originals, imported, strict=True):
        assert (new["question"], new["reference"]) == (old["question"], old["reference"])
        assert (new["chosen_answer"], new["rejected_answer"]) == (old["chosen_answer"], old["rejected_answer"])
        for key in ("chosen", "rejected", "gt"):
            a, b = review.pair_boxes(old)[key], review.pair_boxes(new)[key]
            # viscot text has 3 decimals of the 448 px padded side: within 0.25 px per coordinate.
            assert max(abs(x - y) for x, y in zip(a.as_list(), b.as_list(), strict=True)) <= 0.25
            assert iou(a, b) > 0.98
        with Image.open(demo.workspace.root / old["image"]) as x, Image.open(demo.workspace.root / new["image"]) as y:
            assert x.tobytes() == y.tobytes()


def test_export_writes_boxes_and_crops_as_a_checkpoint_was_trained(demo: Store, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from visrl.cli import _register, cli
    from visrl.models import write_model_info
    from visrl.tiny import build_tiny_model

    _register()
    model = build_tiny_model(tmp_path / "ckpt", preset="test")
    trained = TwoStepContract(box_format="qwen2", crop_margin=0.25)
    write_model_info(model, trained)
    out = tmp_path / "dpo2"
    result = CliRunner().invoke(cli, ["export", "--format", "trl-dpo", "--stage", "2", "--out", str(out),
                                      "--model", str(model), "-w", str(demo.workspace.root)])
    assert result.exit_code == 0, result.output
    [row, *_] = load_rows(out)
    pair = review.get_pair(demo, row["pair_id"])
    size, chosen = (pair["width"], pair["height"]), review.pair_boxes(pair)["chosen"]
    assert row["chosen"][0]["content"][0]["text"] == trained.format(chosen, size)
    assert row["chosen"][0]["content"][0]["text"].startswith("<|box_start|>")
    region = trained.crop_region(chosen, size)  # 25% wider on each side than the box
    assert row["chosen_answer_images"][1].size == (region.width, region.height)
    assert region.width > chosen.width * 1.4


def _plain(value: object) -> object:
    """``value`` without the ``None`` fields Arrow adds to message parts (``'text': None``)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _same_rows(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) and a
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for key, value in x.items():
            if key.endswith("images"):
                assert [(im.size, im.tobytes()) for im in value] == [(im.size, im.tobytes()) for im in y[key]]
            else:
                assert _plain(value) == _plain(y[key]), key


@pytest.mark.parametrize("kind", ["sft", "dpo1", "dpo2"])
def test_training_rows_are_records_until_indexed_and_equal_the_eager_rows(demo: Store, kind: str) -> None:
    from visrl.formats.trl import deferred_rows, pair_records, sft_records

    statuses = ("accepted", "pending")
    contract = TwoStepContract(crop_margin=0.2, crop_min_pixels=20000, full_max_pixels=100000)
    if kind == "sft":
        records, eager = sft_records(demo), sft_rows(demo, demo.workspace, contract=contract)
    else:
        stage = int(kind[-1])
        records = pair_records(demo, statuses, stage)
        eager = dpo_rows(demo, demo.workspace, statuses=statuses, stage=stage, contract=contract)
    rows = deferred_rows(records, kind, contract, demo.workspace)
    assert len(rows) == len(eager) == {"sft": 6, "dpo1": 5, "dpo2": 5}[kind]
    assert all(len(row["record"]) < 600 for row in rows)  # a record is text: no pixels, no messages
    ds = to_dataset(rows)
    assert ds.column_names == ["record"]
    build = ds.format["format_kwargs"]["transform"]
    assert build._images.opened == 0
    first = ds[0]
    assert build._images.opened == 1 and first["images"][0].mode == "RGB"  # one file per row
    # Indexed as the Trainer indexes it, the dataset gives the rows the eager path gives.
    _same_rows([ds[i] for i in range(ds.num_rows)], [dict(row) for row in to_dataset(eager)])
    assert [row["pair_id"] for row in rows] == [row.get("pair_id") for row in eager]


@pytest.mark.parametrize("kind", ["sft", "dpo2"])
def test_reference_rows_open_no_image_until_indexed(demo: Store, kind: str) -> None:
    from visrl.formats.row_images import ImageRef, RowImages

    refs = (sft_rows(demo, demo.workspace, lazy=True) if kind == "sft"
            else dpo_rows(demo, demo.workspace, stage=2, lazy=True))
    assert all(isinstance(v, ImageRef) for row in refs for key in row if key.endswith("images") for v in row[key])
    images = RowImages(TwoStepContract())
    ds = to_dataset(refs, images)
    assert images.opened == 0 and "Image" not in str(ds.features)
    eager = sft_rows(demo, demo.workspace) if kind == "sft" else dpo_rows(demo, demo.workspace, stage=2)
    _same_rows([ds[i] for i in range(ds.num_rows)], [dict(row) for row in to_dataset(eager)])


def test_lazy_rows_of_an_exported_folder(demo: Store, tmp_path: Path) -> None:
    from visrl.formats.row_images import RowImages

    out = save_dataset(dpo_rows(demo, demo.workspace, stage=2), tmp_path / "out")
    images = RowImages(TwoStepContract())
    ds = to_dataset(load_rows(out, lazy=True), images)
    assert images.opened == 0
    _same_rows([ds[i] for i in range(ds.num_rows)], [dict(r) for r in to_dataset(load_rows(out))])
    with pytest.raises(ValueError, match="a crop needs a box"):
        from visrl.formats.row_images import ImageRef

        ImageRef("/x.png", "crop")


@pytest.mark.slow
def test_lazy_stage2_rows_collate_to_the_eager_batch(demo: Store, tmp_path: Path) -> None:
    import torch

    from visrl.models import load_processor
    from visrl.tiny import build_tiny_model
    from visrl.train.joint import StepwisePreferenceCollator

    model = Path(build_tiny_model(tmp_path / "tiny", preset="test", seed=0))
    collate = StepwisePreferenceCollator(load_processor(model))
    from visrl.formats.trl import deferred_rows, pair_records

    contract = TwoStepContract(crop_margin=0.1)
    records = pair_records(demo, ("accepted",), 2)
    lazy = to_dataset(deferred_rows(records, "dpo2", contract, demo.workspace))
    eager = to_dataset(dpo_rows(demo, demo.workspace, stage=2, contract=contract))
    got, expected = collate([lazy[i] for i in range(3)]), collate([eager[i] for i in range(3)])
    for step in ("box", "answer"):
        assert got[step].keys() == expected[step].keys()
        for key, value in expected[step].items():
            assert torch.equal(got[step][key], value), (step, key)


def test_training_rows_refuse_a_missing_image_before_training(demo: Store) -> None:
    from visrl.formats.trl import deferred_rows, pair_records

    records = pair_records(demo, ("accepted",), 2)
    demo.workspace.absolute(records[1]["image"]).unlink()
    with pytest.raises(DataError, match=f"1 image.*missing.*{records[1]['image']}"):
        deferred_rows(records, "dpo2", TwoStepContract(), demo.workspace)


@pytest.mark.parametrize("fmt", ["trl-dpo", "llamafactory"])
def test_export_counts_edits_not_rescored(demo: Store, tmp_path: Path, fmt: str) -> None:
    """An edited answer the judges cannot re-score here (no judge keys on these rollouts) goes out
    as edited, and the export says how many such pairs it holds (issue 19: scores follow edits)."""
    assert export(demo, demo.workspace, fmt, tmp_path / "a")["edited_not_rescored"] == 0
    review.edit_answer(demo, 1, 2, "chosen", "a reviewer's answer")
    result = export(demo, demo.workspace, fmt, tmp_path / "b")
    assert result["edited_not_rescored"] == 1 and result["rows"] == 3
    if fmt == "trl-dpo":
        assert "1 pairs were edited by a reviewer after judging and not re-scored" in (
            tmp_path / "b" / "README.md").read_text()
