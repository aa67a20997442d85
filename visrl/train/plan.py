"""What a training recipe will do with its output folder, said before anything starts.

With ``resume_from_checkpoint: auto`` a run continues from the last complete checkpoint of its
``output_dir``. When that checkpoint already reached the recipe's ``max_steps``, the run trains
nothing: it "succeeded" in ~10 s, at step 61 of 60, and nobody was told. :func:`plan_run` reads
the folder (no torch, milliseconds) and :func:`check_will_train` refuses such a start with the
ways on: start fresh in a new folder (:func:`fresh_output`), continue training for more steps
(:func:`continued`), or leave it. ``visrl train``, ``visrl jobs start`` and the app's Train tab
all ask it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visrl.errors import JobError


@dataclass(frozen=True)
class TrainPlan:
    """Where a run starts and where it stops (steps are optimizer steps)."""

    output_dir: Path
    checkpoint: Path | None  # the checkpoint it resumes from; None = from scratch
    start_step: int  # 0, or the checkpoint's global step
    max_steps: int | None  # where it stops; None = set by epochs and data, unknown before loading

    @property
    def finished(self) -> bool:
        """The run would train nothing: its checkpoint already reached ``max_steps``."""
        return self.checkpoint is not None and self.max_steps is not None and self.start_step >= self.max_steps

    def describe(self) -> str:
        if self.checkpoint is None:
            return "starts from scratch"
        total = f" of {self.max_steps}" if self.max_steps is not None else ""
        return f"resumes from {self.checkpoint.name} at step {self.start_step}{total}"


def last_complete_checkpoint(output_dir: Path) -> str | None:
    """The highest ``checkpoint-N`` in ``output_dir`` whose save finished, or None.

    HF Trainer writes ``trainer_state.json`` last in a checkpoint (after weights, optimizer and
    RNG state), so a folder without a readable one is a save that was killed: skipped, left in
    place (the resumed run saves that step again into it).
    """
    found = _last_checkpoint_state(output_dir)
    return str(found[0]) if found else None


def _last_checkpoint_state(output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    if not output_dir.is_dir():
        return None
    steps = sorted(((int(m.group(1)), p) for p in output_dir.iterdir()
                    if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name))), reverse=True)
    for _, path in steps:
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            int(state["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        return path, state
    return None


def plan_run(config: dict[str, Any], root: Path) -> TrainPlan:
    """The plan of the validated train recipe ``config`` (a mapping) in workspace ``root``."""
    from visrl.train.config import resolve_output, resolve_path

    output_dir = resolve_output(root, str(config.get("output_dir")))
    resume = config.get("resume_from_checkpoint", "auto")
    found = None
    if resume == "auto":
        found = _last_checkpoint_state(output_dir)
    elif resume:  # a named checkpoint folder
        path = Path(resolve_path(root, str(resume)) or "")
        state = _read_state(path)
        found = (path, state) if state is not None else None
    max_steps = int(config.get("max_steps") or -1)
    if found is None:
        return TrainPlan(output_dir, None, 0, max_steps if max_steps > 0 else None)
    path, state = found
    if max_steps <= 0:  # by epochs: the checkpoint's run worked out the total from the same data
        max_steps = int(state.get("max_steps") or 0)
    return TrainPlan(output_dir, path, int(state["global_step"]), max_steps if max_steps > 0 else None)


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return state


def fresh_output(config: dict[str, Any], root: Path) -> str:
    """``output_dir`` with the first free ``-2``, ``-3``... suffix (written as the recipe wrote it)."""
    from visrl.train.config import resolve_output

    given = str(config.get("output_dir")).rstrip("/")
    base = re.sub(r"-\d+$", "", given)
    for n in range(2, 1000):
        candidate = f"{base}-{n}"
        if not resolve_output(root, candidate).exists():
            return candidate
    raise JobError(f"no free folder named {base}-N; choose an output_dir yourself")


def continued(config: dict[str, Any], plan: TrainPlan) -> dict[str, Any]:
    """``config`` with ``max_steps`` raised to train as many steps again past the checkpoint."""
    more = int(config.get("max_steps") or -1)
    more = more if more > 0 else plan.max_steps or 1
    return {**config, "max_steps": plan.start_step + more}


def check_will_train(config: dict[str, Any], root: Path, flags: bool = False) -> TrainPlan:
    """The plan, or a JobError when the recipe would train nothing, naming the ways on (as
    ``visrl train`` options when ``flags``, else as recipe keys)."""
    plan = plan_run(config, root)
    if not plan.finished:
        return plan
    fresh, steps = fresh_output(config, root), continued(config, plan)["max_steps"]
    new_folder = f"--output-dir {fresh}" if flags else f"output_dir: {fresh}"
    more = f"--max-steps {steps}" if flags else f"max_steps: {steps}"
    checkpoint = plan.checkpoint.name if plan.checkpoint else ""
    raise JobError(
        f"{config.get('output_dir')} already holds a finished run ({checkpoint}, step "
        f"{plan.start_step} of {plan.max_steps}): starting it again would train nothing. Start fresh "
        f"in a new folder ({new_folder}), continue training for {steps - plan.start_step} more steps "
        f"({more}), or leave it as it is.")
