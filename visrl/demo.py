"""The built-in demo workspace: the synthetic benchmark, a tiny model, and a first set of pairs.

:func:`create_demo_workspace` makes a workspace where every tab of the app works offline:

1. the demo benchmark (:mod:`visrl.synthetic`, the 3-object pattern task the shipped model learned)
   written as Visual-CoT files and imported through the same importer as real data
   (dataset ``demo``, splits train/val/test);
2. the model at :data:`DEMO_MODEL` (the path every ``configs/demo`` recipe names): a copy of the
   shipped ``data/demo-model`` when it holds weights, else a freshly built random tiny model,
   registered as a checkpoint;
3. the shipped model's numbers (its card's test evaluation, ``training_report.json``) and the
   learning benchmark's arms (:data:`BENCH_FILE`, written by ``bench/learning.py``) as
   stored evaluations, so the Evaluate tab shows before/after without running anything;
4. with the shipped (trained) model, a first generation run (``configs/demo/generate.yaml`` on
   the first ``n_pairs_items`` train items), so the Pairs tab has content on first start.

A marker file written last tells a complete workspace from one a crash left half-built: the
first is left alone, the second is rebuilt. Only folders that are empty or hold a demo marker are
ever (re)built; an ordinary workspace is refused.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from visrl.errors import ConfigError, VisRLError, WorkspaceError
from visrl.progress import Progress
from visrl.store import Store, now
from visrl.workspace import DB_NAME, Workspace

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = ROOT / "data" / "demo-model"
GENERATE_CONFIG = ROOT / "configs" / "demo" / "generate.yaml"
MODEL_REPORT = SHIPPED_MODEL / "training_report.json"  # its config.data: = the task it learned
BENCH_FILE = "learning_benchmark.json"  # bench/learning.py's output, shipped beside the model
MAX_REPORT_BYTES = 2 * 2**20  # both reports are a few kB; a larger file is not ours: skip it
# The card's metric names -> visrl.evaluate's (the Evaluate tab compares them side by side).
CARD_METRICS = {"acc@0.5": "acc50", "mean_iou": "mean_iou", "parse_rate": "parse_rate",
                "two_step_acc": "answer_acc", "direct_acc": "direct_answer_acc",
                "true_crop_acc": "true_crop_answer_acc"}
# The learning benchmark's arms, in its table's order, with the labels the Evaluate tab shows.
BENCH_ARMS = {"warmup": "SFT warm-up (few boxes)",
              "control_a": "control A: warm-up + SFT continued on the few boxes",
              "control_b": "control B: warm-up + SFT on the answers (no boxes)",
              "upper": "upper bound: warm-up + SFT with boxes on every item",
              "visrl_stage1": "warm-up + VisRL stage 1 only (box-step DPO)",
              "visrl": "warm-up + VisRL (answer judge only)",
              "grpo": "warm-up + GRPO (answer reward only)"}
BENCH_VERSION = 2  # bench/learning.py's output format (its ``bench_version`` key)
# The arms of each version. Version 1 files (no ``bench_version``) judged with a crop judge beside
# the answer judge; their arms keep their own labels. A version not listed is skipped with a log line.
BENCH_ARMS_BY_VERSION = {
    1: {"warmup": "SFT warm-up (few boxes)", "control": "warm-up + SFT continued (control)",
        "visrl": "warm-up + VisRL (model crop judge)", "visrl_iou": "VisRL with IoU crop judge (ablation)"},
    BENCH_VERSION: BENCH_ARMS}
PAIR_KEYS = {"visrl": "generate", "visrl_stage1": "generate", "visrl_iou": "generate_iou"}  # a seed's record of a VisRL arm's run
DEMO_DATASET = "demo"
DEMO_MODEL = "models/tiny-demo"  # workspace-relative; configs/demo/*.yaml name this folder
COMPLETE = ".demo-complete"  # written last: the workspace is whole
BUILDING = ".demo-building"  # written first: a crash leaves it, and the next start rebuilds
# The task of the shipped model, used when its training report is not at hand: a small line
# pattern (horizontal, vertical, checkered) that blurs to the same grey in the overview and is
# legible only in the crop; objects of distinct colours.
# The workspace's scenes hold 3 objects, each with its own pattern, whatever the model was trained
# on: then a crop of any other object answers wrong, so the exact answer judge alone (the demo's
# generate.yaml: crop_judge: none) tells a right box from a wrong one, as the paper's answer rewards
# do, with no box annotation read.
ANSWER_JUDGE_TASK: dict[str, Any] = {"min_objects": 3, "max_objects": 3, "distinct_details": True}
DEMO_DATA: dict[str, Any] = {"detail": "pattern", "pattern_size": 13, "pattern_line": 1,
                             "object_size": (80, 96), "distinct_colours": True, "dataset_name": "visrl_demo",
                             **ANSWER_JUDGE_TASK}

Say = Callable[[str], None]
SAY_EVERY_S = 10.0  # generating the first pairs takes minutes: a line every 10 s shows it moves


def create_demo_workspace(root: str | Path, force: bool = False, n_pairs_items: int = 40,
                          progress: Say | None = None, data: dict[str, Any] | None = None) -> Path:
    """Create (or finish) the demo workspace at ``root``; returns its folder.

    ``force`` rebuilds a complete demo workspace. ``n_pairs_items`` train items get rollouts and
    pairs (0: none). ``progress`` receives one line per step (default: the log). ``data``
    overrides :class:`visrl.synthetic.SyntheticConfig` fields (tests make a smaller benchmark).
    """
    say = progress or log.info
    root = Path(root).expanduser().resolve()
    if (root / COMPLETE).is_file() and not force:
        return root
    _clear(root)
    ws = Workspace.open(root)
    (root / BUILDING).write_text(now() + "\n")
    store = Store(ws)
    # The store migrates a database file once per process; a rebuilt one is a new file.
    store.migrate()
    summary: dict[str, Any] = {"created_at": now()}
    summary["items"] = import_benchmark(store, {**demo_data(), **(data or {})}, say)
    summary["model"] = install_model(store, say)
    summary["evaluations"] = seed_evaluations(store, say) if summary["model"] else 0
    if summary["model"] and not (SHIPPED_MODEL / "model.safetensors").is_file():
        # A random model parses no boxes (measured: 0 of 288 samples, ~4 min for 24 items on 2
        # cores), so it would only delay the first start for zero pairs.
        say("skipping the first pairs: the model is untrained (data/demo-model has no weights)")
        n_pairs_items = 0
    summary["pairs"] = first_pairs(store, n_pairs_items, say) if summary["model"] else 0
    store.close()
    (root / COMPLETE).write_text(json.dumps(summary, indent=2) + "\n")
    (root / BUILDING).unlink(missing_ok=True)
    say(f"demo workspace ready in {root}: {summary['items']} items, {summary['pairs']} pairs")
    return root


def _clear(root: Path) -> None:
    """Empty a half-built (or forced) demo workspace; refuse a folder that is not a demo one."""
    if not root.exists() or not any(root.iterdir()):
        return
    if not ((root / COMPLETE).exists() or (root / BUILDING).exists()):
        has_db = (root / DB_NAME).exists()
        raise WorkspaceError(
            f"{root} is not empty{' and holds a workspace' if has_db else ''} that is not a demo "
            "workspace; choose an empty or new folder for the demo")
    for child in root.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def demo_data() -> dict[str, Any]:
    """SyntheticConfig fields of the demo workspace: the task the shipped model was trained on (its
    training report), as :data:`ANSWER_JUDGE_TASK` scenes."""
    if MODEL_REPORT.is_file():
        data = json.loads(MODEL_REPORT.read_text(encoding="utf-8")).get("config", {}).get("data")
        if isinstance(data, dict) and data:
            return {"dataset_name": "visrl_demo", **data, **ANSWER_JUDGE_TASK}
    return dict(DEMO_DATA)


def import_benchmark(store: Store, data: dict[str, Any], say: Say) -> int:
    """Write the synthetic benchmark to a temporary folder and import each split; returns items."""
    from visrl.formats.viscot import import_viscot
    from visrl.synthetic import SyntheticConfig, split_sizes, write_benchmark

    cfg = SyntheticConfig(**data)
    say(f"writing the demo benchmark ({cfg.n_train}/{cfg.n_val}/{cfg.n_test} scenes) ...")
    total = 0
    with tempfile.TemporaryDirectory(prefix="visrl-demo-") as tmp:
        for split, path in write_benchmark(Path(tmp), cfg).items():
            if split_sizes(cfg)[split]:  # an empty file is an import error
                total += import_viscot(store, path, DEMO_DATASET, split=split)["items"]
    # The files were temporary; say where the data really comes from.
    store.set_dataset_source(DEMO_DATASET, "visrl.synthetic (demo)")
    return total


def install_model(store: Store, say: Say) -> str | None:
    """Put the demo model at :data:`DEMO_MODEL` and register it; None when none can be made."""
    dest = store.workspace.root / DEMO_MODEL
    if (SHIPPED_MODEL / "model.safetensors").is_file():
        say(f"copying the shipped demo model to {DEMO_MODEL} ...")
        shutil.copytree(SHIPPED_MODEL, dest)
        base = "data/demo-model"
    else:
        try:
            from visrl.tiny import build_tiny_model
        except ImportError as exc:
            say(f"no demo model: data/demo-model has no weights and the tiny builder is missing ({exc})")
            return None
        say(f"data/demo-model has no weights; building a random tiny model at {DEMO_MODEL} ...")
        build_tiny_model(dest, preset="demo")
        base = "tiny:demo"
    store.add_checkpoint(DEMO_MODEL, base=base, stage="sft", config={"source": base})
    return DEMO_MODEL


def read_report(path: Path) -> dict[str, Any] | None:
    """A shipped JSON report, or None (with no error) when it is missing, too large or unreadable."""
    try:
        if not path.is_file() or path.stat().st_size > MAX_REPORT_BYTES:
            return None
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    return report if isinstance(report, dict) else None


def seed_evaluations(store: Store, say: Say) -> int:
    """Store the shipped model's card evaluation and the learning benchmark's arms; returns how
    many. Only with the shipped weights: a random model's workspace gets none."""
    if not (SHIPPED_MODEL / "model.safetensors").is_file():
        return 0
    # (model label, metrics, n, split). The split names where the numbers come from: the card and
    # the benchmark scored the generator's own test stream (200 items), not this workspace's
    # test split, so a user's `visrl eval` on demo/test is not the same set.
    rows: list[tuple[str, dict[str, Any], int, str]] = []
    card = (read_report(SHIPPED_MODEL / MODEL_REPORT.name) or {}).get("evaluation")
    if isinstance(card, dict):
        metrics = {new: card[old] for old, new in CARD_METRICS.items() if _number(card.get(old))}
        rows.append((DEMO_MODEL, {**metrics, "source": "data/demo-model/MODEL_CARD.md"},
                     int(card.get("n") or 0), f"{card.get('split') or 'test'} (model card)"))
    rows += bench_rows(read_report(SHIPPED_MODEL / BENCH_FILE) or {})
    checkpoint = next((c["id"] for c in store.checkpoints() if c["path"] == DEMO_MODEL), None)
    with store.atomic():
        for model, metrics, n, split in rows:
            store.add_evaluation(metrics, model=model, adapter=None, dataset=DEMO_DATASET, split=split, n=n,
                                 checkpoint_id=checkpoint if model == DEMO_MODEL else None)
    say(f"stored {len(rows)} evaluations: the shipped model's card and the learning benchmark's arms")
    return len(rows)


def bench_rows(bench: dict[str, Any]) -> list[tuple[str, dict[str, Any], int, str]]:
    """(label, metrics, n, split) of each arm of a learning benchmark report: the seeds' mean and
    std of every metric (``acc50`` and ``acc50_std``), and a VisRL arm's mean pairs."""
    version = bench.get("bench_version", 1)
    arms = BENCH_ARMS_BY_VERSION.get(version) if bench else {}
    if arms is None:
        log.warning("skipping %s: learning benchmark version %r is not one this visrl reads (%s)",
                    SHIPPED_MODEL / BENCH_FILE, version, ", ".join(map(str, BENCH_ARMS_BY_VERSION)))
        return []
    n_seeds = len(bench.get("seeds") or [])
    n_test = int((bench.get("config") or {}).get("test_items") or 0)
    rows = []
    for arm, values in (bench.get("summary") or {}).items():
        if arm not in arms or not isinstance(values, dict):
            continue
        metrics = {k: v["mean"] for k, v in values.items() if isinstance(v, dict) and _number(v.get("mean"))}
        metrics |= {f"{k}_std": v["std"] for k, v in values.items() if isinstance(v, dict) and _number(v.get("std"))}
        metrics["seeds"] = n_seeds  # a spread over seeds widens the intervals (visrl.uncertainty)
        pairs = [_pairs(seed, arm) for seed in bench.get("seeds") or [] if isinstance(seed, dict)]
        if pairs and all(_number(n) for n in pairs):  # a VisRL arm: how many pairs it trained on
            metrics["pairs"] = sum(pairs) / len(pairs)
        label = f"learning benchmark ({n_seeds} seed{'s' * (n_seeds != 1)}): {arms[arm]}"
        if metrics.get("pairs") == 0:  # no DPO step ran: its numbers are the warm-up's, not a result
            label += " - 0 pairs, not trained (= warm-up)"
        rows.append((label, {**metrics, "source": "data/demo-model/learning_benchmark.json"}, n_test,
                     "test (learning benchmark)"))
    return rows


def _pairs(seed: dict[str, Any], arm: str) -> Any:
    """The pairs a seed's VisRL arm trained on (None for the other arms)."""
    gen = seed.get(PAIR_KEYS[arm]) if arm in PAIR_KEYS else None
    return gen.get("pairs") if isinstance(gen, dict) else None


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def demo_generate_config(n_items: int) -> Any:
    """``configs/demo/generate.yaml`` on the demo model alone, limited to ``n_items`` train items."""
    from visrl.config import load_config
    from visrl.generate import GenerateConfig

    if GENERATE_CONFIG.is_file():
        cfg = load_config(GenerateConfig, GENERATE_CONFIG)
    else:  # an install without the repository's configs: the same settings, defaults elsewhere
        cfg = GenerateConfig(model_name_or_path=DEMO_MODEL, dataset=DEMO_DATASET, temperature=1.0,
                             max_new_tokens=40, crop_judge="none")
    # No adapter: the recipe samples from the SFT run the user trains later; the first pairs come
    # from the demo model itself.
    return replace(cfg, model_name_or_path=DEMO_MODEL, adapter_name_or_path=None, dataset=DEMO_DATASET,
                   split="train", limit=n_items)


def first_pairs(store: Store, n_items: int, say: Say) -> int:
    """Generate rollouts and pairs on ``n_items`` train items; 0 when the model cannot run."""
    if n_items < 1:
        return 0
    try:
        from visrl.generate import run_generate

        cfg = demo_generate_config(n_items)
        say(f"generating the first pairs on {n_items} train items (the longest step: minutes on a small CPU) ...")
        report = run_generate(store.workspace, cfg, progress=_SaidProgress(say, desc="demo pairs"))
    except (ImportError, ConfigError) as exc:
        say(f"skipped generating pairs: {exc}")
        return 0
    except VisRLError as exc:  # e.g. a model that does not load: the workspace is still useful
        say(f"generating pairs failed ({exc}); run `visrl generate configs/demo/generate.yaml` later")
        return 0
    say(f"{report.rollouts} rollouts, {report.pairs_total} pairs in {report.seconds:.0f} s")
    return report.pairs_total



class _SaidProgress(Progress):
    """A Progress that also says ``k/n items`` through ``say`` every :data:`SAY_EVERY_S` seconds
    (the first-start page shows these lines; the terminal's tqdm bar is not seen there)."""

    def __init__(self, say: Say, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._say, self._said_at = say, time.monotonic()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        if self.total and time.monotonic() - self._said_at >= SAY_EVERY_S:
            self._said_at = time.monotonic()
            self._say(f"generating pairs: {self.step}/{self.total} items")
