"""CLI: `visrl models build-tiny|info`, `visrl infer` (text and JSON), `visrl serve` refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from visrl.cli import _register, cli, main

_register()


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace folder holding models/tiny, built through the CLI once for the module."""
    import torch

    torch.set_num_threads(1)
    ws = tmp_path_factory.mktemp("ws")
    result = CliRunner().invoke(cli, ["models", "build-tiny", str(ws / "models" / "tiny"), "--preset", "test"])
    assert result.exit_code == 0, result.output
    assert "built a tiny qwen2_vl model (" in result.output and "boxes as viscot" in result.output
    return ws


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    image = Image.new("RGB", (140, 84), "white")
    ImageDraw.Draw(image).ellipse((20, 20, 60, 60), fill="red")
    path = tmp_path / "scene.png"
    image.save(path)
    return path


def test_models_info(tiny_ws: Path) -> None:
    result = CliRunner().invoke(cli, ["models", "info", str(tiny_ws / "models" / "tiny"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["family"] == "qwen2_vl" and info["box_format"] == "viscot" and info["adapter"] is None
    assert 100_000 < info["parameters"] < 5_000_000
    assert (info["min_pixels"], info["max_pixels"]) == (56 * 56, 112 * 112)  # the tiny processor's budget
    text = CliRunner().invoke(cli, ["models", "info", str(tiny_ws / "models" / "tiny")]).stdout
    assert "family: qwen2_vl" in text and f"parameters: {info['parameters']:,}" in text and "box format: viscot" in text


def test_infer_json(tiny_ws: Path, image_file: Path, tmp_path: Path) -> None:
    crop = tmp_path / "out" / "crop.png"
    crop.parent.mkdir()
    result = CliRunner().invoke(cli, [
        "infer", "--model", "models/tiny", "--workspace", str(tiny_ws), "--image", str(image_file),
        "--question", "What colour is the circle?", "--json", "--crop-out", str(crop), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got["model"] == str(tiny_ws / "models" / "tiny") and got["box_format"] == "viscot"
    assert got["question"] == "What colour is the circle?" and got["image_size"] == [140, 84]
    assert isinstance(got["box_text"], str) and isinstance(got["answer"], str)
    assert got["crop"] == str(crop) and Image.open(crop).size == tuple(got["crop_size"])
    if got["box"] is None:  # an untrained model rarely writes a box: the answer saw the whole image
        assert got["crop_size"] == [140, 84]
    else:
        x1, y1, x2, y2 = got["box"]
        assert 0 <= x1 < x2 <= 140 and 0 <= y1 < y2 <= 84
    assert set(got["timings"]) == {"box_s", "answer_s"}


def test_infer_text_with_config_and_default_crop(tiny_ws: Path, image_file: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "infer.yaml"
    config.write_text(f"model_name_or_path: {tiny_ws / 'models' / 'tiny'}\nmax_new_tokens: 6\ndevice: cpu\n")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["infer", "--config", str(config), "--image", str(image_file),
                                      "--question", "What colour?"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["box", "crop", "answer"]
    assert lines[1].startswith("crop: scene-crop.png (") and (tmp_path / "scene-crop.png").is_file()


@pytest.mark.parametrize("args, message", [
    (["infer", "--model", "{tmp}/not-a-model", "--image", "{image}", "--question", "q"],
     "Error: model '{tmp}/not-a-model' not found: tried folder {tmp}/not-a-model."),
    (["infer", "--model", "{tmp}", "--image", "{image}", "--question", "q"],
     "Error: {tmp} is not a model folder: it has no config.json"),
    (["infer", "--image", "{image}", "--question", "q"], "Error: name the model: --model PATH"),
    # the image is read (upright, within 64 M pixels) before any model loads: its error comes first
    (["infer", "--model", "{tmp}/not-a-model", "--image", "{this}", "--question", "q"],
     "Error: --image {this}: not a readable image"),
    (["models", "info", "{tmp}/nothing"], "Error: model '{tmp}/nothing' not found: tried folder {tmp}/nothing."),
    (["models", "build-tiny", "{tmp}/x", "--preset", "huge"], "Invalid value for '--preset'"),
    (["serve", "{tmp}/missing.yaml"], "Error: config file not found: {tmp}/missing.yaml"),
])
def test_errors_are_one_line(args: list[str], message: str, image_file: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    fill = {"tmp": str(tmp_path), "image": str(image_file), "this": __file__}  # this file: not an image
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(**fill) for a in args])
    assert exit_info.value.code in (1, 2)
    err = capsys.readouterr().err
    assert message.format(**fill) in err and "Traceback" not in err


def test_serve_refuses_public_host_without_key(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VISRL_API_KEY", raising=False)
    config = tmp_path / "serve.yaml"
    config.write_text("model_name_or_path: models/none\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", str(config), "--host", "0.0.0.0", "--port", "8123"])
    assert exit_info.value.code == 1
    assert "Error: host 0.0.0.0 is reachable from other machines: set api_key" in capsys.readouterr().err


def test_every_command_has_help() -> None:
    for args in (["models", "build-tiny"], ["models", "info"], ["infer"], ["serve"]):
        result = CliRunner().invoke(cli, [*args, "--help"])
        assert result.exit_code == 0 and len(result.output.splitlines()) > 4, args


@pytest.mark.slow
def test_models_info_finds_a_hub_id_under_hf_home(tiny_ws: Path, tmp_path: Path) -> None:
    """A fresh process honours HF_HOME (cache = $HF_HOME/hub) as transformers does; offline."""
    import os
    import subprocess
    import sys

    from test_models import fake_hub_cache

    snapshot = fake_hub_cache(tmp_path / "home" / "hub", "tiny-org/Tiny-VL", tiny_ws / "models" / "tiny")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "visrl", "models", "info", "tiny-org/Tiny-VL", "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout[done.stdout.index("{"):])
    assert (info["path"], info["hub_id"], info["family"]) == (str(snapshot), "tiny-org/Tiny-VL", "qwen2_vl")
