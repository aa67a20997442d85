"""What a model folder holds: the weights fingerprint, the Hub revision, the processor files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from visrl.errors import ModelError
from visrl.model_files import copy_processor_files, hub_revision, weights_fingerprint


def _save(path: Path, tensors: dict[str, list[float]]) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({k: torch.tensor(v) for k, v in tensors.items()}, str(path))


WEIGHTS = {"a.weight": [float(i) for i in range(100)], "b.bias": [0.5] * 40}


def test_fingerprint_reads_content_not_names_or_times(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    _save(one / "model.safetensors", WEIGHTS)
    shutil.copytree(one, two)
    os.utime(two / "model.safetensors", (1, 1))  # a copy: same bytes, another mtime
    assert weights_fingerprint(one) == weights_fingerprint(two) and len(weights_fingerprint(one)) == 64
    # Same names, shapes and file size; one tensor's values retrained: another fingerprint.
    _save(two / "model.safetensors", {**WEIGHTS, "b.bias": [0.25] * 40})
    assert (two / "model.safetensors").stat().st_size == (one / "model.safetensors").stat().st_size
    assert weights_fingerprint(two) != weights_fingerprint(one)
    # The middle of a long tensor is sampled too (an edit between the samples would go unseen).
    middle = [float(i) for i in range(100)]
    middle[50] = -1.0
    _save(two / "model.safetensors", {**WEIGHTS, "a.weight": middle})
    assert weights_fingerprint(two) != weights_fingerprint(one)
    assert weights_fingerprint(tmp_path / "missing") is None


def test_fingerprint_covers_every_shard_and_bin_files(tmp_path: Path) -> None:
    _save(tmp_path / "model-00001-of-00002.safetensors", WEIGHTS)
    _save(tmp_path / "model-00002-of-00002.safetensors", {"c.weight": [1.0] * 8})
    before = weights_fingerprint(tmp_path)
    _save(tmp_path / "model-00002-of-00002.safetensors", {"c.weight": [2.0] * 8})
    assert weights_fingerprint(tmp_path) != before
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "pytorch_model.bin").write_bytes(bytes(range(256)) * 64)
    first = weights_fingerprint(legacy)
    (legacy / "pytorch_model.bin").write_bytes(bytes(reversed(range(256))) * 64)
    assert first is not None and weights_fingerprint(legacy) != first


def test_hub_revision_is_the_snapshot_hash(tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--name" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert hub_revision(snapshot) == "abc123"
    assert hub_revision(tmp_path / "models--org--name") is None


def test_processor_files_are_copied_as_the_base_has_them(tmp_path: Path) -> None:
    base, blobs, out = tmp_path / "base", tmp_path / "blobs", tmp_path / "out"
    base.mkdir()
    blobs.mkdir()
    (blobs / "pre").write_text('{"processor_class": "Qwen2_5_VLProcessor"}')
    (base / "preprocessor_config.json").symlink_to(blobs / "pre")  # the Hub cache links to blobs
    (base / "tokenizer.json").write_text("{}")
    (base / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (base / "README.md").write_text("not a processor file")
    out.mkdir()
    (out / "processor_config.json").write_text('{"processor_class": "ImageOnlyQwen2_5_VLProcessor"}')
    copied = copy_processor_files(base, out)
    assert copied == ["preprocessor_config.json", "tokenizer.json", "chat_template.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(copied)  # an earlier export's file is gone
    assert not (out / "preprocessor_config.json").is_symlink()
    assert json.loads((out / "preprocessor_config.json").read_text())["processor_class"] == "Qwen2_5_VLProcessor"
    (base / "preprocessor_config.json").unlink()
    with pytest.raises(ModelError, match="no preprocessor_config.json or processor_config.json"):
        copy_processor_files(base, out)
