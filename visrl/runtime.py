"""Process-wide settings of a stage process: torch's CPU threads, sampling seeds, and ranks.

**Threads.** torch starts one intra-op thread per core of the machine. With several ranks on one
machine, or on a CPU shared with other work, those threads oversubscribe the cores and spin
against each other: on a 2-core machine shared by eight processes ``visrl generate`` ran 10-15x
slower with torch's default than with one thread, and a stage-2 demo training took 8 min instead
of 40 s (issue 11). Every model stage therefore chooses its thread count once, at the start of
the process (:func:`apply_threads`, called by the CLI for the model commands, before torch is
imported), and says so in its log once its config is read (:func:`announce_threads`, from
:func:`visrl.jobs.run_stage`). The choice, first that applies:

1. ``VISRL_NUM_THREADS`` (or ``visrl --threads N``), an explicit choice;
2. ``OMP_NUM_THREADS``, the usual knob (``torchrun`` sets 1 for each of several ranks);
3. the cores this process may use (CPU affinity, capped by a cgroup CPU quota) divided by the
   ranks on this machine (``LOCAL_WORLD_SIZE``), at least 1.

**Seeds.** :func:`seed_everything` seeds ``random``, numpy and torch from a tuple of parts (the
config's seed, then what identifies the unit of work), so the same config and seed give the
same samples on one device however a run is resumed or batched around that unit.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from visrl.errors import ConfigError

THREADS_ENV = "VISRL_NUM_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota_us|max> <period_us>"


@dataclass(frozen=True)
class ThreadChoice:
    """How many intra-op threads torch uses in this process, and why."""

    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.count} torch thread{'s' if self.count != 1 else ''} ({self.reason})"


def available_cores(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity is the limit
    return max(1, cores)


def local_ranks(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job on this machine (``LOCAL_WORLD_SIZE`` under torchrun/accelerate)."""
    return _count(environ, "LOCAL_WORLD_SIZE")


def _count(environ: Mapping[str, str] | None, name: str) -> int:
    """A launcher's process count from ``name`` in the environment; 1 when unset or unreadable."""
    env = os.environ if environ is None else environ
    try:
        return max(1, int(env.get(name, "1") or 1))
    except ValueError:
        return 1


def _positive(name: str, value: str) -> int:
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(f"{name}={value!r} is not a thread count; set it to a whole number >= 1 "
                          f"(e.g. {name}=1 on a shared machine) or unset it")
    return count


def choose_threads(environ: Mapping[str, str] | None = None, cores: int | None = None) -> ThreadChoice:
    """The thread count for this process (see the module doc for the order of the rules)."""
    env = os.environ if environ is None else environ
    if env.get(THREADS_ENV):
        return ThreadChoice(_positive(THREADS_ENV, env[THREADS_ENV]), f"{THREADS_ENV}")
    if env.get("OMP_NUM_THREADS"):
        return ThreadChoice(_positive("OMP_NUM_THREADS", env["OMP_NUM_THREADS"]), "OMP_NUM_THREADS")
    cores = available_cores() if cores is None else cores
    ranks = local_ranks(env)
    count = max(1, cores // ranks)
    why = f"{cores} core{'s' if cores != 1 else ''} available"
    if ranks > 1:
        why += f" / {ranks} processes on this machine"
    return ThreadChoice(count, f"{why}; set {THREADS_ENV} to change")


_CHOSEN: list[ThreadChoice] = []  # this process's choice, once made (announce_threads reads it)


def apply_threads(environ: Mapping[str, str] | None = None) -> ThreadChoice:
    """Choose the thread count and make torch use it, without importing torch.

    ``OMP_NUM_THREADS`` (and MKL's) is set to the choice, which torch reads when it is first
    imported, so a command that stops at a bad config never pays for the import; a torch that is
    already imported (tests, benchmarks) is set directly.
    """
    choice = choose_threads(environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(choice.count)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(choice.count)
    _CHOSEN[:] = [choice]
    return choice


def announce_threads(stage: str) -> str | None:
    """The log line of this process's thread choice (None when none was made), printed to stderr."""
    if not _CHOSEN:
        return None
    line = f"visrl {stage}: {_CHOSEN[0]}"
    print(line, file=sys.stderr, flush=True)
    return line


def derive_seed(*parts: object) -> int:
    """A 32-bit seed that depends on every part (stable across processes, unlike ``hash``)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_everything(*parts: object) -> int:
    """Seed ``random``, numpy and (when loaded) torch from ``parts``; returns the seed used.

    torch is seeded only when it is already imported: a process without it (a remote backend)
    samples nothing locally and should not pay for the import.
    """
    seed = derive_seed(*parts)
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy comes with every model dependency
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)
    return seed


# ---------------------------------------------------------------------- ranks

def world_size(environ: Mapping[str, str] | None = None) -> int:
    """Processes of this job across machines (``WORLD_SIZE`` under torchrun/accelerate; else 1)."""
    return _count(environ, "WORLD_SIZE")


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """Rank 0 (or no launcher at all): the one process that writes shared files and store rows."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("RANK", "0") or 0) == 0
    except ValueError:
        return True


def single_process_only(stage: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``stage`` under a multi-process launcher (every rank would run it whole)."""
    ranks = world_size(environ)
    if ranks > 1:
        raise ConfigError(
            f"visrl {stage} runs in one process, but this is one of {ranks} ranks (WORLD_SIZE={ranks}): "
            f"each rank would {stage} every item and write the same rows. Run it without accelerate "
            "launch (it batches on one device), or, for many GPUs, serve the model with vLLM "
            "(`vllm serve MODEL`) and set backend: remote, base_url and remote_model in its config")
