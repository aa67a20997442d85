"""ContractFields: the contract keys the generate/eval, infer and train configs share."""

from __future__ import annotations

from dataclasses import fields

import pytest

from visrl.contract import TwoStepContract
from visrl.contract_fields import CONTRACT_KEYS, ContractFields
from visrl.errors import ConfigError
from visrl.evaluate import EvalConfig
from visrl.generate import GenerateConfig
from visrl.infer import InferConfig
from visrl.train.config import TrainConfig

CONFIGS = [
    (GenerateConfig, {"model_name_or_path": "m", "dataset": "d"}),
    (EvalConfig, {"model_name_or_path": "m", "dataset": "d"}),
    (InferConfig, {"model_name_or_path": "m"}),
    (TrainConfig, {"stage": "sft", "model_name_or_path": "m", "output_dir": "o"}),
]


@pytest.mark.parametrize("cls, required", CONFIGS)
def test_every_config_has_the_six_keys_with_help(cls: type, required: dict) -> None:
    assert issubclass(cls, ContractFields)
    by_name = {f.name: f for f in fields(cls)}
    assert set(CONTRACT_KEYS) <= set(by_name)
    assert all(by_name[name].metadata["help"] for name in CONTRACT_KEYS)
    cfg = cls(**required, image_max_pixels=1003520, full_max_pixels=401408)
    assert cfg.contract_overrides()["image_max_pixels"] == 1003520
    assert list(cfg.contract_overrides()) == list(CONTRACT_KEYS)


@pytest.mark.parametrize("cls, required, expected", [
    (GenerateConfig, {"model_name_or_path": "m", "dataset": "d"}, (None, None)),
    (InferConfig, {"model_name_or_path": "m"}, (None, None)),
    (TrainConfig, {"stage": "sft", "model_name_or_path": "m", "output_dir": "o"}, ("viscot", 0.0)),
])
def test_defaults_are_the_checkpoints_except_what_training_teaches(cls: type, required: dict,
                                                                  expected: tuple) -> None:
    cfg = cls(**required)
    assert (cfg.box_format, cfg.crop_margin) == expected
    checkpoint = TwoStepContract(box_format="qwen2_5", crop_margin=0.2, crop_min_pixels=8888)
    laid = cfg.over(checkpoint)
    assert (laid.box_format, laid.crop_margin, laid.crop_min_pixels) == (expected[0] or "qwen2_5",
                                                                         0.2 if expected[1] is None else 0.0, 8888)


@pytest.mark.parametrize("cls, required", CONFIGS)
def test_a_bad_contract_key_is_named_before_a_model_loads(cls: type, required: dict) -> None:
    with pytest.raises(ConfigError, match="image_min_pixels .* must not exceed image_max_pixels"):
        cls(**required, image_min_pixels=4096, image_max_pixels=2048)
