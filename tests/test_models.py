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
    with pytest.raises(ModelError, match=f"trained on {tiny3}, not on {tiny}"):  # its recorded base
        load_model(tiny, adapter=adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    with pytest.raises(ModelError, match="does not fit the model"):  # no record: the shapes tell
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


# ---------------------------------------------------------------------- Hub ids in the local cache

def fake_hub_cache(cache: Path, repo_id: str, model: Path, sha: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``model`` out as huggingface_hub caches a download: ``models--org--name/snapshots/<sha>/``
    and ``refs/main`` holding the sha (files as plain copies; the real cache links to blobs/)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = Path(shutil.copytree(model, repo / "snapshots" / sha))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import; the env is for children
    return cache


def test_hub_id_resolves_from_the_local_cache_offline(tiny: Path, hub_cache: Path, tmp_path: Path) -> None:
    from visrl.models import locate_model
    from visrl.policy import resolve_model_path
    from visrl.workspace import Workspace

    snapshot = fake_hub_cache(hub_cache, "tiny-org/Tiny-VL", tiny)
    source = locate_model("tiny-org/Tiny-VL")
    assert (source.path, source.hub_id, source.label) == (snapshot, "tiny-org/Tiny-VL", "tiny-org/Tiny-VL")
    loaded = load_model("tiny-org/Tiny-VL")
    assert (loaded.path, loaded.hub_id, loaded.family) == (str(snapshot), "tiny-org/Tiny-VL", "qwen2_vl")
    # A workspace-relative lookup leaves a name that is no folder for the cache to answer.
    ws = Workspace.open(tmp_path / "ws")
    assert resolve_model_path(ws, "tiny-org/Tiny-VL") == "tiny-org/Tiny-VL"
    assert locate_model("tiny-org/Tiny-VL", root=ws.root).path == snapshot


def test_unknown_model_names_everything_tried(hub_cache: Path, tmp_path: Path) -> None:
    from visrl.models import locate_model

    with pytest.raises(ModelError) as info:
        locate_model("Qwen/Qwen2.5-VL-7B-Instruct", root=tmp_path)
    message = str(info.value)
    assert "folder Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert f"folder {tmp_path / 'Qwen/Qwen2.5-VL-7B-Instruct'}" in message
    assert f"Hub id 'Qwen/Qwen2.5-VL-7B-Instruct' in the local cache {hub_cache}" in message
    with pytest.raises(ModelError, match=r"tried folder missing\. Give a model folder"):
        locate_model("./missing")  # a path, not an id: the cache is not asked


# ---------------------------------------------------------------------- adapters on the right base

def _adapter(loaded_model: object, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    get_peft_model(loaded_model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(out)
    return out


def test_adapter_on_another_base_is_refused_with_both_names(tiny: Path, tmp_path: Path) -> None:
    from visrl.contract import TwoStepContract
    from visrl.models import copy_model_info, write_model_info

    merged = Path(shutil.copytree(tiny, tmp_path / "stage1-merged"))
    copy_model_info(tiny, merged)  # a merged base is a new model: its own model_id
    adapter = _adapter(load_model(merged).model, tmp_path / "stage2")
    write_model_info(adapter, TwoStepContract(crop_margin=0.1), base=merged)  # what training records
    with pytest.raises(ModelError, match=f"adapter {adapter} was trained on {merged}, not on {tiny}"):
        load_model(tiny, adapter=adapter)
    loaded = load_model(merged, adapter=adapter)
    assert loaded.adapter == str(adapter) and loaded.contract.crop_margin == 0.1
    again = load_model(adapter)  # an adapter given as the model loads on its recorded base
    assert again.path == str(merged)
    # peft's own record is checked too; a copy of a plain base folder is the same model
    plain = _adapter(load_model(tiny).model, tmp_path / "plain")
    copy = Path(shutil.copytree(tiny, tmp_path / "copy"))
    assert load_model(copy, adapter=plain).adapter == str(plain)
    with pytest.raises(ModelError, match=f"trained on {tiny}, not on {merged}"):
        load_model(merged, adapter=plain)


def test_adapter_recorded_with_a_hub_id(tiny: Path, hub_cache: Path, tmp_path: Path) -> None:
    snapshot = fake_hub_cache(hub_cache, "tiny-org/Tiny-VL", tiny)
    adapter = _adapter(load_model("tiny-org/Tiny-VL").model, tmp_path / "lora")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "tiny-org/Tiny-VL"}))
    assert load_model(snapshot, adapter=adapter).hub_id is None  # the snapshot folder is that model
    assert load_model(adapter).hub_id == "tiny-org/Tiny-VL"
    other = Path(shutil.copytree(tiny, tmp_path / "other"))
    from visrl.models import copy_model_info

    copy_model_info(tiny, other)
    with pytest.raises(ModelError, match=f"trained on tiny-org/Tiny-VL, not on {other}"):
        load_model(other, adapter=adapter)


# ---------------------------------------------------------------------- the image budget

GRID_IMAGE = (1280, 960)


@pytest.mark.parametrize(("family", "tokens", "factor", "grid"), [
    # 640 visual tokens: smart_resize of 960x1280 under 640 x 28^2 px -> 588x812 -> 42x58 patches of 14
    ("qwen2_vl", 640, 28, [1, 42, 58]),
    ("qwen2_5_vl", 640, 28, [1, 42, 58]),
    # Qwen3-VL: 16 px patches, 32 px per token -> 672x928 -> 42x58 patches of 16
    ("qwen3_vl", 640, 32, [1, 42, 58]),
])
def test_image_budget_sets_the_grid_on_every_family(family: str, tokens: int, factor: int, grid: list[int],
                                                    tiny: Path, tiny3: Path, tmp_path: Path) -> None:
    from PIL import Image

    from visrl.contract import TwoStepContract
    from visrl.models import load_processor

    folder = tiny3 if family == "qwen3_vl" else tiny
    if family == "qwen2_5_vl":  # the Qwen2.5-VL processor class over the tiny files
        folder = Path(shutil.copytree(tiny, tmp_path / "tiny25"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "qwen2_5_vl"}))
    processor = load_processor(folder, family)
    assert type(processor).__name__.endswith({"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                                             "qwen3_vl": "Qwen3VLProcessor"}[family])
    image = Image.new("RGB", GRID_IMAGE)

    def grid_of() -> list[int]:
        text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]}], tokenize=False)
        return processor(text=[text], images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()

    before = grid_of()  # the tiny processors' own budget: a few tokens
    contract = TwoStepContract(image_max_pixels=tokens * factor * factor, image_min_pixels=factor * factor * 4)
    contract.apply_budget(processor)
    assert grid_of() == grid and grid != before
    assert grid[1] * grid[2] // 4 <= tokens  # 2x2 patches per visual token
    bound = contract.bound_to(processor)
    assert bound.resize_factor == factor and bound.image_max_pixels == tokens * factor * factor


def test_load_model_applies_the_checkpoint_and_config_budget(tiny: Path, tmp_path: Path) -> None:
    from PIL import Image

    from visrl.contract import TwoStepContract
    from visrl.models import write_model_info

    capped = Path(shutil.copytree(tiny, tmp_path / "capped"))
    write_model_info(capped, TwoStepContract(image_max_pixels=640 * 28 * 28))  # as training writes it
    loaded = load_model(capped)
    image = Image.new("RGB", GRID_IMAGE)
    assert loaded.processor.image_processor(images=[image])["image_grid_thw"][0].tolist() == [1, 42, 58]
    assert loaded.contract.input_size(GRID_IMAGE) == (58 * 14, 42 * 14)
    overridden = load_model(capped, overrides={"image_max_pixels": 1280 * 28 * 28})  # a config key wins
    assert overridden.processor.image_processor(images=[image])["image_grid_thw"][0].tolist() == [1, 60, 82]


def test_checkpoint_contract_reads_records_without_loading(tiny: Path, tmp_path: Path) -> None:
    from visrl.contract import TwoStepContract
    from visrl.models import checkpoint_contract, write_model_info

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny)}))
    write_model_info(adapter, TwoStepContract(box_format="qwen2_5", crop_margin=0.2, image_max_pixels=640 * 28 * 28),
                     base=tiny)
    contract = checkpoint_contract(adapter)  # the adapter on its recorded base
    assert (contract.box_format, contract.crop_margin, contract.image_max_pixels) == ("qwen2_5", 0.2, 640 * 28 * 28)
    assert contract.image_min_pixels == 56 * 56 and contract.resize_factor == 28  # the tiny processor's
    assert contract.input_size(GRID_IMAGE) == (58 * 14, 42 * 14)
    assert checkpoint_contract(tiny, overrides={"box_format": "qwen3"}).box_format == "qwen3"


def test_training_record_points_peft_at_the_real_base(tiny: Path, tmp_path: Path) -> None:
    from visrl.contract import TwoStepContract
    from visrl.models import copy_model_info, write_model_info

    merged = Path(shutil.copytree(tiny, tmp_path / "base"))
    copy_model_info(tiny, merged)
    adapter = _adapter(load_model(tiny).model, tmp_path / "stage2")  # peft records the raw base
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny)
    write_model_info(adapter, TwoStepContract(), base=merged)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(merged)


def test_a_workspace_folder_wins_over_the_current_directory(tiny: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.models import locate_model

    ws, cwd = tmp_path / "ws", tmp_path / "cwd"
    (ws / "models").mkdir(parents=True)
    (cwd / "models").mkdir(parents=True)
    shutil.copytree(tiny, ws / "models" / "m")
    shutil.copytree(tiny, cwd / "models" / "m")
    monkeypatch.chdir(cwd)
    assert locate_model("models/m", root=ws).path == ws / "models" / "m"
    assert locate_model("models/m").path == Path("models/m")


# ---------------------------------------------------------------------- adapters bound to revisions

def test_weights_swapped_inside_the_same_snapshot_are_refused_naming_both(
        tiny: Path, hub_cache: Path, tmp_path: Path, store: object) -> None:
    """The base is named by a Hub id whose snapshot keeps its name and revision while its weights
    change: the adapter's record (revision + weights fingerprint) refuses it, at load and merge."""
    from visrl.contract import TwoStepContract
    from visrl.model_files import weights_fingerprint
    from visrl.models import write_model_info
    from visrl.train.merge import MergeConfig, merge_lora

    sha = "0123456789abcdef0123456789abcdef01234567"
    snapshot = fake_hub_cache(hub_cache, "tiny-org/Tiny-VL", tiny, sha=sha)
    adapter = _adapter(load_model("tiny-org/Tiny-VL").model, tmp_path / "lora")
    write_model_info(adapter, TwoStepContract(), base="tiny-org/Tiny-VL")  # what training records
    record = json.loads((adapter / MODEL_FILE).read_text())["base"]
    trained = weights_fingerprint(tiny)
    assert (record["revision"], record["weights_fingerprint"]) == (sha, trained)
    assert load_model("tiny-org/Tiny-VL", adapter=adapter).adapter == str(adapter)

    other = build_tiny_model(tmp_path / "other", preset="test", seed=1)  # same shapes, other values
    shutil.copyfile(other / "model.safetensors", snapshot / "model.safetensors")
    swapped = weights_fingerprint(snapshot)
    both = (f"trained on tiny-org/Tiny-VL at revision {sha[:12]} with weights {trained[:12]}, but "
            f"tiny-org/Tiny-VL now holds revision {sha[:12]} with weights {swapped[:12]}")
    with pytest.raises(ModelError, match=both):
        load_model("tiny-org/Tiny-VL", adapter=adapter)
    with pytest.raises(ModelError, match=both):
        merge_lora(store.workspace, MergeConfig("tiny-org/Tiny-VL", str(adapter), "models/merged"))
    # A new revision with the adapter's weights again is accepted: the weights are what count.
    newer = "fedcba9876543210fedcba9876543210fedcba98"
    shutil.copytree(tiny, snapshot.parent / newer)
    (snapshot.parent.parent / "refs" / "main").write_text(newer)
    assert load_model("tiny-org/Tiny-VL", adapter=adapter).path.endswith(newer)


def test_an_adapter_recorded_without_a_fingerprint_loads_with_a_warning_naming_it(
        tiny: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from visrl.contract import TwoStepContract
    from visrl.models import write_model_info

    adapter = _adapter(load_model(tiny).model, tmp_path / "legacy")
    write_model_info(adapter, TwoStepContract(), base=tiny)
    record = json.loads((adapter / MODEL_FILE).read_text())
    for key in ("revision", "weights_fingerprint"):  # as VisRL recorded bases before it kept these
        del record["base"][key]
    (adapter / MODEL_FILE).write_text(json.dumps(record))
    with caplog.at_level("WARNING", logger="visrl.models"):
        assert load_model(tiny, adapter=adapter).adapter == str(adapter)
    assert f"adapter {adapter} records no weights fingerprint of its base {tiny}" in caplog.text
