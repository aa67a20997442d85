"""What a generation run would do now, before any model loads: :func:`plan_run`.

The plan names the run (its key and the policy's identity, :mod:`visrl.run_identity`), the
attempts still to generate, the stored rollouts the configured judges have not scored (they are
judged again, nothing is generated for them), and an earlier run with the same settings but
another model (its rollouts are not reused: a new run starts). ``visrl generate --dry-run``
prints :meth:`RunPlan.describe`; the job's first message and the app's readiness line are
:meth:`RunPlan.summary`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from visrl.errors import ConfigError
from visrl.judges import Judge, make_judges
from visrl.run_identity import describe_identity, keyed_identity, lineage, policy_identity, run_key
from visrl.store import Store
from visrl.vocabulary import NEGATIVE_ROLLOUT, POLICY_ROLLOUT, RANDOM_ROLLOUT
from visrl.workspace import Workspace


@dataclass
class RunPlan:
    """What a generation run would do now: its run key, the selected items, and the attempts
    still missing per item id (a resumed or repeated run skips what is stored); the judges'
    keys and how many stored rollouts they have yet to score; ``changed_from``: the newest
    earlier run of these settings whose model differs (``run_key``, ``identity``, ``rollouts``)."""

    run_key: str
    items: list[dict[str, Any]]
    todo: dict[int, list[int]]
    identity: dict[str, Any] = field(default_factory=dict)
    judges: list[str] = field(default_factory=list)
    rejudge: int = 0
    stored: int = 0  # rollouts already stored under this run key
    changed_from: dict[str, Any] | None = None
    lineage: str = ""

    @property
    def pending(self) -> list[dict[str, Any]]:
        return [item for item in self.items if self.todo[item["id"]]]

    @property
    def has_work(self) -> bool:
        """Something to generate, or stored rollouts to judge with the configured judges."""
        return bool(self.pending) or self.rejudge > 0

    def summary(self) -> str:
        n, new = len(self.items), len(self.pending)
        if not n:
            return "nothing to do: the dataset split has no items"
        if not new and not self.rejudge:
            return (f"nothing to do: all {n} items already have every attempt in run {self.run_key}, judged "
                    "by these judges; raise the item limit, or change the model, attempts, sampling or seed "
                    "for a new run")
        if not new:
            return (f"nothing to generate: all {n} items already have every attempt in run {self.run_key}; "
                    f"the judges changed, so {self.rejudge} stored rollouts are judged again "
                    f"({', '.join(self.judges)})")
        text = f"{new} of {n} items to generate in run {self.run_key} ({n - new} done before)"
        if self.rejudge:
            text += f"; {self.rejudge} stored rollouts are judged again by the new judges"
        if self.changed_from is not None:
            text += "; " + self.model_change()
        return text

    def model_change(self) -> str:
        """Why an earlier run's rollouts are not reused: its model differs from this one's."""
        old = self.changed_from or {}
        return (f"the model changed since run {old.get('run_key')} (then {describe_identity(old.get('identity', {}))}; "
                f"now {describe_identity(self.identity)}): a new run, its {old.get('rollouts', 0)} rollouts "
                "are not reused")

    def describe(self) -> list[str]:
        """The plan as lines, for ``visrl generate --dry-run``."""
        attempts = sum(len(a) for a in self.todo.values())
        lines = [f"run key: {self.run_key}", f"model: {describe_identity(self.identity)}",
                 f"items: {len(self.items)} selected, {len(self.pending)} to generate "
                 f"({len(self.items) - len(self.pending)} done before)",
                 f"attempts to generate: {attempts} ({2 * attempts} rollouts: a policy and a negative one each)",
                 f"judges: {', '.join(self.judges)}",
                 f"stored rollouts of this run: {self.stored}; reused as judged: {self.stored - self.rejudge}; "
                 f"judged again (new judges, or not judged yet): {self.rejudge}"]
        if self.changed_from is not None:
            lines.append(self.model_change())
        lines.append(self.summary())
        return lines


def judges_for(ws: Workspace, cfg: Any) -> tuple[Judge, Judge | None]:
    """The answer and crop judges ``cfg`` configures (a local judge model's relative path names
    a workspace folder). Nothing is loaded or asked."""
    from visrl.policy import resolve_model_path

    opts = cfg.judge_options()
    if cfg.crop_judge == "policy":
        opts.model = resolve_model_path(ws, opts.model)
    return make_judges(cfg.answer_judge, cfg.crop_judge, opts)


def plan_run(store: Store, cfg: Any, identity: dict[str, Any] | None = None) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` (a :class:`visrl.generate.GenerateConfig`) against the
    store (reads only). A ``run_key`` named in the config whose stored run sampled another
    model is a ConfigError: its rollouts would mix two models."""
    ws = store.workspace
    identity = identity if identity is not None else policy_identity(cfg, ws)
    key = cfg.run_key or run_key(cfg, identity)
    _check_named_run(store, cfg, key, identity)
    items = store.items(cfg.dataset, cfg.split, limit=cfg.limit)
    done = store.done_attempts(key)
    todo = {item["id"]: [a for a in range(cfg.attempts) if not _attempt_done(done, item["id"], a)]
            for item in items}
    judges = [j.key for j in judges_for(ws, cfg) if j is not None]
    runs = store.generate_runs_of_lineage(lineage(cfg))
    mine = keyed_identity(identity)
    changed = next((r for r in runs if r["run_key"] != key and r["rollouts"]
                    and keyed_identity(r["identity"]) != mine), None)
    return RunPlan(key, items, todo, identity=identity, judges=judges,
                   rejudge=store.unjudged_rollouts(key, judges), stored=len(done),
                   changed_from=changed if not done else None, lineage=lineage(cfg))


def _check_named_run(store: Store, cfg: Any, key: str, identity: dict[str, Any]) -> None:
    if not cfg.run_key:
        return  # a derived key changes with the model by construction
    recorded = store.generate_run(key)
    if recorded and keyed_identity(recorded["identity"]) != keyed_identity(identity):
        raise ConfigError(f"run_key {key!r} holds rollouts of another model ({describe_identity(recorded['identity'])}); "
                          f"the config's model is {describe_identity(identity)}. Name another run_key, or set "
                          "run_key: null for one derived from the model")


def _attempt_done(done: set[tuple[int, int, str]], item_id: int, attempt: int) -> bool:
    return (item_id, attempt, POLICY_ROLLOUT) in done and (
        (item_id, attempt, NEGATIVE_ROLLOUT) in done or (item_id, attempt, RANDOM_ROLLOUT) in done)

