"""The data commands: import, export, datasets, stats, demo (click's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image

from visrl.boxes import crop_box
from visrl.cli import _register, cli, main
from visrl.store import Store
from visrl.synthetic import SyntheticConfig, write_benchmark

DATA_COMMANDS = ("import", "export", "datasets", "stats", "demo")


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    _register()


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def bench(tmp_path: Path) -> dict[str, Path]:
    cfg = SyntheticConfig(n_train=3, n_val=1, n_test=1, detail="dot_colour", object_size=(80, 96))
    return write_benchmark(tmp_path / "bench", cfg)


@pytest.mark.parametrize("command", DATA_COMMANDS)
def test_every_data_command_has_help(command: str) -> None:
    result = run(command, "--help")
    assert "--workspace" in result.output
    assert cli.commands[command].help and len(cli.commands[command].help.split()) >= 4


@pytest.mark.parametrize("form", [
    ["import", "{train}", "--format", "viscot"],
    ["import", "viscot", "{train}"],
    ["import", "{train}"],  # auto
])
def test_import_forms(tmp_path: Path, bench: dict[str, Path], form: list[str]) -> None:
    ws = str(tmp_path / "w")
    args = [a.format(train=bench["train"]) for a in form]
    result = run(*args, "--dataset", "demo", "--workspace", ws)
    assert result.output.strip() == "imported 3 items (3 train) into dataset 'demo' as viscot; 3 new images"
    stats = json.loads(run("stats", "--json", "-w", ws).output)
    assert stats["datasets"]["demo"]["items"] == {"train": 3}


def test_import_export_datasets_stats(tmp_path: Path, bench: dict[str, Path]) -> None:
    ws = str(tmp_path / "w")
    for split in ("train", "val"):
        run("import", str(bench[split]), "-d", "demo", "--split", split, "-w", ws)
    assert run("datasets", "-w", ws).output.split()[:3] == ["demo", "viscot", "4"]
    text = run("stats", "-w", ws).output
    assert "demo: items train 3, val 1; rollouts 0; pairs pending 0, accepted 0, rejected 0" in text
    out = tmp_path / "sft"
    result = run("export", "trl-sft", str(out), "-w", ws)
    assert result.output.strip() == f"exported 3 rows as trl-sft to {out}"
    result = run("export", "--format", "trl-sft", "--out", str(tmp_path / "sft2"), "--split", "val", "-w", ws)
    assert result.output.startswith("exported 1 rows")
    result = run("export", "trl-sft", "-w", ws)  # default folder under exports/
    assert f"to {Path(ws).resolve() / 'exports'}/trl-sft-" in result.output


def test_errors_are_one_line_with_exit_1(tmp_path: Path, bench: dict[str, Path],
                                         capsys: pytest.CaptureFixture[str]) -> None:
    ws = str(tmp_path / "w")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "missing.png", "question": "q", "answer": "a"}]))
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(bad), "-w", ws])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err == (f"Error: bad.json: record 0, field 'image': image 'missing.png' not found under "
                   f"{tmp_path}; fix the path or pass --images-root\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--format", "trl-dpo", "--out", str(tmp_path / "o"), "-w", ws])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "Error: nothing to export: no pairs with status accepted (and boxes on both sides)\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["stats", "-w", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 1 and "no workspace at" in capsys.readouterr().err


def test_import_stores_a_phone_photo_upright(tmp_path: Path) -> None:
    """A PNG with EXIF orientation 6 (a phone held upright) and a VQA box drawn on the photo as a
    viewer shows it: stored upright, losslessly (the same pixels), the box cropping the marker."""
    upright = Image.new("RGB", (60, 40), (20, 40, 220))
    upright.paste((230, 20, 20), (6, 4, 18, 12))
    exif = Image.Exif()
    exif[0x0112] = 6  # a viewer turns the stored pixels 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif)
    record = {"image": "phone.png", "question": "q?", "answer": "a", "box": [0.1, 0.1, 0.3, 0.3],
              "box_format": "normalized"}
    (tmp_path / "d.json").write_text(json.dumps([record]))
    ws = tmp_path / "w"
    assert "1 new images" in run("import", "vqa", str(tmp_path / "d.json"), "-w", str(ws)).output
    store = Store.open(ws)
    [item] = store.items("d")
    assert (item["width"], item["height"]) == (60, 40) and item["image"].endswith(".png")
    with Image.open(store.workspace.absolute(item["image"])) as stored:
        assert stored.getexif().get(0x0112) is None
        assert stored.convert("RGB").tobytes() == upright.tobytes()
        assert crop_box(stored.convert("RGB"), store.item_box(item)).tobytes() == upright.crop((6, 4, 18, 12)).tobytes()


@pytest.mark.parametrize("args, message", [
    (["import"], "give the file to import"),
    (["import", "csv", "x.json"], "unknown format 'csv'"),
    (["export", "out"], "give the format"),
    (["export", "trl-dpo", "a", "b"], "expected [FORMAT] OUT"),
])
def test_usage_errors(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and message in result.output


def test_demo_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import visrl.demo as demo

    calls: list[dict[str, Any]] = []

    def fake(root: Path, force: bool, n_pairs_items: int, progress: Any) -> Path:
        calls.append({"root": root, "force": force, "n": n_pairs_items})
        progress("building")
        return root

    monkeypatch.setattr(demo, "create_demo_workspace", fake)
    result = run("demo", "-w", str(tmp_path / "d"), "--force", "--pairs-items", "3")
    assert calls == [{"root": (tmp_path / "d").resolve(), "force": True, "n": 3}]
    assert f"demo workspace: {(tmp_path / 'd').resolve()}" in result.output
