"""The loader and the tiny models: built offline, read back through the public loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from visrl.errors import ConfigError, ModelError
from visrl.models import MODEL_FILE, box_format_of, detect_family, load_model, split_adapter
from visrl.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    torch.set_num_threads(1)
    return build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", preset="test", seed=0)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("m3") / "tiny3", preset="test-qwen3", seed=0)


def test_tiny_qwen2_loads_back_through_the_loader(tiny: Path) -> None:
    loaded = load_model(tiny)
    assert (loaded.family, loaded.box_format, loaded.device, loaded.dtype) == ("qwen2_vl", "viscot", "cpu", "float32")
    assert type(loaded.processor).__name__ == "ImageOnlyQwen2VLProcessor"
    assert 400_000 < sum(p.numel() for p in loaded.model.parameters()) < 1_500_000
    assert not loaded.model.training
    # One token per digit: box coordinates are spelled digit by digit.
    ids = loaded.tokenizer.encode("0.123")
    assert [loaded.tokenizer.decode([i]) for i in ids][-3:] == ["1", "2", "3"]


def test_tiny_qwen3_has_vision_positions(tiny3: Path) -> None:
    loaded = load_model(tiny3, dtype="bfloat16")
    assert (loaded.family, loaded.dtype) == ("qwen3_vl", "bfloat16")
    assert loaded.model.config.vision_config.num_position_embeddings == 64
    assert str(next(loaded.model.parameters()).dtype) == "torch.bfloat16"


def test_family_default_box_format_without_pin(tiny: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    (copy / MODEL_FILE).unlink()
    assert box_format_of(copy, "qwen2_vl") == "qwen2"
    assert box_format_of(copy, "qwen2_5_vl") == "qwen2_5"


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "does not exist"),
    ("empty", "has no config.json"),
    ("adapter-only", "it is a LoRA adapter"),
    ("bert", "is a 'bert' model; VisRL supports"),
    ("broken-json", "cannot read"),
])
def test_bad_folders_name_the_folder(tmp_path: Path, setup: str, message: str) -> None:
    folder = tmp_path / "model"
    if setup != "missing":
        folder.mkdir()
    if setup == "adapter-only":
        (folder / "adapter_config.json").write_text("{}")
    if setup == "bert":
        (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    if setup == "broken-json":
        (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=message) as info:
        detect_family(folder)
    assert str(folder) in str(info.value)


def test_adapter_that_does_not_fit_its_base(tiny: Path, tiny3: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    loaded = load_model(tiny3)
    adapter = tmp_path / "adapter3"
    get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["linear_fc1"])).save_pretrained(adapter)
    with pytest.raises(ModelError, match="does not fit the model"):
        load_model(tiny, adapter=adapter)
    with pytest.raises(ModelError, match="not a LoRA adapter"):
        load_model(tiny, adapter=tmp_path)


def test_adapter_folder_given_as_the_model_loads_on_its_base(tiny: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    loaded = load_model(tiny)
    adapter = tmp_path / "lora"
    get_peft_model(loaded.model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tiny)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert split_adapter(adapter, None) == (tiny, adapter)
    again = load_model(adapter)
    assert isinstance(again.model, PeftModel) and again.path == str(tiny) and again.adapter == str(adapter)


def test_unknown_preset_and_dtype(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tiny-model preset 'huge'"):
        build_tiny_model(tmp_path / "x", preset="huge")
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        load_model(tiny, dtype="int3")
