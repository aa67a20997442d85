from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from visrl.cli import _register, cli
from visrl.errors import ConfigError
from visrl.runtime import (
    available_cores,
    choose_threads,
    derive_seed,
    is_main_process,
    seed_everything,
    single_process_only,
)

_register()


@pytest.mark.parametrize("env, cores, count, reason", [
    ({"VISRL_NUM_THREADS": "3", "OMP_NUM_THREADS": "5"}, 8, 3, "VISRL_NUM_THREADS"),
    ({"OMP_NUM_THREADS": "5"}, 8, 5, "OMP_NUM_THREADS"),
    ({}, 8, 8, "8 cores available"),
    ({"LOCAL_WORLD_SIZE": "2"}, 8, 4, "8 cores available / 2 processes on this machine"),
    ({"LOCAL_WORLD_SIZE": "4"}, 2, 1, "2 cores available / 4 processes"),
])
def test_thread_choice(env: dict[str, str], cores: int, count: int, reason: str) -> None:
    choice = choose_threads(env, cores=cores)
    assert choice.count == count
    assert reason in choice.reason


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_thread_count_names_the_value(value: str) -> None:
    with pytest.raises(ConfigError, match=f"VISRL_NUM_THREADS='{value}'"):
        choose_threads({"VISRL_NUM_THREADS": value})


def test_cgroup_quota_caps_the_cores(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("100000 100000\n")  # one core's worth of CPU time
    assert available_cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == available_cores(tmp_path / "missing") >= 1


def test_model_commands_set_threads_before_torch_and_the_stage_logs_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    from visrl.jobs import run_stage

    monkeypatch.setenv("VISRL_NUM_THREADS", "2")  # restored after the test; the flag overrides it
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)  # registered, so the values set below are undone
    before = torch.get_num_threads()
    try:
        result = CliRunner().invoke(cli, ["--threads", "1", "merge", str(tmp_path / "missing.yaml")])
        assert result.exit_code != 0 and "torch thread" not in result.output  # a bad config: no log line
        # torch reads OMP_NUM_THREADS at import; one already imported is set directly.
        assert os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        assert run_stage(None, None, "train sft", lambda progress: 7) == 7
        assert "visrl train: 1 torch thread (VISRL_NUM_THREADS)" in capsys.readouterr().err
        torch.set_num_threads(3)
        CliRunner().invoke(cli, ["stats", "--help"])  # not a model command: untouched
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_seeds_depend_on_every_part() -> None:
    import random

    import torch

    seed_everything(7, (1, 0))
    first = (torch.rand(3).tolist(), random.random())
    seed_everything(7, (1, 0))
    assert (torch.rand(3).tolist(), random.random()) == first
    assert derive_seed(7, (1, 0)) != derive_seed(7, (1, 1)) != derive_seed(8, (1, 0))


def test_one_process_stages_refuse_several_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="vLLM"):
        single_process_only("generate", {"WORLD_SIZE": "2", "RANK": "1"})
    single_process_only("generate", {"WORLD_SIZE": "1"})
    assert is_main_process({}) and is_main_process({"RANK": "0"}) and not is_main_process({"RANK": "1"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = tmp_path / "generate.yaml"
    config.write_text("model_name_or_path: m\ndataset: d\n")
    from visrl.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", str(config)])
    assert exit_info.value.code == 1
