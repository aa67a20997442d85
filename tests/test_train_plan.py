"""What a training recipe will do with its output folder, before it runs (visrl.train.plan)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from visrl.errors import JobError
from visrl.train import plan


def checkpoint(folder: Path, step: int, max_steps: int) -> Path:
    """A checkpoint folder as HF Trainer leaves it (only what the plan reads)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return path


def recipe(**overrides: Any) -> dict[str, Any]:
    return {"output_dir": "models/sft", "max_steps": 60, "resume_from_checkpoint": "auto", **overrides}


def test_the_plan_says_where_a_run_starts_and_stops(tmp_path: Path) -> None:
    out = tmp_path / "models" / "sft"
    assert plan.plan_run(recipe(), tmp_path).describe() == "starts from scratch"
    checkpoint(out, 20, 60)
    partial = plan.plan_run(recipe(), tmp_path)
    assert (partial.start_step, partial.max_steps, partial.finished) == (20, 60, False)
    assert partial.describe() == "resumes from checkpoint-20 at step 20 of 60"
    checkpoint(out, 60, 60)
    assert plan.plan_run(recipe(), tmp_path).finished
    assert plan.plan_run(recipe(max_steps=-1), tmp_path).finished  # by epochs: the checkpoint's total
    assert not plan.plan_run(recipe(max_steps=100), tmp_path).finished
    assert not plan.plan_run(recipe(resume_from_checkpoint=False), tmp_path).finished  # starts over
    named = plan.plan_run(recipe(resume_from_checkpoint="models/sft/checkpoint-20"), tmp_path)
    assert (named.start_step, named.finished) == (20, False)


def test_a_finished_run_is_refused_with_the_ways_on(tmp_path: Path) -> None:
    out = tmp_path / "models" / "sft"
    checkpoint(out, 60, 60)
    (tmp_path / "models" / "sft-2").mkdir()  # taken
    with pytest.raises(JobError) as refused:
        plan.check_will_train(recipe(), tmp_path)
    assert str(refused.value) == (
        "models/sft already holds a finished run (checkpoint-60, step 60 of 60): starting it again "
        "would train nothing. Start fresh in a new folder (output_dir: models/sft-3), continue training "
        "for 60 more steps (max_steps: 120), or leave it as it is.")
    assert plan.fresh_output(recipe(output_dir="models/sft-3/"), tmp_path) == "models/sft-3"
    assert plan.continued(recipe(), plan.plan_run(recipe(), tmp_path))["max_steps"] == 120
    assert plan.check_will_train(recipe(max_steps=120), tmp_path).start_step == 60  # continues


def test_cli_train_refuses_a_finished_output_and_says_the_options(tmp_path: Path, workspace: Any) -> None:
    """`visrl train` says it before any model loads (it used to end in ~10 s "at step 61")."""
    from visrl.cli import _register, cli

    checkpoint(workspace.root / "models" / "sft", 60, 60)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"stage": "sft", "model_name_or_path": "models/base", **recipe()}))
    _register()
    result = CliRunner().invoke(cli, ["train", str(config), "--workspace", str(workspace.root)])
    assert isinstance(result.exception, JobError)  # main() prints it as one "Error: ..." line
    message = str(result.exception)
    assert "already holds a finished run" in message
    assert "(--output-dir models/sft-2)" in message and "(--max-steps 120)" in message


def test_jobs_start_refuses_a_finished_output_before_making_a_job(tmp_path: Path, store: Any) -> None:
    from visrl import jobs

    ws = store.workspace
    (ws.root / "models" / "base").mkdir(parents=True)
    (ws.root / "models" / "base" / "config.json").write_text('{"model_type": "qwen2_vl"}')
    store.add_dataset("shapes", "test")
    checkpoint(ws.root / "models" / "sft", 60, 60)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"stage": "sft", "model_name_or_path": "models/base",
                                      "dataset": "shapes", **recipe()}))
    with pytest.raises(JobError, match=r"already holds a finished run .*\(max_steps: 120\)"):
        jobs.start_job(ws, "train", config)
    assert store.jobs() == []
