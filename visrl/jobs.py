"""Background jobs: long stages (generate, train, merge, eval) run as their own process.

A job is the same command a user would type, ``python -m visrl KIND CONFIG --workspace WS
--job-id N`` (an argument list, never a shell string), started in its own process group
(``start_new_session``) with stdout and stderr in ``runs/<id>/log.txt``. Multi-GPU training is
that command under ``python -m accelerate.commands.launch ... -m visrl ...``.

Who writes what (the ``jobs`` table is the single source of truth, so the app can restart and find
its jobs again):

* :func:`start_job` (parent) creates the row and records pid, command, log path, ``running``.
* :func:`run_stage` (child) marks the job running, turns SIGTERM into ``progress.stop_requested``
  and, when the stage function returns or raises, writes ``succeeded`` / ``stopped`` / ``failed``.
* :func:`stop_job` marks ``stopping`` and sends SIGTERM to the process group, once; the child
  finishes its current step, saves, and exits as ``stopped``. :func:`kill_job` sends SIGKILL.
* :func:`start_job` refuses a job whose output folder (or generation run) an active job writes.
* :func:`refresh_jobs` (any process) marks a running job whose process is gone (killed,
  out of memory, crashed before its stage began) ``failed`` with the log tail as its message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError, JobError
from visrl.job_config import KINDS, job_target, validate_config, validate_text  # noqa: F401  (re-exported)
from visrl.progress import Progress
from visrl.stages import stage_of_kind
from visrl.store import Store, now
from visrl.vocabulary import ACTIVE_JOB_STATUSES
from visrl.workspace import Workspace

ACTIVE: tuple[str, ...] = ACTIVE_JOB_STATUSES  # queued, running, stopping
SPAWNED = ACTIVE[1:]  # running, stopping: statuses of a job whose process was started
STOPPABLE = ACTIVE[:2]  # queued, running: not asked to stop yet
LOG_NAME = "log.txt"
# A process created more than this many seconds after the job started is another process that
# got the recycled pid (start_job stamps started_at right after the spawn; clocks are 1 s coarse).
PID_REUSE_SLACK_S = 5.0
# A queued row gets its pid within a second of its creation (start_job spawns right away); one
# still without a pid after this long belongs to a starter that died before spawning.
QUEUED_STALE_S = 120.0

# Children this process started: Popen keeps their exit codes and reaps them (no zombies in a
# long-lived parent such as the app). Jobs started by another process are looked up by pid.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_EXIT_CODES: dict[int, int] = {}  # pid -> exit code of children reaped before their job was read
# The app polls from several gradio worker threads: registering and reaping children is one
# critical section (two threads reaping the same child raised KeyError).
_CHILDREN_LOCK = threading.RLock()


@dataclass(frozen=True)
class Launcher:
    """How to launch the stage: directly (``None``) or under ``accelerate launch``.

    ``cpu`` says whether the ranks run on the CPU: ``None`` = as found when the job starts (no
    CUDA device = CPU). It matters because accelerate's ``--cpu`` flag always takes its
    single-process launcher (``--cpu --num_processes 2`` runs ONE process), and ``--multi_gpu``
    without ``ACCELERATE_USE_CPU=1`` on a CPU machine runs two independent rank-0 trainings that
    write one folder. Several CPU ranks are ``--multi_gpu --num_processes N`` with
    ``ACCELERATE_USE_CPU=1`` (torchrun + gloo; checked against accelerate 1.15's launch code).
    """

    name: str = "accelerate"
    config_file: str | None = None  # accelerate's YAML (DeepSpeed/FSDP/multi-GPU settings)
    num_processes: int | None = None  # overrides the config file's process count
    cpu: bool | None = None

    def __post_init__(self) -> None:
        if self.name != "accelerate":
            raise ConfigError(f"unknown launcher {self.name!r}; the only launcher is 'accelerate'")
        if self.num_processes is not None and self.num_processes < 1:
            raise ConfigError(f"num_processes must be >= 1, got {self.num_processes}")

    @property
    def data_parallel(self) -> bool:
        return (self.num_processes or 1) > 1

    def flags(self) -> list[str]:
        """accelerate's flags for this launch (before the ``-m visrl ...`` it runs)."""
        flags = ["--config_file", str(self.config_file)] if self.config_file else []
        if self.num_processes is not None:
            flags += ["--num_processes", str(self.num_processes)]
        if self.cpu and self.data_parallel:
            # Port 0: a free port, so two jobs on one machine do not collide on 29500.
            flags += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                      "--dynamo_backend", "no", "--main_process_port", "0"]
        elif self.cpu:
            flags += ["--cpu"]
        elif self.data_parallel and not self.config_file:
            flags += ["--multi_gpu"]  # say it rather than rely on accelerate's guess from the GPU count
        return flags

    def env(self) -> dict[str, str]:
        """Environment the launch needs on top of the parent's."""
        return {"ACCELERATE_USE_CPU": "1"} if self.cpu and self.data_parallel else {}

    def resolved(self) -> Launcher:
        """This launcher with ``cpu`` decided from the machine (imports torch when undecided)."""
        if self.cpu is not None:
            return self
        from visrl.train.lora import has_gpu

        return dataclasses.replace(self, cpu=not has_gpu())


# ---------------------------------------------------------------------- starting

def build_command(kind: str, config_path: str | Path, root: str | Path, job_id: int,
                  launcher: Launcher | None = None, extra_args: Sequence[str] = (),
                  python: str = sys.executable) -> list[str]:
    """The child's argument list (pure; no shell ever parses it)."""
    stage = ["-m", "visrl", kind, str(config_path), "--workspace", str(root),
             "--job-id", str(job_id), *extra_args]
    if launcher is None:
        return [python, *stage]
    # accelerate's own `-m` flag: the "script" that follows is a module, run like `python -m`.
    return [python, "-m", "accelerate.commands.launch", *launcher.flags(), *stage]


def start_job(workspace: str | Path | Workspace | None, kind: str, config_path: str | Path,
              launcher: Launcher | str | None = None, extra_args: Sequence[str] = (),
              name: str = "") -> int:
    """Validate the config and what it needs, create the job row and spawn the stage.

    Returns the job id. Refused (JobError naming what to do) for a train recipe whose output
    already holds a finished run, and while another active job writes the same
    output folder or generation run: the check and the new row are one write transaction, so
    two quick clicks from two tabs cannot both pass.
    """
    if isinstance(launcher, str):
        launcher = Launcher(launcher)
    if launcher is not None and launcher.data_parallel and stage_of_kind(kind).single_process:
        several = " or ".join(k for k in KINDS if not stage_of_kind(k).single_process)
        raise JobError(f"a {kind} job runs in one process; only {several} jobs take several processes "
                       "(for generation or evaluation at scale, serve the model with vLLM and use "
                       "backend: remote)")
    if launcher is not None:
        launcher = launcher.resolved()
    config_path = Path(config_path).expanduser().resolve()
    store = Store.open(workspace)
    ws = store.workspace
    config = validate_config(kind, config_path, ws)
    if kind == "train" and not extra_args:  # (extra arguments may change output_dir or max_steps)
        from visrl.train.plan import check_will_train

        check_will_train(config, ws.root)  # a recipe that would train nothing is said so now
    job_id = create_exclusive_job(store, kind, config, config_path=str(config_path), name=name or kind)
    log_path = ws.run_dir(job_id) / LOG_NAME
    command = build_command(kind, config_path, ws.root, job_id, launcher, extra_args)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1",  # the log shows lines as they happen
               **(launcher.env() if launcher else {})}
        try:
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        except OSError as exc:
            store.update_job(job_id, status="failed", message=f"could not start: {exc}",
                             exit_code=-1, ended_at=now(), command=json.dumps(command))
            raise JobError(f"could not start job {job_id}: {exc}") from None
    with _CHILDREN_LOCK:
        _CHILDREN[child.pid] = child
        _EXIT_CODES.pop(child.pid, None)  # a recycled pid: the old code belongs to another job
    store.update_job(job_id, status="running", pid=child.pid, command=json.dumps(command),
                     log_path=ws.relative(log_path), started_at=now(), heartbeat_at=now())
    return job_id


def create_exclusive_job(store: Store, kind: str, config: dict[str, Any], config_path: str = "",
                         name: str = "") -> int:
    """Create a ``queued`` job row unless an active job writes the same :func:`job_target`.

    The read of the active jobs and the insert are one ``store.write()`` transaction (SQLite's
    write lock, waited for up to the store's 30 s busy timeout), so of two concurrent starts
    into one folder exactly one gets a row; the other gets a JobError naming the running job.
    """
    refresh_jobs(store)  # a dead job must not hold its folder
    with store.write():
        _refuse_busy(store, kind, config)
        return store.create_job(kind, config, config_path=config_path, name=name or kind)


def check_output_free(store: Store, kind: str, config: dict[str, Any]) -> None:
    """JobError naming the active job that writes ``config``'s output (a read-only early check;
    :func:`create_exclusive_job` is the one that holds)."""
    refresh_jobs(store)
    _refuse_busy(store, kind, config)


def _refuse_busy(store: Store, kind: str, config: dict[str, Any]) -> None:
    root = store.workspace.root
    target = job_target(kind, config, root)
    if target is None:
        return
    for job in store.jobs_with_status(ACTIVE):
        try:
            other = job_target(job["kind"], json.loads(job["config"] or "{}"), root)
        except (TypeError, ValueError):  # a row written by hand: it claims nothing
            continue
        if other == target:
            raise JobError(f"job {job['id']} ({job['kind']} {job['name']!r}, {job['status']}) is already writing "
                           f"{target}; wait for it or stop it, or choose another output folder")


# ---------------------------------------------------------------------- inside the child

def _is_main_rank() -> bool:
    # Under accelerate every rank runs the stage; only rank 0 writes the job's status.
    return int(os.environ.get("RANK", "0") or 0) == 0


def run_stage(workspace: str | Path | Workspace | None, job_id: int | None, desc: str,
              fn: Callable[[Progress], Any], total: int = 0) -> Any:
    """Run ``fn(progress)`` as the body of job ``job_id`` (or as plain terminal work when None).

    In a job: status ``running`` on entry; on return ``stopped`` (a stop was requested) or
    ``succeeded``; on an exception ``failed`` with its message, and the exception propagates
    (the CLI prints ``Error: ...`` and exits 1). SIGTERM/SIGINT become a stop request.
    """
    from visrl.runtime import announce_threads

    announce_threads(desc.split()[0])  # the log says how many torch threads this stage uses
    if job_id is None or not _is_main_rank():
        progress = Progress(None, None, total=total, desc=desc, bar=job_id is None)
        with _stop_handler(progress):
            try:
                return fn(progress)
            finally:
                progress.close()
    store = Store.open(workspace)
    job = store.job(job_id)
    fields: dict[str, Any] = {"status": "running", "heartbeat_at": now(), "total": total}
    if job["pid"] is None:  # run by hand with --job-id; start_job's pid (maybe a launcher) stays
        fields.update(pid=os.getpid(), started_at=now())
    store.update_job(job_id, **fields)
    progress = Progress(store, job_id, total=total, desc=desc)
    with _stop_handler(progress):
        try:
            result = fn(progress)
        except BaseException as exc:
            stopped = isinstance(exc, KeyboardInterrupt)  # a second stop signal
            progress.close()
            store.update_job(job_id, status="stopped" if stopped else "failed",
                             exit_code=130 if stopped else 1, ended_at=now(),
                             message="interrupted" if stopped else _one_line(exc))
            raise
    progress.close()
    if progress.stop_requested:
        store.update_job(job_id, status="stopped", exit_code=0, ended_at=now(),
                         message="stopped on request")
    else:
        store.update_job(job_id, status="succeeded", exit_code=0, ended_at=now(), progress=1.0)
    return result


@contextlib.contextmanager
def _stop_handler(progress: Progress) -> Iterator[None]:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    progress.install_stop_handler()
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if type(exc).__module__.startswith("visrl") else f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------------- watching and stopping

def _epoch(stamp: str | None) -> float | None:
    return dt.datetime.fromisoformat(stamp).timestamp() if stamp else None


def process_state(pid: int | None, started_at: str | None = None) -> tuple[bool, int | None]:
    """(alive, exit code if known) of a job's process; reaps it when it is our child.

    Dead means: no such process, a zombie, or a process created after the job started (the
    pid was recycled). The exit code is known only for children of this process.
    """
    import psutil

    if pid is None:
        return False, None
    _reap_children()
    with _CHILDREN_LOCK:
        if pid in _EXIT_CODES:
            return False, _EXIT_CODES[pid]
        if pid in _CHILDREN:
            return True, None
    with contextlib.suppress(ChildProcessError):  # our child, but started before a "restart"
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return False, os.waitstatus_to_exitcode(status)
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, None
        started = _epoch(started_at)
        if started is not None and proc.create_time() > started + PID_REUSE_SLACK_S:
            return False, None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False, None
    return True, None


def _reap_children() -> None:
    """Collect the exit codes of our finished children (finished jobs must not stay zombies).

    Safe under threads: one thread at a time polls and moves a child to ``_EXIT_CODES``.
    """
    with _CHILDREN_LOCK:
        for pid, child in list(_CHILDREN.items()):
            code = child.poll()
            if code is not None:
                _EXIT_CODES[pid] = code
                _CHILDREN.pop(pid, None)


def refresh_jobs(store: Store) -> list[int]:
    """Mark jobs whose process is gone as failed (stopped, if a stop was asked); returns ids."""
    _reap_children()
    failed = []
    for job in store.jobs_with_status(SPAWNED):
        alive, code = process_state(job["pid"], job["started_at"])
        if alive:
            continue
        tail = log_tail(store.workspace, job["id"], lines=20, job=job).strip()
        message = f"process {job['pid']} exited" + (f" with code {code}" if code is not None else "")
        message += (":\n" + tail) if tail else " without a log"
        # A job asked to stop that died before it could say so (e.g. SIGTERM during its imports,
        # before the stop handler existed) did what was asked: stopped, not failed.
        status = "stopped" if job["status"] == "stopping" else "failed"
        # Conditional: the child may have written its final status just before exiting.
        if store.update_job_if(job["id"], SPAWNED, status=status, message=message,
                               exit_code=code if code is not None else -1, ended_at=now()):
            failed.append(job["id"])
    stale = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=QUEUED_STALE_S)).isoformat(timespec="seconds")
    store.fail_unstarted_jobs(stale, "never started: the process starting it ended before it spawned the job")
    return failed


def stop_job(workspace: str | Path | Workspace | None, job_id: int, force: bool = False,
             timeout: float = 0.0, grace: float = 10.0) -> dict[str, Any]:
    """Ask job ``job_id`` to stop (SIGTERM to its process group, once); returns its row.

    One-shot: only the call that moves the job from running to ``stopping`` signals it; a
    second stop of a stopping job sends nothing (the stage treats a second SIGTERM as "kill
    now, without saving"). ``timeout`` > 0 waits that long for it to exit. ``force`` waits
    ``grace`` seconds, then kills the group (:func:`kill_job`).
    """
    store = Store.open(workspace)
    refresh_jobs(store)
    job = store.job(job_id)
    if job["status"] not in ACTIVE:
        raise JobError(f"job {job_id} is not running (status {job['status']})")
    pid = job["pid"]
    # Conditional: the job may have ended or been stopped since it was read.
    if store.update_job_if(job_id, STOPPABLE, status="stopping", message="stop requested"):
        _signal_group(pid, signal.SIGTERM)
    wait = grace if force else timeout
    if wait > 0 and not _wait_exit(pid, job["started_at"], wait) and force:
        return kill_job(store.workspace, job_id, reason=f"killed after {grace:g} s without stopping")
    refresh_jobs(store)
    return store.job(job_id)


def kill_job(workspace: str | Path | Workspace | None, job_id: int,
             reason: str = "killed on request") -> dict[str, Any]:
    """Kill job ``job_id``'s process group now (SIGKILL: nothing since its last checkpoint is
    saved) and mark it ``stopped`` with ``reason``; returns its row."""
    store = Store.open(workspace)
    refresh_jobs(store)
    job = store.job(job_id)
    if job["status"] not in ACTIVE:
        raise JobError(f"job {job_id} is not running (status {job['status']})")
    _signal_group(job["pid"], signal.SIGKILL)
    _wait_exit(job["pid"], job["started_at"], 5.0)
    store.update_job_if(job_id, ACTIVE, status="stopped", exit_code=-signal.SIGKILL, message=reason,
                        ended_at=now())
    refresh_jobs(store)
    return store.job(job_id)


def _signal_group(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    try:
        # Only a job started by start_job leads its own group; signalling the group of a job run
        # by hand would hit the user's shell, so then only the process itself gets the signal.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _wait_exit(pid: int | None, started_at: str | None, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not process_state(pid, started_at)[0]:
            return True
        time.sleep(0.1)
    return not process_state(pid, started_at)[0]


# ---------------------------------------------------------------------- reading

def list_jobs(workspace: str | Path | Workspace | None, limit: int = 50) -> list[dict[str, Any]]:
    store = Store.open(workspace)
    refresh_jobs(store)
    return store.jobs(limit=limit)


def job_status(workspace: str | Path | Workspace | None, job_id: int) -> dict[str, Any]:
    """The job row with ``command``/``config`` decoded and ``metrics``: name -> latest (step, value)."""
    store = Store.open(workspace)
    refresh_jobs(store)
    return store.job_details(job_id)


def log_path(workspace: str | Path | Workspace | None, job_id: int,
             job: dict[str, Any] | None = None) -> Path:
    ws = workspace if isinstance(workspace, Workspace) else Workspace.open(workspace)
    job = job or Store(ws).job(job_id)
    return ws.absolute(job["log_path"]) if job.get("log_path") else ws.runs_dir / str(job_id) / LOG_NAME


def log_tail(workspace: str | Path | Workspace | None, job_id: int, lines: int = 200,
             job: dict[str, Any] | None = None, max_bytes: int = 256_000) -> str:
    """The last ``lines`` lines of the job's log (progress-bar redraws collapsed to their last)."""
    path = log_path(workspace, job_id, job)
    if not path.is_file():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - max_bytes))
        text = f.read().decode("utf-8", errors="replace")
    # tqdm redraws a line with carriage returns when writing to a file; keep the last state.
    rows = [row.rstrip("\r").rsplit("\r", 1)[-1] for row in text.split("\n")]
    if rows and rows[-1] == "":
        rows.pop()
    return "\n".join(rows[-lines:]) + ("\n" if rows else "")


def follow_log(workspace: str | Path | Workspace | None, job_id: int, poll_s: float = 0.5,
               from_start: bool = True) -> Iterator[str]:
    """Yield chunks of the log as they are written, until the job has ended."""
    store = Store.open(workspace)
    path = log_path(store.workspace, job_id)
    position = 0 if from_start else (path.stat().st_size if path.is_file() else 0)
    while True:
        refresh_jobs(store)
        active = store.job(job_id)["status"] in ACTIVE
        if path.is_file():
            with open(path, "rb") as f:
                f.seek(position)
                chunk = f.read()
            position += len(chunk)
            if chunk:
                yield chunk.decode("utf-8", errors="replace")
        if not active:
            return
        time.sleep(poll_s)
