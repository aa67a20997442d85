"""Importers: Visual-CoT (training and benchmark records), plain VQA, LLaMA-Factory sharegpt.

Round trips assert exact boxes; every bad input gets an error naming the record and field, and
leaves the store and the images folder exactly as they were.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageStat

from visrl.boxes import Box, crop_box, format_box, iou, to_viscot
from visrl.errors import DataError
from visrl.formats import ImageSource, detect_format, import_file, read_records
from visrl.generate import references
from visrl.prompts import BOX_PROMPT
from visrl.review import PairFilter, count_pairs, page_pairs
from visrl.store import Store
from visrl.synthetic import SyntheticConfig, render_item, write_benchmark

SIZES = {"square": (300, 300), "wide": (500, 333), "tall": (240, 400)}


def save_image(folder: Path, name: str, size: tuple[int, int], colour: Any = (30, 120, 200)) -> str:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, colour)
    # A marker so crops of different places differ.
    image.paste((250, 20, 20), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    image.save(path)
    return name


def viscot_record(image: str, size: tuple[int, int], box: Box, qid: Any = 0, answer: str = "a cat",
                  pixel_suffix: bool = True, **extra: Any) -> dict[str, Any]:
    """A record as Visual-CoT's converter writes it (integer pixel box after ###)."""
    pixels = "[" + ", ".join(str(int(v)) for v in box.as_list()) + "]"
    entries = [image, f"{image}###{pixels}"] if pixel_suffix else [image]
    return {"dataset": "flickr30k", "split": "train", "question_id": qid, "image": entries,
            "conversations": [
                {"from": "human", "value": f"<image>\nWhat is on the left? {BOX_PROMPT}"},
                {"from": "gpt", "value": format_box(box, "viscot", size)},
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": answer}], **extra}


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def snapshot(store: Store) -> tuple[Any, ...]:
    db = store.db
    counts = tuple(db[t].count for t in ("datasets", "items", "rollouts", "pairs"))
    files = sorted(p.relative_to(store.workspace.root).as_posix()
                   for p in store.workspace.images_dir.rglob("*") if p.is_file())
    return counts, tuple(files)


# ---------------------------------------------------------------------- Visual-CoT

def test_demo_benchmark_round_trips_exactly(store: Store, tmp_path: Path) -> None:
    """What visrl.synthetic writes reads back: questions, answers, boxes to the pixel, splits."""
    cfg = SyntheticConfig(n_train=3, n_val=1, n_test=2, detail="dot_colour", object_size=(80, 96))
    paths = write_benchmark(tmp_path / "bench", cfg)
    for split, path in paths.items():
        summary = import_file(store, path, "auto", dataset="demo")
        assert summary["splits"] == {split: {"train": 3, "val": 1, "test": 2}[split]}
    items = store.items("demo")
    assert [(i["split"], i["source_id"]) for i in items] == [
        ("train", "train_0"), ("train", "train_1"), ("train", "train_2"), ("val", "val_0"),
        ("test", "test_0"), ("test", "test_1")]
    for item in items:
        split, index = item["source_id"].split("_")
        scene = render_item(cfg, split, int(index))
        assert item["question"] == scene.question and item["answer"] == scene.answer
        assert store.item_box(item) == scene.target_object.box
        assert (item["width"], item["height"]) == (448, 336)
        # Placed by content: the source's name plus the first 16 hex digits of its sha256.
        source = tmp_path / "bench" / "images" / f"{split}_{index}.png"
        digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
        assert item["image"] == f"images/demo/{split}_{index}-{digest}.png"
        with Image.open(store.workspace.root / item["image"]) as image:
            assert image.tobytes() == scene.image.tobytes()
    assert json.loads(items[0]["meta"])["dataset"] == "visrl_demo"


@pytest.mark.parametrize("shape", list(SIZES))
def test_viscot_pixel_box_wins_and_crops_to_the_pixel(store: Store, tmp_path: Path, shape: str) -> None:
    size = SIZES[shape]
    box = Box(94, 10, 201, 113)
    save_image(tmp_path, "flickr30k/1.jpg", size)
    path = write_json(tmp_path / "viscot_train.json", [viscot_record("flickr30k/1.jpg", size, box, qid=7)])
    summary = import_file(store, path, "viscot")
    assert summary == {"dataset": "viscot_train", "format": "viscot", "path": str(path), "items": 1,
                       "splits": {"train": 1}, "images": 1}
    [item] = store.items("viscot_train")
    assert item["source_id"] == "7" and item["question"] == "What is on the left?"
    assert store.item_box(item) == box
    with Image.open(tmp_path / "flickr30k/1.jpg") as original, \
            Image.open(store.workspace.root / item["image"]) as imported:
        assert crop_box(imported, store.item_box(item)).tobytes() == original.crop((94, 10, 201, 113)).tobytes()


@pytest.mark.parametrize("shape", list(SIZES))
def test_viscot_normalized_box_uses_square_padding(store: Store, tmp_path: Path, shape: str) -> None:
    """Without a ### entry the box comes from the second turn, undone with expand2square."""
    size = SIZES[shape]
    box = Box(40, 60, 180, 200)
    save_image(tmp_path, "img.png", size)
    record = viscot_record("img.png", size, box, pixel_suffix=False)
    import_file(store, write_json(tmp_path / "t.json", [record]), "viscot", dataset="d")
    got = store.item_box(store.items("d")[0])
    side = max(size)
    assert all(abs(a - b) <= 0.0005 * side + 1e-9 for a, b in zip(got.as_list(), box.as_list(), strict=True))
    per_axis = Box(*(v * s for v, s in zip(to_viscot(box, size), (*size, *size), strict=True)))
    if shape != "square":  # the wrong (per-axis) reading would be far off
        assert iou(got, box) > 0.99 > iou(per_axis, box)


def test_viscot_benchmark_record_with_size_and_int_ids(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "docvqa/a.png", (500, 333))
    records = [viscot_record("docvqa/a.png", (500, 333), Box(1, 2, 50, 60), qid=i, width=500, height=333)
               for i in range(3)]
    for i, record in enumerate(records):
        record["conversations"][3]["value"] = f"answer {i}"
        del record["split"]
    summary = import_file(store, write_json(tmp_path / "docvqa.json", records), split="test")
    assert summary["splits"] == {"test": 3} and summary["images"] == 1
    assert [(i["source_id"], i["answer"]) for i in store.items("docvqa")] == [
        ("0", "answer 0"), ("1", "answer 1"), ("2", "answer 2")]


def test_two_turn_record_is_an_item_without_box(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "x.png", (64, 48))
    record = {"image": "x.png", "question_id": 1, "conversations": [
        {"from": "human", "value": "<image>\nHow many?"}, {"from": "gpt", "value": "2"}]}
    import_file(store, write_json(tmp_path / "two.json", [record]), "viscot")
    [item] = store.items("two")
    assert (item["question"], item["answer"], item["gt_box"]) == ("How many?", "2", None)


# ---------------------------------------------------------------------- phone photos (EXIF orientation)

UPRIGHT = (64, 48)  # as a viewer shows the photo; sides on 16-pixel JPEG blocks (4:2:0 MCUs)
MARKER = Box(8, 8, 24, 24)  # a red square at the top left of the upright photo, on block edges
RED, BLUE = (230, 20, 20), (20, 40, 220)
# What a camera stores for orientation k, made from the upright photo: the inverse of the turn a
# viewer applies (6 = "turn 90 degrees clockwise to view": stored turned 90 counter-clockwise).
TO_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
             4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
             7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def phone_photo(path: Path, turn: int) -> Path:
    """A JPEG whose viewer shows UPRIGHT with the MARKER, stored as a phone does for ``turn``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    upright = Image.new("RGB", UPRIGHT, BLUE)
    upright.paste(RED, tuple(int(v) for v in MARKER.as_list()))
    method = TO_STORED[turn]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = turn
    stored.save(path, "JPEG", quality=95, exif=exif)
    return path


def near(image: Image.Image, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> bool:
    """The mean colour of ``box`` is ``colour`` within JPEG's error (30 levels; the other colour
    is 200 away)."""
    mean = ImageStat.Stat(image.convert("RGB").crop(box)).mean
    return all(abs(m - c) < 30 for m, c in zip(mean, colour, strict=True))


@pytest.mark.parametrize("turn", range(1, 9))
def test_phone_photo_is_stored_upright_and_boxes_read_against_it(store: Store, tmp_path: Path, turn: int) -> None:
    source = phone_photo(tmp_path / "phone" / "p.jpg", turn)
    with Image.open(source) as raw:
        assert raw.size == (UPRIGHT if turn <= 4 else UPRIGHT[::-1])  # 5..8 store the sides swapped
    records = [viscot_record("phone/p.jpg", UPRIGHT, MARKER, qid=0, width=64, height=48),  # ### pixel box
               viscot_record("phone/p.jpg", UPRIGHT, MARKER, qid=1, pixel_suffix=False)]  # square-padded
    summary = import_file(store, write_json(tmp_path / "v.json", records), "viscot", dataset="phone")
    assert summary["images"] == 1
    pixel_item, normalized_item = store.items("phone")
    assert (pixel_item["width"], pixel_item["height"]) == UPRIGHT and store.item_box(pixel_item) == MARKER
    assert iou(store.item_box(normalized_item), MARKER) > 0.98
    stored = store.workspace.root / pixel_item["image"]
    data = stored.read_bytes()
    assert pixel_item["image"] == f"images/phone/p-{hashlib.sha256(data).hexdigest()[:16]}.jpg"
    assert (data == source.read_bytes()) == (turn == 1)  # upright already: copied byte for byte
    with Image.open(stored) as image:
        assert image.format == "JPEG" and image.size == UPRIGHT
        assert image.getexif().get(0x0112) == (1 if turn == 1 else None)  # no viewer turns it again
        crop = crop_box(image.convert("RGB"), store.item_box(pixel_item))
        assert near(crop, (0, 0, *crop.size), RED)
        assert near(image, (40, 24, 64, 48), BLUE) and near(image, (0, 32, 8, 48), BLUE)


def test_turned_photo_is_encoded_the_same_every_time(store: Store, tmp_path: Path) -> None:
    """Named by the bytes it is stored as: a second import of the same photo reuses the file."""
    phone_photo(tmp_path / "p.jpg", 6)
    record = {"image": "p.jpg", "question": "q?", "answer": "a", "box": list(MARKER.as_list())}
    path = write_json(tmp_path / "d.json", [record])
    assert import_file(store, path, "vqa", dataset="d", split="train")["images"] == 1
    assert import_file(store, path, "vqa", dataset="d", split="val")["images"] == 0
    first, second = store.items("d")
    assert first["image"] == second["image"] and store.item_box(second) == MARKER


def test_record_with_the_stored_size_of_a_turned_photo_is_told_the_convention(store: Store, tmp_path: Path) -> None:
    phone_photo(tmp_path / "p.jpg", 6)
    record = {"image": "p.jpg", "question": "q?", "answer": "a", "width": 48, "height": 64}
    before = snapshot(store)
    with pytest.raises(DataError, match=r"record 0, field 'width': the record says 48x64 but the image is 64x48 "
                                        r"upright \(its EXIF orientation 6 turns the stored pixels"):
        import_file(store, write_json(tmp_path / "d.json", [record]), "vqa")
    assert snapshot(store) == before


def test_turned_photo_changed_before_it_is_placed_is_refused(store: Store, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    source = phone_photo(tmp_path / "p.jpg", 6)
    real_place_all = ImageSource.place_all

    def edit_then_place(self: ImageSource, created: list[Path]) -> None:
        phone_photo(source, 8)  # rewritten between the check and the placing
        real_place_all(self, created)

    monkeypatch.setattr(ImageSource, "place_all", edit_then_place)
    record = {"image": "p.jpg", "question": "q?", "answer": "a"}
    before = snapshot(store)
    with pytest.raises(DataError, match=r"p.jpg changed while it was imported; import again"):
        import_file(store, write_json(tmp_path / "d.json", [record]), "vqa")
    assert snapshot(store) == before


# ---------------------------------------------------------------------- plain VQA

@pytest.mark.parametrize("box, fmt", [
    ([20, 10, 60, 40], "pixels"),
    ("[20, 10, 60, 40]", "pixels"),
    ([0.25, 0.125, 0.75, 0.5], "normalized"),
    ("[0.25, 0.25, 0.75, 0.625]", "viscot"),  # 80x80 padded square: y offset 0
    ("<|box_start|>(250,125),(750,500)<|box_end|>", "qwen2"),
    ('{"bbox_2d": [250, 125, 750, 500]}', "qwen3"),
])
def test_vqa_box_formats(store: Store, tmp_path: Path, box: Any, fmt: str) -> None:
    save_image(tmp_path, "i.png", (80, 80))
    record = {"image": "i.png", "question": "What?", "answer": "x", "box": box, "box_format": fmt}
    import_file(store, write_json(tmp_path / "vqa.json", [record]), "vqa")
    expected = Box(20, 10, 60, 40) if fmt != "viscot" else Box(20, 20, 60, 50)
    assert store.item_box(store.items("vqa")[0]) == expected


def test_vqa_jsonl_answers_and_ids(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "img/a.png", (40, 30))
    lines = [{"image": "img/a.png", "question": "Colour?", "answers": ["red", "dark red", "red"], "id": "q1"},
             {"image": "img/a.png", "question": "Shape?", "answer": "square", "split": "val"},
             {"image": "img/a.png", "question": "VQAv2?", "answers": [{"answer": "2"}, {"answer": "two"}]}]
    path = tmp_path / "vqa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    assert detect_format(path) == "vqa"
    summary = import_file(store, path, dataset="v")
    assert summary["splits"] == {"train": 2, "val": 1} and summary["images"] == 1
    items = store.items("v")
    assert [(i["source_id"], i["split"], i["answer"]) for i in items] == [
        ("q1", "train", "red"), ("1", "val", "square"), ("2", "train", "2")]
    assert references(items[0]) == ["red", "dark red"] and references(items[2]) == ["2", "two"]
    assert items[1]["gt_box"] is None


def test_reimport_is_refused_but_another_split_is_fine(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "a.png", (40, 30))
    path = write_json(tmp_path / "v.json", [{"image": "a.png", "question": "q?", "answer": "a"}])
    import_file(store, path, "vqa", dataset="v")
    before = snapshot(store)
    with pytest.raises(DataError, match=r"record 0 \(id '0'\) is already in dataset 'v', split 'train'"):
        import_file(store, path, "vqa", dataset="v")
    assert snapshot(store) == before
    assert import_file(store, path, "vqa", dataset="v", split="val")["images"] == 0  # image shared
    assert [i["split"] for i in store.items("v")] == ["train", "val"]


# ---------------------------------------------------------------------- sharegpt ranking

def ranking_record(image: str, question: str, chosen: str, rejected: str, **extra: Any) -> dict[str, Any]:
    return {"conversations": [{"from": "human", "value": f"<image>{question} {BOX_PROMPT}"}],
            "chosen_step": {"from": "gpt", "value": chosen}, "rejected_step": {"from": "gpt", "value": rejected},
            "chosen": {"from": "gpt", "value": "red"}, "rejected": {"from": "gpt", "value": "blue"},
            "images": [image], **extra}


def test_sharegpt_becomes_items_rollouts_and_pending_pairs(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "a.png", (100, 50))
    records = [ranking_record("a.png", "Colour?", "[0.1, 0.3, 0.5, 0.6]", "[0.6, 0.3, 0.9, 0.7]",
                              answer="red", bbox="[0.1, 0.3, 0.5, 0.7]"),
               ranking_record("a.png", "Colour?", "[0.1, 0.3, 0.4, 0.6]", "[0.0, 0.25, 0.2, 0.5]"),
               ranking_record("a.png", "Shape?", "[0.1, 0.3, 0.5, 0.6]", "[0.6, 0.3, 0.9, 0.7]")]
    path = write_json(tmp_path / "rl.json", records)
    assert detect_format(path) == "sharegpt"
    summary = import_file(store, path)
    assert (summary["items"], summary["rollouts"], summary["pairs"]) == (2, 6, 3)
    items = store.items("rl")
    assert [(i["question"], i["answer"]) for i in items] == [("Colour?", "red"), ("Shape?", None)]
    assert store.item_box(items[0]) == Box(10, 5, 50, 45)  # square padding: y offset 25 of 100
    pairs = page_pairs(store, PairFilter(status="pending"), sort="oldest")
    assert count_pairs(store, PairFilter(status="pending")) == 3
    assert [p["item_id"] for p in pairs] == [items[0]["id"], items[0]["id"], items[1]["id"]]
    assert json.loads(pairs[0]["chosen_box"]) == [10.0, 5.0, 50.0, 35.0]
    assert json.loads(pairs[0]["rejected_box"]) == [60.0, 5.0, 90.0, 45.0]
    assert (pairs[0]["chosen_answer"], pairs[0]["rejected_answer"]) == ("red", "blue")
    kinds = {r["kind"] for r in store.rollouts()}
    assert kinds == {"import"}


# ---------------------------------------------------------------------- bad input: all or nothing

def _good(tmp: Path) -> dict[str, Any]:
    save_image(tmp, "ok.png", (100, 80))
    return {"image": "ok.png", "question": "q?", "answer": "a", "box": [10, 10, 50, 50]}


BAD_VQA: list[tuple[str, dict[str, Any], str]] = [
    ("missing image", {"image": "nope.png"}, r"record 1, field 'image': image 'nope.png' not found"),
    ("leaves root", {"image": "../outside.png"}, r"record 1, field 'image': '../outside.png' leaves the images root"),
    ("not an image", {"image": "fake.png"}, r"record 1, field 'image': 'fake.png' is not a readable image"),
    ("inverted box", {"box": [50, 10, 10, 50]}, r"record 1, field 'box': box .* is empty or inverted"),
    ("nan box", {"box": [math.nan, 10, 50, 50]}, r"record 1, field 'box': box .* NaN"),
    ("outside box", {"box": [10, 10, 150, 50]}, r"record 1, field 'box': box .* lies outside the 100x80 image"),
    ("short box", {"box": [10, 10, 50]}, r"record 1, field 'box': a box must be 4 numbers"),
    ("text box", {"box": "left half"}, r"record 1, field 'box': cannot read a box"),
    ("normalized > 1", {"box": [0.1, 0.1, 1.5, 0.5], "box_format": "normalized"}, r"outside \[0, 1\]"),
    ("unknown box format", {"box_format": "yolo"}, r"record 1, field 'box_format': 'yolo' is not one of"),
    ("unknown column", {"bbox": [1, 2, 3, 4]}, r"record 1, field 'bbox': unknown field"),
    ("no answer", {"answer": None}, r"record 1, field 'answer': missing"),
    ("empty question", {"question": " "}, r"record 1, field 'question': must be a non-empty string"),
    ("wrong size", {"width": 10, "height": 10}, r"record 1, field 'width': the record says 10x10"),
    ("duplicate id", {"id": "0"}, r"records 0 and 1 share the id '0'"),
]


@pytest.mark.parametrize("name, change, message", BAD_VQA, ids=[b[0] for b in BAD_VQA])
def test_bad_vqa_record_leaves_store_unchanged(store: Store, tmp_path: Path, name: str,
                                               change: dict[str, Any], message: str) -> None:
    (tmp_path / "fake.png").write_text("not an image")
    (tmp_path.parent / "outside.png").write_bytes((tmp_path / "fake.png").read_bytes())
    first = {**_good(tmp_path), "id": "0"}
    bad = {**_good(tmp_path), "id": "1", **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = write_json(tmp_path / "data.json", [first, bad])
    before = snapshot(store)
    with pytest.raises(DataError, match=message):
        import_file(store, path, "vqa")
    assert snapshot(store) == before


BAD_VISCOT: list[tuple[str, Any, str]] = [
    ("malformed pixel box", lambda r: r.update(image=["ok.png", "ok.png###[1, 2, three, 4]"]),
     r"record 0, field 'image': cannot read a pixel box"),
    ("inverted pixel box", lambda r: r.update(image=["ok.png###[50, 50, 10, 10]"]),
     r"record 0, field 'image': box .* is empty or inverted"),
    ("two images", lambda r: r.update(image=["ok.png", "other.png###[1, 1, 5, 5]"]),
     r"record 0, field 'image': entries name different images"),
    ("three turns", lambda r: r["conversations"].pop(), r"field 'conversations': must be a list of 4 turns"),
    ("bad role", lambda r: r["conversations"][1].update({"from": "human"}), r"field 'conversations\[1\]'"),
    ("bad normalized box", lambda r: (r.update(image="ok.png"), r["conversations"][1].update(value="[0.1, 0.2]")),
     r"field 'conversations\[1\]': a box must be 4 numbers"),
    ("unknown field", lambda r: r.update(bboxes=[]), r"record 0, field 'bboxes': unknown field"),
]


@pytest.mark.parametrize("name, change, message", BAD_VISCOT, ids=[b[0] for b in BAD_VISCOT])
def test_bad_viscot_record(store: Store, tmp_path: Path, name: str, change: Any, message: str) -> None:
    save_image(tmp_path, "ok.png", (100, 80))
    record = viscot_record("ok.png", (100, 80), Box(10, 10, 50, 50))
    change(record)
    before = snapshot(store)
    with pytest.raises(DataError, match=message):
        import_file(store, write_json(tmp_path / "v.json", [record]), "viscot")
    assert snapshot(store) == before


@pytest.mark.parametrize("content, message", [
    ("{not json", r"not JSON"),
    ('{"a": 1}', r"the top level must be a list of records, not dict"),
    ("[1, 2]", r"record 0 is a int, not an object"),
    ("[]", r"no records"),
])
def test_unreadable_files(store: Store, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        import_file(store, path, "vqa")
    assert snapshot(store) == ((0, 0, 0, 0), ())


def test_jsonl_bad_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"image": "a.png", "question": "q"}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl: line 2 is not JSON"):
        read_records(path)


@pytest.mark.parametrize("change, message", [
    ({"chosen_step": {"from": "gpt", "value": "somewhere"}}, r"field 'chosen_step': cannot read a box"),
    ({"rejected_step": {"from": "human", "value": "[0.1, 0.1, 0.2, 0.2]"}}, r"field 'rejected_step': must be a gpt turn"),
    ({"images": ["a.png", "a.png"]}, r"field 'images': must be a list with the one full image"),
    ({"extra": 1}, r"field 'extra': unknown field"),
    ({"conversations": []}, r"field 'conversations': must be one human turn"),
])
def test_bad_sharegpt_record(store: Store, tmp_path: Path, change: dict[str, Any], message: str) -> None:
    save_image(tmp_path, "a.png", (100, 50))
    good = ranking_record("a.png", "Q?", "[0.1, 0.3, 0.5, 0.6]", "[0.6, 0.3, 0.9, 0.7]")
    path = write_json(tmp_path / "rl.json", [good, {**good, **change}])
    with pytest.raises(DataError, match=r"record 1, " + message):
        import_file(store, path, "sharegpt")
    assert snapshot(store) == ((0, 0, 0, 0), ())


def test_failure_inside_the_transaction_removes_placed_images(store: Store, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the images were placed (here: while adding pairs) rolls everything back."""
    import visrl.formats.sharegpt as sharegpt

    def broken(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(sharegpt, "add_pair", broken)
    save_image(tmp_path, "a.png", (100, 50))
    path = write_json(tmp_path / "rl.json", [ranking_record("a.png", "Q?", "[0.1, 0.3, 0.5, 0.6]",
                                                            "[0.6, 0.3, 0.9, 0.7]")])
    with pytest.raises(RuntimeError, match="disk full"):
        import_file(store, path, "sharegpt")
    assert snapshot(store) == ((0, 0, 0, 0), ())


def test_detect_format_refuses_unknown_shapes(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", [{"img": "a.png"}])
    with pytest.raises(DataError, match=r"cannot tell the format from fields \['img'\]; pass --format"):
        detect_format(path)


def test_bad_dataset_name(store: Store, tmp_path: Path) -> None:
    save_image(tmp_path, "a.png", (10, 10))
    path = write_json(tmp_path / "x.json", [{"image": "a.png", "question": "q", "answer": "a"}])
    with pytest.raises(DataError, match="dataset name 'a/b' may only hold"):
        import_file(store, path, "vqa", dataset="a/b")
