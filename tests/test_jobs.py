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
NO_ITEMS = "dataset 'empty' has no items in split 'test'; `visrl stats` lists the splits"


def eval_config(tmp_path: Path, store: Store | None = None, dataset: str = "empty", **extra: Any) -> Path:
    """An eval recipe that passes validation at start (a model folder with a config.json, a
    dataset in the store) and fails in the child before loading a model: the split is empty."""
    if store is not None:
        model = store.workspace.models_dir / "unloaded"
        model.mkdir(exist_ok=True)
        (model / "config.json").write_text('{"model_type": "qwen2_vl"}')
        if not store.db["datasets"].count_where("name = ?", [dataset]):
            store.add_dataset(dataset, "vqa")
    path = tmp_path / "eval.yaml"
    lines = ["model_name_or_path: models/unloaded", f"dataset: {dataset}"]
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


@pytest.mark.parametrize("launcher, flags, env", [
    # CPU ranks: accelerate's --cpu would take its one-process launcher; --multi_gpu without
    # ACCELERATE_USE_CPU would give two rank-0 runs. Both together give real data parallelism.
    (Launcher(num_processes=2, cpu=True),
     ["--num_processes", "2", "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
      "--dynamo_backend", "no", "--main_process_port", "0"], {"ACCELERATE_USE_CPU": "1"}),
    (Launcher(num_processes=1, cpu=True), ["--num_processes", "1", "--cpu"], {}),
    (Launcher(num_processes=4, cpu=False), ["--num_processes", "4", "--multi_gpu"], {}),
    (Launcher(config_file="/ds.yaml", num_processes=4, cpu=False),
     ["--config_file", "/ds.yaml", "--num_processes", "4"], {}),
])
def test_launcher_flags_for_cpu_and_gpu(launcher: Launcher, flags: list[str], env: dict[str, str]) -> None:
    command = build_command("train", "/t.yaml", "/ws", 4, launcher, python="py")
    assert command[3:-8] == flags and launcher.env() == env
    if launcher.cpu and launcher.data_parallel:
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command[3:]))
        assert args.multi_gpu and not args.cpu and args.num_processes == 2  # -> multi_gpu_launcher


def test_one_process_kinds_refuse_several_processes(tmp_path: Path, store: Store) -> None:
    with pytest.raises(JobError, match="only train jobs take several processes"):
        start_job(store.workspace, "eval", eval_config(tmp_path), launcher=Launcher(num_processes=2))
    assert store.jobs() == []


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
    job = start_job(store.workspace, "eval", eval_config(tmp_path, store))
    row = store.job(job)
    assert row["status"] == "running" and row["pid"] and row["log_path"] == f"runs/{job}/log.txt"
    assert json.loads(row["command"])[1:6] == ["-m", "visrl", "eval", str(eval_config(tmp_path, store)), "--workspace"]
    row = wait_for(lambda: (r := jobs.job_status(store.workspace, job))["status"] != "running" and r)
    assert (row["status"], row["exit_code"]) == ("failed", 1)
    assert row["message"] == NO_ITEMS
    wait_for(lambda: not _exists(row["pid"]))
    tail = jobs.log_tail(store.workspace, job)
    assert tail.startswith("$ ") and f"Error: {NO_ITEMS}" in tail


def test_killed_job_is_marked_failed_with_its_log_tail(tmp_path: Path, store: Store) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path, store))
    pid = store.job(job)["pid"]
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: refresh_jobs(store) == [job])
    row = store.job(job)
    assert (row["status"], row["exit_code"]) == ("failed", -9)
    assert row["message"].startswith(f"process {pid} exited with code -9:\n$ ")
    assert not _exists(pid)


def test_job_is_found_again_after_the_parent_restarts(tmp_path: Path, store: Store,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path, store))
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
    assert row["message"] == NO_ITEMS
    assert refresh_jobs(fresh) == [] and fresh.job(job)["status"] == "failed"


def test_stop_before_the_stage_begins_counts_as_stopped(tmp_path: Path, store: Store) -> None:
    job = start_job(store.workspace, "eval", eval_config(tmp_path, store))
    row = stop_job(store.workspace, job, timeout=30)
    assert row["status"] == "stopped", row
    with pytest.raises(JobError, match=f"job {job} is not running"):
        stop_job(store.workspace, job)


def test_jobs_cli_start_list_show_logs(tmp_path: Path, store: Store) -> None:
    root = str(store.workspace.root)
    runner = CliRunner()
    result = runner.invoke(cli, ["jobs", "start", "eval", str(eval_config(tmp_path, store)), "-w", root,
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
    assert shown["config"]["dataset"] == "empty" and shown["metrics"] == {}
    logs = runner.invoke(cli, ["jobs", "logs", "1", "-w", root, "--follow"]).output
    assert f"Error: {NO_ITEMS}" in logs
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
                                  ["jobs", "logs"], ["jobs", "stop"], ["jobs", "kill"], ["eval"], ["evals"]])
def test_commands_have_help(args: list[str]) -> None:
    result = CliRunner().invoke(cli, [*args, "--help"])
    assert result.exit_code == 0 and len(result.output.split("\n\n")[1].strip()) > 20
    assert "--job-id" not in result.output  # internal: only jobs pass it to their child


# ---------------------------------------------------------------------- what a run needs (validation)

def _model(ws: Workspace, name: str, config: str | None = '{"model_type": "qwen2_vl"}') -> None:
    folder = ws.models_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(config)


@pytest.mark.parametrize(("kind", "recipe", "error"), [
    ("eval", "model_name_or_path: models/base\ndataset: shapes\n", None),
    ("eval", "model_name_or_path: models/gone\ndataset: shapes\n", "model_name_or_path 'models/gone': model 'models/gone' not found: tried folder"),
    ("eval", "model_name_or_path: models/bare\ndataset: shapes\n", "models/bare.* has no config.json"),
    ("eval", "model_name_or_path: models/llama\ndataset: shapes\n", "is a 'llama' model; VisRL supports"),
    ("eval", "model_name_or_path: models/base\ndataset: nope\n", r"no dataset named 'nope' \(datasets: shapes\)"),
    ("generate", "model_name_or_path: models/base\nadapter_name_or_path: models/base\ndataset: shapes\n",
     "adapter_name_or_path 'models/base' is not a LoRA adapter folder"),
    ("train", "stage: sft\nmodel_name_or_path: models/base\noutput_dir: models/out\ndataset: shapes\n", None),
    ("train", "stage: sft\nmodel_name_or_path: models/base\noutput_dir: models/out\ndataset: exports/none\n",
     "dataset folder 'exports/none' does not exist"),
    ("train", "stage: sft\nmodel_name_or_path: models/base\noutput_dir: notes.txt\n", "output_dir 'notes.txt' is a file"),
    ("eval", "model_name_or_path: models/base\ndataset: shapes\noutput_dir: /proc/visrl\n", "cannot be written"),
])
def test_validation_checks_what_the_run_needs(store: Store, kind: str, recipe: str, error: str | None) -> None:
    from visrl.errors import VisRLError

    ws = store.workspace
    store.add_dataset("shapes", "vqa")
    _model(ws, "base")
    _model(ws, "bare", config=None)
    _model(ws, "llama", '{"model_type": "llama"}')
    (ws.root / "notes.txt").write_text("not a folder")
    assert jobs.validate_text(kind, recipe)  # without a workspace: the keys and values only
    if error is None:
        assert jobs.validate_text(kind, recipe, ws)["model_name_or_path"] == "models/base"
    else:
        with pytest.raises(VisRLError, match=error):
            jobs.validate_text(kind, recipe, ws)


@pytest.mark.parametrize("recipe, key", [
    ("backend: remote\nbase_url: {url}\nremote_model: m\napi_key_env: VISRL_T_KEY\n", "api_key_env"),
    ("model_name_or_path: models/base\nanswer_judge: model\njudge_base_url: {url}\njudge_model: j\n"
     "judge_api_key_env: VISRL_T_KEY\n", "judge_api_key_env"),
])
@pytest.mark.parametrize("kind", ["generate", "eval"])
def test_validation_needs_the_api_key_variables_set(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                    kind: str, recipe: str, key: str) -> None:
    """A key variable the run would read is checked before the job starts, not in the child; the
    server is then asked with that key."""
    from test_judges import FakeJudgeServer

    from visrl.errors import ConfigError

    store.add_dataset("shapes", "vqa")
    _model(store.workspace, "base")
    with FakeJudgeServer([], models=("m", "j"), api_key="s3cret") as server:
        recipe = recipe.format(url=server.base_url) + "dataset: shapes\n"
        monkeypatch.delenv("VISRL_T_KEY", raising=False)
        with pytest.raises(ConfigError, match=f"^{key} names the environment variable VISRL_T_KEY, which is not set"):
            jobs.validate_text(kind, recipe, store.workspace)
        monkeypatch.setenv("VISRL_T_KEY", "s3cret")
        assert jobs.validate_text(kind, recipe, store.workspace)[key] == "VISRL_T_KEY"  # the name, never the key
        assert server.probes == ["Bearer s3cret"]


def test_validation_finds_a_hub_id_where_the_loader_does(store: Store, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hub id in the local HF cache validates (as load_model finds it); a wrong one fails with
    the loader's own account of what it tried."""
    from huggingface_hub import constants
    from test_models import fake_hub_cache

    from visrl.errors import ConfigError

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    store.add_dataset("shapes", "vqa")
    _model(store.workspace, "base")
    fake_hub_cache(cache, "tiny-org/Tiny-VL", store.workspace.models_dir / "base")
    recipe = "model_name_or_path: {}\ndataset: shapes\n"
    assert jobs.validate_text("eval", recipe.format("tiny-org/Tiny-VL"), store.workspace)
    with pytest.raises(ConfigError) as info:
        jobs.validate_text("eval", recipe.format("tiny-org/Tiny-VLX"), store.workspace)
    message = str(info.value)
    assert message.startswith("model_name_or_path 'tiny-org/Tiny-VLX': model 'tiny-org/Tiny-VLX' not found")
    assert f"Hub id 'tiny-org/Tiny-VLX' in the local cache {cache}" in message
    assert f"folder {store.workspace.root / 'tiny-org/Tiny-VLX'}" in message


@pytest.mark.parametrize(("text", "where"), [
    ("stage: sft\nmodel_name_or_path: [a,\n", "at line 3, column 1"),
    ("stage: sft\n  output_dir: x\n", "at line 2, column 13"),
    ("stage: 'sft\n", "at line 2, column 1"),
])
def test_yaml_errors_name_the_source_line_and_column(text: str, where: str) -> None:
    with pytest.raises(ConfigError, match="not valid YAML") as caught:
        jobs.validate_text("train", text)
    assert str(caught.value).startswith(f"recipe is not valid YAML {where}:")
    assert "/tmp" not in str(caught.value) and ".yaml" not in str(caught.value)


def test_generate_config_carries_its_run_key(store: Store) -> None:
    text = "model_name_or_path: models/base\ndataset: shapes\n"
    key = jobs.validate_text("generate", text)["run_key"]
    assert key.startswith("shapes-train-") and jobs.validate_text("generate", text)["run_key"] == key
    assert jobs.validate_text("generate", text + "run_key: mine\n")["run_key"] == "mine"
    assert jobs.job_target("generate", {"run_key": key}, store.workspace.root) == f"rollouts run {key}"
    root = store.workspace.root
    assert jobs.job_target("train", {"output_dir": "models/out/"}, root) == str(root.resolve() / "models" / "out")
    assert jobs.job_target("eval", {"output_dir": None}, root) is None  # each eval job: runs/<id>/


# ---------------------------------------------------------------------- one active job per output

def test_rapid_double_start_into_one_folder_gives_one_job(tmp_path: Path, store: Store) -> None:
    import threading

    config = eval_config(tmp_path, store, output_dir="exports/shared-eval")
    barrier = threading.Barrier(4)
    started: list[int] = []
    refused: list[str] = []

    def click() -> None:
        barrier.wait()
        try:
            started.append(start_job(store.workspace, "eval", config))
        except JobError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=click) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(started) == 1 and len(refused) == 3, (started, refused)
    [job] = started
    assert all(message.startswith(f"job {job} (eval 'eval', ") and "shared-eval" in message
               for message in refused)
    assert [row["id"] for row in store.jobs()] == [job]
    wait_for(lambda: jobs.job_status(store.workspace, job)["status"] == "failed")
    other = eval_config(tmp_path, store)  # no output_dir: runs/<id>/, never shared
    second = start_job(store.workspace, "eval", config)  # the folder is free again
    third = start_job(store.workspace, "eval", other)
    assert {second, third} == {job + 1, job + 2}
    for j in (second, third):
        wait_for(lambda j=j: jobs.job_status(store.workspace, j)["status"] == "failed")


def test_a_queued_job_whose_starter_died_frees_its_folder(store: Store) -> None:
    old = store.create_job("train", {"output_dir": "models/out"})
    store.db["jobs"].update(old, {"created_at": "2000-01-01T00:00:00+00:00"})
    fresh = store.create_job("train", {"output_dir": "models/out2"})
    refresh_jobs(store)
    assert store.job(old)["status"] == "failed" and "never started" in store.job(old)["message"]
    assert store.job(fresh)["status"] == "queued"  # just created: its starter is spawning it
    job = jobs.create_exclusive_job(store, "train", {"output_dir": "models/out"})
    with pytest.raises(JobError, match=f"job {fresh} \\(train 'train', queued\\) is already writing"):
        jobs.create_exclusive_job(store, "train", {"output_dir": str(store.workspace.root / "models" / "out2")})
    assert store.job(job)["status"] == "queued"


# ---------------------------------------------------------------------- stop once, kill on purpose

SAVING_CHILD = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
count = 0
def on_term(signum, frame):
    global count
    count += 1
    out.write_text(str(count))
signal.signal(signal.SIGTERM, on_term)
out.write_text("0")
while count == 0:
    time.sleep(0.01)
time.sleep(1.0)  # finish the current step
out.write_text(out.read_text() + " saved")
"""


def _job_process(store: Store, code: str, mark: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, Any]:
    """A job row whose process (its own session, like start_job's) runs ``code``."""
    child = subprocess.Popen([PY, "-c", code, str(mark)], start_new_session=True)
    monkeypatch.setitem(jobs._CHILDREN, child.pid, child)
    job = store.create_job("train", {})
    store.update_job(job, status="running", pid=child.pid, started_at=jobs.now())
    wait_for(lambda: mark.is_file() and mark.read_text() == "0")
    return job, child


def test_stop_twice_signals_once_and_the_job_saves(tmp_path: Path, store: Store,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "signals.txt"
    job, child = _job_process(store, SAVING_CHILD, mark, monkeypatch)
    assert stop_job(store.workspace, job)["status"] == "stopping"
    assert stop_job(store.workspace, job)["status"] == "stopping"  # the second click: nothing sent
    row = stop_job(store.workspace, job, timeout=20)
    assert (row["status"], row["exit_code"]) == ("stopped", 0)
    assert mark.read_text() == "1 saved" and child.returncode == 0


def test_kill_is_separate_and_immediate(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    mark = tmp_path / "stubborn.txt"
    code = ("import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "pathlib.Path(sys.argv[1]).write_text('0'); time.sleep(60)")
    job, child = _job_process(store, code, mark, monkeypatch)
    assert stop_job(store.workspace, job, timeout=0.5)["status"] == "stopping"  # ignores SIGTERM
    row = jobs.kill_job(store.workspace, job)
    assert (row["status"], row["exit_code"], row["message"]) == ("stopped", -9, "killed on request")
    assert child.returncode == -9 and not _exists(child.pid)
    with pytest.raises(JobError, match="is not running"):
        jobs.kill_job(store.workspace, job)
    refused = CliRunner().invoke(cli, ["jobs", "kill", str(job), "-w", str(store.workspace.root)], input="n\n")
    assert refused.exit_code == 1 and "Kill job" in refused.output  # asked, answered no


def test_reaping_from_many_threads_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    monkeypatch.setattr(jobs, "_CHILDREN", {})
    monkeypatch.setattr(jobs, "_EXIT_CODES", {})
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: the race shows quickly
    errors: list[BaseException] = []
    try:
        for _ in range(5):
            children = [subprocess.Popen(["/bin/sh", "-c", f"exit {i % 3}"]) for i in range(12)]
            for child in children:
                jobs._CHILDREN[child.pid] = child
                wait_for(lambda c=child: _is_zombie(c.pid))
            barrier = threading.Barrier(8)

            def reap(barrier: threading.Barrier = barrier) -> None:
                barrier.wait()
                try:
                    jobs._reap_children()
                except BaseException as exc:  # noqa: BLE001  (any error is the failure)
                    errors.append(exc)

            threads = [threading.Thread(target=reap) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert jobs._CHILDREN == {}
            assert {c.pid: jobs._EXIT_CODES[c.pid] for c in children} == {c.pid: i % 3 for i, c in enumerate(children)}
    finally:
        sys.setswitchinterval(0.005)
    assert errors == []


def test_seed_style_recipes_validate_like_their_stage_loads_them(store: Store) -> None:
    train = "stage: sft\nmodel_name_or_path: models/base\noutput_dir: models/out\ntemplate: qwen2_vl\ncutoff_len: 512\n"
    assert jobs.validate_text("train", train)["max_length"] == 512  # LLaMA-Factory keys mapped
    merge = ("model_name_or_path: models/base\nadapter_name_or_path: models/lora\nexport_dir: models/merged\n"
             "template: qwen2_vl\nexport_device: cpu\n")
    assert jobs.validate_text("merge", merge)["export_dir"] == "models/merged"
    with pytest.raises(ConfigError, match="unknown key.*tempate"):
        jobs.validate_text("train", train.replace("template", "tempate"))
