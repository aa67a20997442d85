"""visrl.config: YAML read within limits (size, aliases, values), duplicate keys, errors with line
and column that never echo huge values, NaN/inf refused for every float, every stage's value
ranges checked -- and a bad config failing in the CLI before torch is imported."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from visrl.config import MAX_CONFIG_BYTES, from_dict, load_config, parse_yaml, read_yaml
from visrl.errors import ConfigError
from visrl.evaluate import EvalConfig
from visrl.generate import GenerateConfig
from visrl.infer import InferConfig
from visrl.serve import ServeConfig
from visrl.train.config import TrainConfig
from visrl.train.merge import MergeConfig

REPO = Path(__file__).resolve().parent.parent

# The 423-byte "billion laughs" of issue 14: 9^9 = 387 million strings once expanded.
ALIAS_BOMB = "\n".join(
    [f'{chr(97)}: &{chr(97)} ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]" for i in range(1, 9)]) + "\n"


def _error(text: str, source: str = "t.yaml") -> str:
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, source)
    return str(caught.value)


# ---------------------------------------------------------------------- reading YAML


def test_alias_bomb_refused_quickly_in_bounded_memory() -> None:
    assert len(ALIAS_BOMB) < 500
    tracemalloc.start()
    start = time.monotonic()
    message = _error(ALIAS_BOMB)
    took = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert message == "t.yaml: more than 20,000 values once aliases are expanded (line 5); a config has a few dozen"
    assert took < 1.0 and peak < 5 * 2**20  # was: past 2.4 GB


@pytest.mark.parametrize("text, message", [
    ("a: 1\nb: 2\na: 3\n", "t.yaml: duplicate key 'a' at lines 1 and 3; keep one"),
    ("x:\n  y: 1\n  z: 2\n  y: 2\n", "t.yaml: duplicate key 'y' at lines 2 and 4; keep one"),
    ("a: &a [*a]\n", "t.yaml: an alias refers to a value that contains it (line 1)"),
    ("".join(f"k{i}: &x{i} 1\n" for i in range(101)) + "refs: [" + ", ".join(f"*x{i}" for i in range(101)) + "]\n",
     "t.yaml: more than 100 aliases (*name), at line 102; a config needs a few at most"),
    ("[" * 5000 + "]" * 5000, "t.yaml is nested too deeply to be a config"),
    ("- 1\n- 2\n", "t.yaml must hold a mapping of keys to values, not list"),
    ("1: a\n", "t.yaml: keys must be names, got 1"),
    ("a: [1, 2\nb: 3\n", "t.yaml is not valid YAML at line 2, column 2: expected ',' or ']', but got ':' "
                         "(while parsing a flow sequence)"),
    ("a:\n\t- 1\n", "t.yaml is not valid YAML at line 2, column 1: found character '\\t' that cannot start any "
                    "token (while scanning for the next token)"),
    ("a: \x00\n", "t.yaml is not valid YAML: unacceptable character #x0000: special characters are not allowed "
                  'in "<unicode string>", position 3'),
    ("a: !!python/object/apply:os.system [ls]\n", "t.yaml is not valid YAML at line 1, column 4: could not "
                                                  "determine a constructor for the tag"),
    ("port: " + "9" * 5000 + "\n", "t.yaml: a value cannot be read: Exceeds the limit (4300 digits)"),
])
def test_bad_yaml_is_one_clear_error(text: str, message: str) -> None:
    assert _error(text).startswith(message)


def test_merge_keys_may_override() -> None:
    data = parse_yaml("base: &b {lr: 1, steps: 2}\nrun:\n  <<: *b\n  lr: 3\n")
    assert data == {"base": {"lr": 1, "steps": 2}, "run": {"lr": 3, "steps": 2}}
    assert parse_yaml("") == {} and parse_yaml("# only a comment\n", "the editor") == {}


def test_errors_never_echo_huge_values() -> None:
    huge = "x" * 100_000
    for text in (f"a: '{huge}\n", f"{huge}: [\n", f"a: !!{huge} 1\n", f"a: {huge}\n  b: 1\n"):
        assert len(_error(text)) < 400
    assert "xxxx... (100,0" in _error(f"a: !!{huge} 1\n")  # the tag is quoted, cut short
    with pytest.raises(ConfigError) as caught:
        from_dict(ServeConfig, {"model_name_or_path": "m", huge: 1, "port": [huge]})
    assert len(str(caught.value)) < 1000 and "(100,000 characters)" in str(caught.value)
    with pytest.raises(ConfigError, match=r"^config: port must be int, got \['xxxx.*\(100,\d{3} characters\)$"):
        from_dict(ServeConfig, {"model_name_or_path": "m", "port": [huge]})


def test_size_limit_on_text_and_on_file(tmp_path: Path) -> None:
    assert _error("a: 1\n" + "#" * MAX_CONFIG_BYTES) == "t.yaml is over 262,144 bytes; a config is a few KB"
    big = tmp_path / "big.yaml"
    with big.open("wb") as f:
        f.truncate(10 * 2**30)  # a sparse 10 GB file: refused from its size, never read
    with pytest.raises(ConfigError, match=r"big.yaml is 10,737,418,240 bytes; a config may be at most 262,144$"):
        read_yaml(big)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_non_utf8_file(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes("model_name_or_path: modèle\n".encode(encoding))
    with pytest.raises(ConfigError, match=r"c.yaml is not UTF-8 text \(byte \d+\); save it as UTF-8$"):
        read_yaml(path)


def test_read_yaml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("port: 1\nport: 2\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: duplicate key 'port' at lines 1 and 2; keep one$"):
        read_yaml(path)
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


# ---------------------------------------------------------------------- values


@pytest.mark.parametrize("cls, base, field", [
    (ServeConfig, {"model_name_or_path": "m"}, "batch_wait_ms"),
    (ServeConfig, {"model_name_or_path": "m"}, "max_body_mb"),
    (GenerateConfig, {"model_name_or_path": "m", "dataset": "d"}, "temperature"),
    (GenerateConfig, {"model_name_or_path": "m", "dataset": "d"}, "min_chosen_score"),
    (EvalConfig, {"model_name_or_path": "m", "dataset": "d"}, "anls_threshold"),
    (InferConfig, {"model_name_or_path": "m"}, "top_p"),
    (TrainConfig, {"stage": "sft", "model_name_or_path": "m", "output_dir": "o"}, "learning_rate"),
])
@pytest.mark.parametrize("spelling", [".nan", ".inf", "-.inf", "'nan'", "1e400"])
def test_nan_and_inf_refused_for_every_float(cls: type, base: dict[str, Any], field: str, spelling: str) -> None:
    data = {**base, **parse_yaml(f"{field}: {spelling}\n")}
    with pytest.raises(ConfigError, match=rf"^t.yaml: {field} must be a finite number, got (nan|inf|-inf)$"):
        from_dict(cls, data, source="t.yaml")


def test_huge_integers_and_long_strings_refused() -> None:
    with pytest.raises(ConfigError, match=r"^c: port is an integer of 1,329 bits; no setting needs more than 63$"):
        from_dict(ServeConfig, {"model_name_or_path": "m", "port": 10**400}, source="c")
    with pytest.raises(ConfigError, match=r"^c: batch_wait_ms must be a finite number, got an integer of 1,329 bits$"):
        from_dict(ServeConfig, {"model_name_or_path": "m", "batch_wait_ms": 10**400}, source="c")
    with pytest.raises(ConfigError, match=r"^c: model_name_or_path is 5,000 characters long; the limit is 4,096$"):
        from_dict(ServeConfig, {"model_name_or_path": "m" * 5000}, source="c")


_POLICY = {"model_name_or_path": "m", "dataset": "d"}
# Each stage checks its ranges in __post_init__, so a config built in code (the app, a test) is
# checked too; NaN is refused there as well (comparisons are written so that NaN fails them).
_RANGES = [
    (GenerateConfig, {**_POLICY, "temperature": -1.0}, "temperature must be in [0.0, 100.0], got -1.0"),
    (GenerateConfig, {**_POLICY, "temperature": math.nan}, "temperature must be in [0.0, 100.0], got nan"),
    (GenerateConfig, {**_POLICY, "answer_temperature": -0.1}, "answer_temperature must be in [0.0, 100.0]"),
    (GenerateConfig, {**_POLICY, "top_p": 0.0}, "top_p must be in (0.0, 1.0], got 0.0"),
    (GenerateConfig, {**_POLICY, "top_p": 1.5}, "top_p must be in (0.0, 1.0], got 1.5"),
    (GenerateConfig, {**_POLICY, "iou_threshold": 2.0}, "iou_threshold must be in [0.0, 1.0], got 2.0"),
    (GenerateConfig, {**_POLICY, "number_rel_tol": -1.0}, "number_rel_tol must be in [0.0, 1000000.0]"),
    (GenerateConfig, {**_POLICY, "min_chosen_score": math.nan}, "min_chosen_score must lie in [0, 1], got nan"),
    (GenerateConfig, {**_POLICY, "crop_judge": "ioux"}, "crop_judge must be one of none, iou, iou_threshold, model"),
    (GenerateConfig, {**_POLICY, "answer_judge": "llm"}, "answer_judge must be one of auto, exact"),
    (GenerateConfig, {**_POLICY, "attempts": 0}, "attempts must be at least 1, got 0"),
    (GenerateConfig, {**_POLICY, "max_new_tokens": -5}, "max_new_tokens must be at least 1, got -5"),
    (GenerateConfig, {**_POLICY, "remote_min_pixels": 0}, "remote_min_pixels must be at least 1, got 0"),
    (GenerateConfig, {**_POLICY, "remote_min_pixels": 100, "remote_max_pixels": 10},
     "remote_max_pixels must be at least remote_min_pixels (100), got 10"),
    (EvalConfig, {**_POLICY, "anls_threshold": 1.5}, "anls_threshold must be in [0.0, 1.0], got 1.5"),
    (EvalConfig, {**_POLICY, "batch_size": 0}, "batch_size must be at least 1, got 0"),
    (InferConfig, {"model_name_or_path": "m", "temperature": -1.0}, "temperature must be in [0.0, 100.0], got -1.0"),
    (InferConfig, {"model_name_or_path": "m", "top_p": 0.0}, "top_p must be in (0.0, 1.0], got 0.0"),
    (InferConfig, {"model_name_or_path": "m", "max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
    (InferConfig, {"model_name_or_path": "m", "crop_margin": -0.5}, "crop_margin must be in [0.0, 10.0], got -0.5"),
    (InferConfig, {"model_name_or_path": "m", "full_max_pixels": 0}, "full_max_pixels must be at least 1 pixel"),
    (InferConfig, {"model_name_or_path": "m", "box_format": "xyxy"}, "box_format 'xyxy' unknown"),
    (InferConfig, {"model_name_or_path": "m", "dtype": "fp8"}, "dtype must be auto, float32, bfloat16 or float16"),
    (ServeConfig, {"model_name_or_path": "m", "batch_wait_ms": math.nan}, "batch_wait_ms must be in [0, 10000], got nan"),
    (ServeConfig, {"model_name_or_path": "m", "max_body_mb": 0}, "max_body_mb must be in (0, 4096], got 0"),
    (ServeConfig, {"model_name_or_path": "m", "body_timeout_s": -1}, "body_timeout_s must be in (0, 3600], got -1"),
    (ServeConfig, {"model_name_or_path": "m", "max_image_pixels": 0}, "max_image_pixels must be >= 1, got 0"),
    (ServeConfig, {"model_name_or_path": "m", "max_pending": 0}, "max_pending must be >= 1, got 0"),
    (ServeConfig, {"model_name_or_path": "m", "max_pending_mb": 100},
     "max_pending_mb must hold one largest request: at least 192 (3 x max_body_mb"),
    (ServeConfig, {"model_name_or_path": "m", "max_context_tokens": -1}, "max_context_tokens must be >= 1 or null"),
    (ServeConfig, {"model_name_or_path": "m", "dtype": "half"}, "dtype must be one of auto, float32, bfloat16"),
    (MergeConfig, {"model_name_or_path": "m", "adapter_name_or_path": "a", "export_dir": "e",
                   "export_size": math.nan}, "export_size must be >= 1 (GB), got nan"),
]


@pytest.mark.parametrize("cls, values, message", _RANGES)
def test_stage_ranges(cls: type, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        cls(**values)
    assert message in str(caught.value)


@pytest.mark.parametrize("cls, path", [
    (GenerateConfig, "configs/generate.yaml"), (GenerateConfig, "configs/demo/generate.yaml"),
    (EvalConfig, "configs/eval.yaml"), (EvalConfig, "configs/demo/eval.yaml"), (InferConfig, "configs/infer.yaml"),
    (ServeConfig, "configs/serve.yaml"), (MergeConfig, "configs/merge_lora.yaml"),
])
def test_shipped_configs_pass_the_checks(cls: type, path: str) -> None:
    load_config(cls, REPO / path)


# ---------------------------------------------------------------------- at the edge, fast

# Runs the CLI and reports, as its last stderr line, whether torch or transformers was imported by
# the time it exited.
_CLI = ("import atexit, sys\n"
        "atexit.register(lambda: print('torch imported:', bool({'torch', 'transformers'} & set(sys.modules)),"
        " file=sys.stderr))\n"
        "from visrl.cli import main\n"
        "main(sys.argv[1:])\n")


@pytest.mark.parametrize("command, yaml_text, message", [
    ("train", "stage: sft\nmodel_name_or_path: m\noutput_dir: o\nlearning_rate: .nan\n",
     "learning_rate must be a finite number, got nan"),
    ("generate", "model_name_or_path: m\ndataset: d\ntemperature: -1\n", "temperature must be in [0.0, 100.0], got -1.0"),
    ("eval", "model_name_or_path: m\ndataset: d\nanls_threshold: .inf\n", "anls_threshold must be a finite number"),
    ("serve", "model_name_or_path: m\nport: 8000\nport: 8001\n", "duplicate key 'port' at lines 2 and 3"),
])
def test_cli_refuses_a_bad_config_before_torch(tmp_path: Path, command: str, yaml_text: str, message: str) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", _CLI, command, str(config), "-w", str(tmp_path / "ws")],
                          capture_output=True, text=True, env=env, timeout=60)
    took = time.monotonic() - start
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 2, done.stderr
    assert lines[0].startswith("Error: ") and message in lines[0]
    assert lines[1] == "torch imported: False"
    assert took < 5.0  # was 15-26 s: the model loaded before the value was looked at


def test_range_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gen.yaml"
    path.write_text("model_name_or_path: m\ndataset: d\ntemperature: -1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(GenerateConfig, path)
    assert str(caught.value) == f"{path}: temperature must be in [0.0, 100.0], got -1.0"
