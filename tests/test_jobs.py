from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from visrl import jobs
from visrl.cli import _register, cli
from visrl.errors import ConfigError, JobError
from visrl.jobs import Launcher, build_command, refresh_jobs, run_stage, start_job, stop_job
from visrl.progress import Progress
from visrl.store import Store
from visrl.workspace import Workspace

_register()
PY = sys.executable


def eval_config(tmp_path: Path, dataset: str = "nothing-here", **extra: Any) -> Path:
    path = tmp_path / "eval.yaml"
    lines = ["model_name_or_path: models/none", f"dataset: {dataset}"]
    lines += [f"{k}: {v}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for(predicate: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


# ---------------------------------------------------------------------- commands (pure)

def test_build_command_direct() -> None:
    assert build_command("eval", "/c.yaml", "/ws", 3, extra_args=["--limit", "5"], python="py") == [
        "py", "-m", "visrl", "eval", "/c.yaml", "--workspace", "/ws", "--job-id", "3", "--limit", "5"]


@pytest.mark.parametrize("launcher, flags", [
    (Launcher(), []),
    (Launcher(config_file="/ds.yaml"), ["--config_file", "/ds.yaml"]),
    (Launcher(config_file="/ds.yaml", num_processes=8),
     ["--config_file", "/ds.yaml", "--num_processes", "8"]),
])
def test_build_command_under_accelerate(launcher: Launcher, flags: list[str]) -> None:
    command = build_command("train", "/t.yaml", "/ws", 4, launcher, python="py")
    assert command == ["py", "-m", "accelerate.commands.launch", *flags, "-m", "visrl", "train",
                       "/t.yaml", "--workspace", "/ws", "--job-id", "4"]


def test_accelerate_parses_the_command_as_a_module_launch() -> None:
    from accelerate.commands.launch import launch_command_parser

    command = build_command("train", "/t.yaml", "/ws", 4, Launcher(num_processes=2), python="py")
    args = launch_command_parser().parse_args(command[3:])
    assert args.module and args.num_processes == 2 and args.training_script == "visrl"
    assert args.training_script_args == ["train", "/t.yaml", "--workspace", "/ws", "--job-id", "4"]


def test_bad_launcher_values() -> None:
    with pytest.raises(ConfigError, match="unknown launcher"):
        Launcher("torchrun")
    with pytest.raises(ConfigError, match="num_processes must be >= 1"):
        Launcher(num_processes=0)


# ---------------------------------------------------------------------- validation before start

def test_start_validates_before_creating_a_job(tmp_path: Path, store: Store) -> None:
    with pytest.raises(JobError, match="unknown job kind 'sleep'"):
        start_job(store.workspace, "sleep", eval_config(tmp_path))
    with pytest.raises(ConfigError, match="config file not found"):
        start_job(store.workspace, "eval", tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: m\ndataset: d\nbatchsize: 4\n")
    with pytest.raises(ConfigError, match="unknown key.*batchsize"):
        start_job(store.workspace, "eval", bad)
    assert store.jobs() == []


# ---------------------------------------------------------------------- run_stage (in process)

def test_run_stage_success_records_status_and_result(store: Store) -> None:
    job = store.create_job("eval", {})

    def body(progress: Progress) -> str:
        progress.set_total(4)
        progress.update(step=4, metrics={"loss": 0.5})
        return "done"

    assert run_stage(store.workspace, job, "test", body) == "done"
    row = store.job(job)
    assert (row["status"], row["exit_code"], row["progress"], row["pid"]) == ("succeeded", 0, 1.0, os.getpid())
    assert row["ended_at"] and row["started_at"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_run_stage_sigterm_means_stopped(store: Store) -> None:
    job = store.create_job("eval", {})
    steps = []

    def body(progress: Progress) -> None:
        for step in range(10):
            if progress.stop_requested:
                break
            steps.append(step)
            if step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    run_stage(store.workspace, job, "test", body)
    assert steps == [0, 1, 2]
    assert store.job(job)["status"] == "stopped"


def test_run_stage_failure_is_recorded_and_reraised(store: Store) -> None:
    job = store.create_job("eval", {})

    def body(progress: Progress) -> None:
        raise ValueError("bad\nthing")

    with pytest.raises(ValueError):
        run_stage(store.workspace, job, "test", body)
    row = store.job(job)
    assert (row["status"], row["exit_code"], row["message"]) == ("failed", 1, "ValueError: bad thing")


def test_run_stage_without_a_job_just_runs(store: Store) -> None:
    assert run_stage(store.workspace, None, "test", lambda progress: progress.in_job) is False
    assert store.jobs() == []


# ---------------------------------------------------------------------- liveness

def test_refresh_detects_a_recycled_pid(store: Store) -> None:
    # This test process is alive, but it was created long after a job "started" in 2000.
    old = store.create_job("eval", {})
    store.update_job(old, status="running", pid=os.getpid(), started_at="2000-01-01T00:00:00+00:00")
    live = store.create_job("eval", {})
    store.update_job(live, status="running", pid=os.getpid(), started_at=jobs.now())
    assert refresh_jobs(store) == [old]
    assert store.job(old)["status"] == "failed" and store.job(old)["exit_code"] == -1
    assert store.job(live)["status"] == "running"


def test_refresh_reaps_a_zombie_child_it_did_not_register(store: Store) -> None:
    child = subprocess.Popen([PY, "-c", "raise SystemExit(3)"])
    wait_for(lambda: _is_zombie(child.pid))
    job = store.create_job("eval", {})
    store.update_job(job, status="running", pid=child.pid, started_at=jobs.now())
    assert refresh_jobs(store) == [job]
    row = store.job(job)
    assert (row["status"], row["exit_code"]) == ("failed", 3)
    assert "exited with code 3 without a log" in row["message"]
    assert not _exists(child.pid)
    child.returncode = 3  # reaped above; keep Popen's destructor quiet


def _is_zombie(pid: int) -> bool:
    import psutil

    return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def _exists(pid: int) -> bool:
    import psutil

    return psutil.pid_exists(pid) and not _is_zombie(pid)


# ---------------------------------------------------------------------- real subprocess jobs

def test_eval_job_that_fails_reports_its_error(tmp_path: Path, store: Store) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path))
    row = store.job(job)
    assert row["status"] == "running" and row["pid"] and row["log_path"] == f"runs/{job}/log.txt"
    assert json.loads(row["command"])[1:6] == ["-m", "visrl", "eval", str(eval_config(tmp_path)), "--workspace"]
    row = wait_for(lambda: (r := jobs.job_status(store.workspace, job))["status"] != "running" and r)
    assert (row["status"], row["exit_code"]) == ("failed", 1)
    assert row["message"] == "no dataset named 'nothing-here' (datasets: none)"
    wait_for(lambda: not _exists(row["pid"]))
    tail = jobs.log_tail(store.workspace, job)
    assert tail.startswith("$ ") and "Error: no dataset named 'nothing-here'" in tail


def test_killed_job_is_marked_failed_with_its_log_tail(tmp_path: Path, store: Store) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path))
    pid = store.job(job)["pid"]
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: refresh_jobs(store) == [job])
    row = store.job(job)
    assert (row["status"], row["exit_code"]) == ("failed", -9)
    assert row["message"].startswith(f"process {pid} exited with code -9:\n$ ")
    assert not _exists(pid)


def test_job_is_found_again_after_the_parent_restarts(tmp_path: Path, store: Store,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path))
    pid = store.job(job)["pid"]
    # A restarted app: no Popen objects, a fresh Store on the same workspace.
    monkeypatch.setattr(jobs, "_CHILDREN", {})
    monkeypatch.setattr(jobs, "_EXIT_CODES", {})
    fresh = Store.open(Workspace.open(store.workspace.root))
    [row] = jobs.list_jobs(store.workspace.root)
    assert (row["id"], row["pid"]) == (job, pid) and row["status"] in ("running", "failed")
    row = wait_for(lambda: (r := fresh.job(job))["status"] != "running" and r)
    # The child's own verdict stands (refresh did not overwrite it).
    assert (row["status"], row["exit_code"]) == ("failed", 1)
    assert row["message"].startswith("no dataset named")
    assert refresh_jobs(fresh) == [] and fresh.job(job)["status"] == "failed"


def test_stop_before_the_stage_begins_counts_as_stopped(tmp_path: Path, store: Store) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path))
    row = stop_job(store.workspace, job, timeout=30)
    assert row["status"] == "stopped", row
    with pytest.raises(JobError, match=f"job {job} is not running"):
        stop_job(store.workspace, job)


def test_jobs_cli_start_list_show_logs(tmp_path: Path, store: Store) -> None:
    root = str(store.workspace.root)
    runner = CliRunner()
    result = runner.invoke(cli, ["jobs", "start", "eval", str(eval_config(tmp_path)), "-w", root,
                                 "--limit", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("started job 1;")
    assert json.loads(store.job(1)["command"])[-2:] == ["--limit", "2"]
    wait_for(lambda: store.job(1)["status"] != "running")
    listed = runner.invoke(cli, ["jobs", "list", "-w", root, "--json"])
    assert [(r["id"], r["status"]) for r in json.loads(listed.output)] == [(1, "failed")]
    table = runner.invoke(cli, ["jobs", "list", "-w", root]).output
    assert "   1  eval      failed" in table
    shown = json.loads(runner.invoke(cli, ["jobs", "show", "1", "-w", root]).output)
    assert shown["config"]["dataset"] == "nothing-here" and shown["metrics"] == {}
    logs = runner.invoke(cli, ["jobs", "logs", "1", "-w", root, "--follow"]).output
    assert "Error: no dataset named" in logs
    stopped = runner.invoke(cli, ["jobs", "stop", "1", "-w", root])
    assert stopped.exit_code == 1 and "is not running (status failed)" in str(stopped.exception)
    bad = runner.invoke(cli, ["jobs", "start", "eval", str(eval_config(tmp_path)), "-w", root,
                              "--num-processes", "2"])
    assert "need --launcher accelerate" in str(bad.exception)


def test_log_tail_collapses_progress_bar_redraws(workspace: Workspace) -> None:
    store = Store(workspace)
    job = store.create_job("eval", {})
    log = workspace.run_dir(job) / "log.txt"
    log.write_text("start\n 10%|#\r 50%|##\r100%|###\nend\n")
    assert jobs.log_tail(workspace, job) == "start\n100%|###\nend\n"
    assert jobs.log_tail(workspace, job, lines=1) == "end\n"


@pytest.mark.slow
def test_stop_a_running_eval_job_mid_run(tmp_path: Path, store: Store) -> None:
    from PIL import Image

    from visrl.tiny import build_tiny_model

    build_tiny_model(store.workspace.models_dir / "tiny", preset="test")
    Image.new("RGB", (64, 48), "white").save(store.workspace.images_dir / "w.png")
    ds = store.add_dataset("many", "test")
    store.add_items(ds, [{"split": "test", "source_id": str(i), "image": "images/w.png", "width": 64,
                          "height": 48, "question": f"q{i}?", "answer": "1"} for i in range(400)])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model_name_or_path: models/tiny\ndataset: many\nbatch_size: 1\nmax_new_tokens: 8\n")
    job = start_job(store.workspace, "eval", cfg)
    wait_for(lambda: store.job(job)["step"] >= 2, timeout=120)
    row = stop_job(store.workspace, job, timeout=60)
    assert row["status"] == "stopped" and row["exit_code"] == 0, row
    assert 2 <= row["step"] < 400
    metrics = json.loads((store.workspace.run_dir(job) / "metrics.json").read_text())
    assert metrics["stopped"] is True and store.evaluations() == []
    assert jobs.job_status(store.workspace, job)["metrics"]["answer_acc"]["step"] >= 2


@pytest.mark.parametrize("args", [["jobs", "start"], ["jobs", "list"], ["jobs", "show"],
                                  ["jobs", "logs"], ["jobs", "stop"], ["eval"], ["evals"]])
def test_commands_have_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0 and len(result.output.split("\n\n")[1].strip()) > 20
    assert "--job-id" not in result.output  # internal: only jobs pass it to their child
