"""Progress of long work, reported to the store (for the app) and to the terminal.

A stage function takes a :class:`Progress` and calls :meth:`Progress.update` once per step.
Inside a job (``visrl jobs start``; the child gets ``--job-id``) updates land in the ``jobs`` and
``metrics`` tables; outside a job they only drive the tqdm bar. A stop request (SIGTERM or
SIGINT to the job's process group, sent by ``visrl jobs stop`` or the app) sets
:attr:`Progress.stop_requested`; the stage finishes its current step, saves, and returns.
"""

from __future__ import annotations

import signal
import time
from types import FrameType
from typing import Any

from visrl.store import Store, now


class Progress:
    """Step counter with ETA; writes to the store at most every ``min_interval_s`` seconds."""

    def __init__(self, store: Store | None = None, job_id: int | None = None, total: int = 0,
                 desc: str = "", bar: bool = True, min_interval_s: float = 1.0) -> None:
        self.store, self.job_id, self.total, self.desc = store, job_id, total, desc
        self.step = 0
        self.stop_requested = False
        self._start = time.monotonic()
        self._start_step = 0  # steps before it (a resumed run's) took no time of this run
        self._last_write = 0.0
        self._min_interval_s = min_interval_s
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total or None, desc=desc, dynamic_ncols=True)

    @property
    def in_job(self) -> bool:
        return self.store is not None and self.job_id is not None

    def install_stop_handler(self) -> None:
        """Turn SIGTERM/SIGINT into a polite stop request (the first one; a second one kills)."""
        def handler(signum: int, frame: FrameType | None) -> None:
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            self.message("stop requested; finishing the current step and saving")

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def set_total(self, total: int) -> None:
        self.total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def eta_s(self) -> float | None:
        done = self.step - self._start_step
        if not self.total or done <= 0:
            return None
        elapsed = time.monotonic() - self._start
        return elapsed / done * max(0, self.total - self.step)

    def update(self, step: int | None = None, advance: int = 1, metrics: dict[str, float] | None = None,
               message: str | None = None, force: bool = False) -> None:
        """Move to ``step`` (or advance by ``advance``); record ``metrics`` at that step."""
        previous = self.step
        self.step = step if step is not None else self.step + advance
        if self._bar is not None:
            self._bar.update(self.step - previous)
            if metrics:
                self._bar.set_postfix(_headline(metrics), refresh=False)
        if not self.in_job:
            return
        if metrics:
            self.store.add_metrics(self.job_id, self.step, metrics)
        now_s = time.monotonic()
        if force or metrics or now_s - self._last_write >= self._min_interval_s or self.step >= self.total > 0:
            self._write(message)
            self._last_write = now_s

    def begin_at(self, step: int, message: str | None = None) -> None:
        """Start counting at ``step``: 0 for a run from scratch, N for one resumed from a
        checkpoint of step N. Recorded as the job's ``start_step``, so its loss curve joins the
        run it continues (the app's ``curves.resumed_points``)."""
        self._start, self._start_step = time.monotonic(), step
        self.update(step=step, advance=0, message=message, force=True)
        if self.in_job:
            self.store.update_job(self.job_id, start_step=step)

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text)
        if self.in_job:
            self.store.update_job(self.job_id, message=text, heartbeat_at=now())

    def _write(self, message: str | None) -> None:
        fields: dict[str, Any] = {"step": self.step, "total": self.total, "heartbeat_at": now(),
                                  "progress": (self.step / self.total) if self.total else 0.0,
                                  "eta_s": self.eta_s()}
        if message:
            fields["message"] = message
        self.store.update_job(self.job_id, **fields)

    def close(self) -> None:
        if self.in_job:
            self._write(None)
        if self._bar is not None:
            self._bar.close()


# The bar shows a few headline numbers; every metric still goes to the store (and the app's plots).
HEADLINE = ("loss", "box/loss", "answer/loss", "rewards/accuracies", "box/rewards/accuracies",
            "answer/rewards/accuracies", "rewards/margins", "reward", "items_per_s", "parse_rate",
            "acc50", "answer_acc")


def _headline(metrics: dict[str, float]) -> dict[str, str]:
    shown = {k: f"{metrics[k]:.4g}" for k in HEADLINE if k in metrics}
    return shown or {k: f"{v:.4g}" for k, v in list(metrics.items())[:4]}
