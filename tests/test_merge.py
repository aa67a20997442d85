"""Merging a LoRA adapter: the export loads with transformers and load_model, matches the
adapter's outputs, and generates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from visrl.config import load_config
from visrl.errors import ConfigError, ModelError
from visrl.train.merge import MergeConfig, merge_lora


def test_merge_config_rejects_unknown_keys_and_bad_dtype(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text("model_name_or_path: a\nadapter_name_or_path: b\nexport_dir: c\nexport_dtyp: bf16\n")
    with pytest.raises(ConfigError, match="export_dtyp"):
        load_config(MergeConfig, path)
    with pytest.raises(ConfigError, match="'int8'"):
        MergeConfig("a", "b", "c", export_dtype="int8")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny base and a LoRA adapter on it with non-zero weights (so merging changes the model)."""
    import torch
    torch.set_num_threads(1)
    from peft import LoraConfig, get_peft_model

    from visrl.models import load_model
    from visrl.tiny import build_tiny_model
    from visrl.train.config import LANGUAGE_MODEL_TARGET

    root = tmp_path_factory.mktemp("merge")
    base = Path(build_tiny_model(root / "tiny", preset="test", seed=0))
    loaded = load_model(str(base), dtype="float32", device="cpu")
    model = get_peft_model(loaded.model, LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_MODEL_TARGET))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _inputs(processor: Any) -> dict[str, Any]:
    from PIL import Image

    from visrl.prompts import box_prompt

    text = processor.apply_chat_template(box_prompt("What is red?"), add_generation_prompt=True,
                                         tokenize=False)
    return processor(images=[Image.new("RGB", (56, 56), "red")], text=[text], return_tensors="pt")


@pytest.mark.slow
def test_merged_model_matches_the_adapter_and_generates(adapter: tuple[Path, Path], store: Any) -> None:
    import torch
    from transformers import AutoModelForImageTextToText

    from visrl.models import load_model

    base, adapter_dir = adapter
    cfg = MergeConfig(str(base), str(adapter_dir), "models/merged", export_dtype="float32")
    out = merge_lora(store.workspace, cfg)
    assert out == store.workspace.models_dir / "merged"
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()

    with_adapter = load_model(str(base), adapter=str(adapter_dir), dtype="float32", device="cpu")
    plain = AutoModelForImageTextToText.from_pretrained(out)  # loads with no VisRL code at all
    merged = load_model(str(out), dtype="float32", device="cpu")
    inputs = _inputs(merged.processor)
    with torch.no_grad():
        expected = with_adapter.model(**inputs).logits
        base_logits = load_model(str(base), dtype="float32", device="cpu").model(**inputs).logits
        assert torch.allclose(plain(**inputs).logits, expected, atol=1e-4)
        assert torch.allclose(merged.model(**inputs).logits, expected, atol=1e-4)
        assert not torch.allclose(base_logits, expected, atol=1e-3)  # the adapter mattered
        generated = merged.model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4
    [record] = store.checkpoints()
    assert record["path"] == "models/merged" and record["stage"] == "merged"


def test_merge_refuses_a_folder_without_an_adapter(store: Any, tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "notadapter").mkdir()
    cfg = MergeConfig(str(tmp_path / "base"), str(tmp_path / "notadapter"), "models/x")
    with pytest.raises(ModelError, match="adapter_config.json"):
        merge_lora(store.workspace, cfg)


@pytest.mark.slow
def test_merge_a_hub_cached_base_and_refuse_the_wrong_base(adapter: tuple[Path, Path], store: Any,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """model_name_or_path may be a Hub id in the local cache (the real configs' default); the
    merged model is a new model, so the adapter is refused on it, naming both."""
    from huggingface_hub import constants
    from test_models import fake_hub_cache

    from visrl.models import load_model

    base, adapter_dir = adapter
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    fake_hub_cache(tmp_path / "hub", "tiny-org/Tiny-VL", base)
    out = merge_lora(store.workspace, MergeConfig("tiny-org/Tiny-VL", str(adapter_dir), "models/merged-hub"))
    assert load_model(str(out)).family == "qwen2_vl"
    [record] = store.checkpoints()
    assert record["base"] == "tiny-org/Tiny-VL"
    with pytest.raises(ModelError, match=f"trained on {base}, not on {out}"):
        load_model(str(out), adapter=str(adapter_dir))


@pytest.mark.slow
def test_generation_merges_the_adapter_in_memory_with_the_same_outputs(adapter: tuple[Path, Path]) -> None:
    from peft import PeftModel
    from PIL import Image

    from visrl.models import load_model
    from visrl.reasoning import Reasoner, Sampling
    from visrl.train.merge import merge_reasoner_adapter

    base, lora = adapter
    images, questions = [Image.new("RGB", (56, 56), c) for c in ("red", "blue")], ["What is red?"] * 2
    greedy = Sampling(temperature=0.0, max_new_tokens=12)
    unmerged = Reasoner(load_model(str(base), adapter=str(lora), dtype="float32", device="cpu"))
    assert isinstance(unmerged.model, PeftModel)
    expected = unmerged.two_step(images, questions, greedy)
    merged = Reasoner(load_model(str(base), adapter=str(lora), dtype="float32", device="cpu"))
    assert merge_reasoner_adapter(merged)
    assert not isinstance(merged.model, PeftModel) and merged.model is merged.loaded.model
    assert not any("lora_" in name for name, _ in merged.model.named_parameters())
    got = merged.two_step(images, questions, greedy)
    assert [(r[0].box_text, r[0].answer) for r in got] == [(r[0].box_text, r[0].answer) for r in expected]
    assert not merge_reasoner_adapter(merged)  # nothing left to merge


# ---------------------------------------------------------------------- exports are stock folders

# Run in a fresh interpreter that can import transformers but not visrl (the editable install's
# finder is removed and any visrl import fails), as a user of the exported model would load it.
STOCK_LOADER = r'''
import json, sys, warnings
sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]


class NoVisRL:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("visrl", "visrl_app"):
            raise ImportError(f"{name} imported by a stock load")


sys.meta_path.insert(0, NoVisRL())
warnings.simplefilter("ignore")
import numpy as np
import transformers
from PIL import Image
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

image = Image.fromarray(np.arange(150 * 200 * 3, dtype=np.uint8).reshape(150, 200, 3) % 251)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]}]
report = {}
for folder in sys.argv[1:]:
    declared = {}
    for name in ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json"):
        try:
            declared[name] = json.load(open(f"{folder}/{name}")).get("processor_class")
        except FileNotFoundError:
            declared[name] = "absent"
    try:
        processor = AutoProcessor.from_pretrained(folder)
        auto = type(processor).__name__
        auto_has_images = getattr(processor, "image_processor", None) is not None
    except Exception as exc:  # no torchvision: the stock Qwen processors cannot be built
        auto, auto_has_images = f"error {type(exc).__name__}", None
    image_processor = AutoImageProcessor.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = json.load(open(f"{folder}/chat_template.json"))["chat_template"] if (
        __import__("os").path.exists(f"{folder}/chat_template.json")) else tokenizer.chat_template
    report[folder] = {
        "declared": declared, "auto_processor": auto, "auto_has_images": auto_has_images,
        "stock_class": all(hasattr(transformers, c) for c in declared.values() if c and c != "absent"),
        "image_processor": type(image_processor).__name__,
        "image_grid_thw": image_processor(images=[image], return_tensors="np")["image_grid_thw"].tolist(),
        "tokenizer": type(tokenizer).__name__,
        "prompt": tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                add_generation_prompt=True),
    }
report["visrl imported"] = any(m.split(".")[0] == "visrl" for m in sys.modules)
print(json.dumps(report))
'''


def stock_load(*folders: Path) -> dict[str, Any]:
    """What plain transformers makes of each folder (see STOCK_LOADER), in a clean subprocess."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-I", "-c", STOCK_LOADER, *map(str, folders)], capture_output=True,
                          text=True, env=env, cwd=folders[0].parent, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _adapter_on(base: Path, out: Path) -> Path:
    """A LoRA adapter with non-zero weights on ``base``, recorded as training records it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from visrl.models import load_model, write_model_info
    from visrl.train.config import LANGUAGE_MODEL_TARGET

    loaded = load_model(str(base), dtype="float32", device="cpu")
    model = get_peft_model(loaded.model, LoraConfig(r=2, lora_alpha=4, target_modules=LANGUAGE_MODEL_TARGET))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    write_model_info(out, loaded.contract, base=base)
    return out


@pytest.mark.slow
def test_merged_folders_load_with_plain_transformers_as_their_base(store: Any, tmp_path: Path) -> None:
    """Every family: the merge holds the base's processor files, so transformers alone (no visrl,
    no torchvision here) declares, builds and runs the same processor on it as on the base. With
    torchvision, AutoProcessor builds the stock class for both; without it, it fails alike for
    both, and the image processor the folder names is compared instead."""
    import torch

    from visrl.models import FAMILIES, load_model
    from visrl.tiny import HUB_PROCESSOR_CLASS, build_tiny_model, to_hub_layout
    from visrl.train.config import TrainConfig
    from visrl.train.lora import load_train_model, save_merged_base

    torch.set_num_threads(1)
    folders: list[tuple[str, Path, Path]] = []
    for preset, family in (("test", "qwen2_vl"), ("test-qwen2_5", "qwen2_5_vl"), ("test-qwen3", "qwen3_vl")):
        base = to_hub_layout(build_tiny_model(tmp_path / family, preset=preset))  # as the Hub lays it out
        adapter = _adapter_on(base, tmp_path / f"{family}-lora")
        merged = merge_lora(store.workspace, MergeConfig(str(base), str(adapter), f"models/{family}-merged",
                                                         export_dtype="float32", register=False))
        folders.append((family, base, merged))
        assert type(load_model(merged).processor).__name__.endswith(FAMILIES[family].processor_class)
    # The merged base a later stage writes (OUTPUT/base) is an export too.
    family, base, _ = folders[1]
    cfg = TrainConfig(stage="dpo", model_name_or_path=str(base), output_dir=str(tmp_path / "run"))
    tm = load_train_model(cfg, str(base), str(tmp_path / f"{family}-lora"))
    save_merged_base(tm, tmp_path / "run" / "base")
    folders.append((family, base, tmp_path / "run" / "base"))

    report = stock_load(*{p for _, base, merged in folders for p in (base, merged)})
    assert report.pop("visrl imported") is False
    for family, base, merged in folders:
        got, want = report[str(merged)], report[str(base)]
        assert got == want, merged
        assert got["declared"]["preprocessor_config.json"] == HUB_PROCESSOR_CLASS[family]
        assert got["stock_class"] and got["auto_has_images"] in (True, None), got
        assert got["image_processor"].startswith("Qwen2VLImageProcessor")
        assert got["image_grid_thw"][0][0] == 1 and "<|image_pad|>" in got["prompt"]
