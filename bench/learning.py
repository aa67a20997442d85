"""The learning benchmark: does VisRL on self-generated pairs beat more SFT, from the shipped model?

From the shipped demo model (``data/demo-model``, already SFT-trained on the demo task) and on the
demo benchmark's held-out test split, for each seed:

* ``sft``      the shipped model as it is: two-step (box, then answer on the crop) and direct
               answers. Greedy decoding, so it is evaluated once and shared by every seed.
* ``control``  SFT continued (``configs/demo/train_sft.yaml``: LoRA on the language model, gt
               boxes and answers of the train split) for the same wall time as the VisRL arm took,
               at the VisRL stages' learning rate (constant: it is cut by the clock, not a schedule).
* ``visrl``    ``configs/demo/generate.yaml`` on the first N train items (3 attempts, an exact-match
               answer judge, an IoU >= 0.5 crop judge on the gt box, the method's 0.8 / 0.2
               thresholds) -> pairs -> stage 1 (``train_rl_stage1.yaml``, box-step DPO) -> stage 2
               (``train_rl_stage2.yaml``, 0.5 DPO(box) + 0.5 DPO(answer)), each over the pairs.

Each arm is scored by :func:`visrl.evaluate.run_eval` (Acc@0.5, mean IoU, two-step answer accuracy,
box-parse rate; the shipped model also direct). Every phase is timed. Everything runs in temporary
demo workspaces, one per seed (pairs are selected per workspace, so seeds must not share one).
Writes ``bench/results/learning.json`` and ``bench/results/learning.png``.

    python bench/learning.py            # 3 seeds, 400 items (estimated ~30 min per seed: RL ~14, control ~14)
    python bench/learning.py --quick    # 1 seed, 200 items (<= 20 min on this 2-core CPU)
    python bench/learning.py --jobs 2   # seeds in 2 processes of 1 thread each (one per core)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh clone runs it without installing the package

from visrl.progress import Progress  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "configs" / "demo"
MODEL = "models/tiny-demo"  # the shipped model's place in a demo workspace
METRICS = (("acc50", "Acc@0.5"), ("mean_iou", "mean IoU"), ("answer_acc", "answer (two-step)"),
           ("parse_rate", "box parse"))
ARMS = (("sft", "SFT (shipped)"), ("control", "SFT continued (control)"), ("visrl", "SFT + VisRL"))


class DeadlineProgress(Progress):
    """A progress whose stop request fires by the clock: training ends ``seconds`` after creation.

    The training callback checks ``stop_requested`` after every optimizer step and then saves, so
    the control's wall time (model load and data included) matches the VisRL arm's to one step.
    """

    def __init__(self, seconds: float) -> None:
        super().__init__(bar=False, desc="control")
        self.deadline = time.monotonic() + seconds

    @property
    def stop_requested(self) -> bool:
        return time.monotonic() >= self.deadline

    @stop_requested.setter
    def stop_requested(self, value: bool) -> None:  # Progress.__init__ sets it; the clock decides
        pass


# ---------------------------------------------------------------------- phases

def make_workspace(parent: Path, name: str, n_train: int, n_test: int) -> Path:
    from visrl.demo import create_demo_workspace

    # n_pairs_items=0: the bench makes its own pairs, with its own seed.
    return create_demo_workspace(parent / name, n_pairs_items=0, progress=lambda _: None,
                                 data={"n_train": n_train, "n_val": 0, "n_test": n_test})


def evaluate(ws: Path, model: str, adapter: str | None, n_test: int, direct: bool, out: str) -> dict:
    from visrl.config import load_config
    from visrl.evaluate import EvalConfig, run_eval

    cfg = load_config(EvalConfig, CONFIGS / "eval.yaml", {
        "model_name_or_path": model, "adapter_name_or_path": adapter, "limit": n_test,
        "batch_size": 25, "box_format": "viscot", "answer_judge": "exact",
        "direct_baseline": direct, "output_dir": out})
    return run_eval(ws, cfg).metrics


def generate_pairs(ws: Path, n_items: int, seed: int) -> dict[str, Any]:
    """Rollouts on the first ``n_items`` train items, judged and paired; what was kept and why."""
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_generate
    from visrl.pairs import build_pairs
    from visrl.store import Store

    cfg = load_config(GenerateConfig, CONFIGS / "generate.yaml", {
        "model_name_or_path": MODEL, "adapter_name_or_path": None, "split": "train",
        "limit": n_items, "attempts": 3, "box_format": "viscot", "answer_judge": "exact",
        "crop_judge": "iou_threshold", "iou_threshold": 0.5, "batch_size": 16, "seed": seed})
    report = run_generate(ws, cfg)
    store = Store.open(ws)
    # Called again on the same source it adds nothing; it only says why the other items gave none.
    skipped = build_pairs(store, cfg.pairs_config(), run_key=report.run_key, source=report.run_key).skipped
    rollouts = [r for r in store.rollouts(run_key=report.run_key) if r["kind"] == "policy"]
    store.close()
    return {"items": report.items, "rollouts": report.rollouts, "parse_rate": report.parse_rate,
            "pairs": report.pairs_total, "skipped": skipped,
            "policy_hit_rate": _share(r["crop_score"] for r in rollouts),
            "policy_answer_rate": _share(r["answer_score"] for r in rollouts),
            "thresholds": asdict(cfg.pairs_config())}


def _share(scores: Any) -> float:
    values = [float(s or 0.0) for s in scores]
    return round(sum(values) / len(values), 4) if values else 0.0


def train_stage(ws: Path, recipe: str, overrides: dict[str, Any], progress: Progress | None = None) -> Any:
    from visrl.train.config import load_train_config
    from visrl.train.run import train

    base = {"resume_from_checkpoint": False, "save_steps": 100_000, "save_total_limit": 1,
            "logging_steps": 10, "box_format": "viscot", "bf16": False, "gradient_checkpointing": False}
    cfg = load_train_config(CONFIGS / recipe, {**base, **overrides})
    return train(cfg, ws, progress=progress or Progress(bar=False, desc=recipe))


def visrl_arm(ws: Path, args: argparse.Namespace, seed: int, times: dict[str, float]) -> dict:
    """generate -> pairs -> stage 1 -> stage 2; returns where the result is and the pair counts."""
    import torch

    torch.manual_seed(seed)  # box sampling
    t = time.monotonic()
    gen = generate_pairs(ws, args.items, seed)
    times["generate"] = time.monotonic() - t
    print(f"  [seed {seed}] generate: {gen['items']} items, {gen['rollouts']} rollouts, {gen['pairs']} pairs "
          f"({times['generate']:.0f} s); no pair: {gen['skipped']}", flush=True)
    if gen["pairs"] < 2:
        raise SystemExit(f"seed {seed}: only {gen['pairs']} pairs from {args.items} items; use more --items")
    lr = {"learning_rate": args.lr, "per_device_train_batch_size": args.dpo_batch, "seed": seed,
          "max_steps": -1, "pair_status": ["pending", "accepted"], "adapter_name_or_path": None}
    t = time.monotonic()
    s1 = train_stage(ws, "train_rl_stage1.yaml", {**lr, "model_name_or_path": MODEL,
                                                  "output_dir": "models/bench-stage1",
                                                  "num_train_epochs": args.stage1_epochs})
    times["stage1"] = time.monotonic() - t
    print(f"  [seed {seed}] stage 1: {s1.global_step} steps ({times['stage1']:.0f} s)", flush=True)
    t = time.monotonic()
    s2 = train_stage(ws, "train_rl_stage2.yaml", {**lr, "model_name_or_path": s1.base,
                                                  "adapter_name_or_path": str(s1.path),
                                                  "output_dir": "models/bench-stage2",
                                                  "num_train_epochs": args.stage2_epochs})
    times["stage2"] = time.monotonic() - t
    print(f"  [seed {seed}] stage 2: {s2.global_step} steps ({times['stage2']:.0f} s)", flush=True)
    return {"model": s2.base, "adapter": str(s2.path), "generate": gen,
            "steps": {"stage1": s1.global_step, "stage2": s2.global_step}}


def control_arm(ws: Path, args: argparse.Namespace, seed: int, seconds: float) -> dict:
    import torch

    torch.manual_seed(seed)
    t = time.monotonic()
    result = train_stage(ws, "train_sft.yaml", {
        "model_name_or_path": MODEL, "adapter_name_or_path": None, "output_dir": "models/bench-control",
        "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
        "max_steps": 100_000, "seed": seed}, progress=DeadlineProgress(seconds))
    spent = time.monotonic() - t
    print(f"  [seed {seed}] control: {result.global_step} SFT steps x {args.sft_batch} ({spent:.0f} s of {seconds:.0f} s)",
          flush=True)
    return {"model": MODEL, "adapter": str(result.path), "steps": result.global_step, "seconds": spent}


def run_seed(parent: Path, args: argparse.Namespace, seed: int) -> dict:
    times: dict[str, float] = {}
    ws = make_workspace(parent, f"seed-{seed}", args.n_train, args.test_items)
    rl = visrl_arm(ws, args, seed, times)
    budget = times["generate"] + times["stage1"] + times["stage2"]
    control = control_arm(ws, args, seed, budget)
    times["control"] = control["seconds"]
    out: dict[str, Any] = {"seed": seed, "pairs": rl["generate"]["pairs"], "generate": rl["generate"],
                           "steps": {**rl["steps"], "control": control["steps"]}}
    for arm, run in (("visrl", rl), ("control", control)):
        t = time.monotonic()
        out[arm] = evaluate(ws, run["model"], run["adapter"], args.test_items, False, f"exports/eval-{arm}")
        times[f"eval_{arm}"] = time.monotonic() - t
        print(f"  [seed {seed}] eval {arm}: {_line(out[arm])} ({times[f'eval_{arm}']:.0f} s)", flush=True)
    out["times_s"] = {k: round(v, 1) for k, v in times.items()}
    out["rl_seconds"] = round(budget, 1)
    return out


def _line(m: dict) -> str:
    return "  ".join(f"{label} {m[key]:.3f}" for key, label in METRICS)


# ---------------------------------------------------------------------- summary

def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def summarize(baseline: dict, seeds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    summary = {"sft": {key: mean_std([baseline[key]]) for key, _ in METRICS}}
    summary["sft"]["direct_answer_acc"] = mean_std([baseline["direct_answer_acc"]])
    for arm in ("control", "visrl"):
        summary[arm] = {key: mean_std([s[arm][key] for s in seeds]) for key, _ in METRICS}
    return summary


def table(summary: dict, n_seeds: int) -> str:
    lines = ["| arm | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for arm, label in ARMS:
        cells = [f"{summary[arm][key]['mean']:.3f} ± {summary[arm][key]['std']:.3f}" for key, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    direct = summary["sft"]["direct_answer_acc"]["mean"]
    lines.append(f"\nDirect answer (shipped model, no box step): {direct:.3f}. "
                 f"Mean ± std over {n_seeds} seed(s); the shipped model is greedy, so its std is 0.")
    return "\n".join(lines)


def plot(summary: dict, seeds: list[dict], baseline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2), dpi=110)
    width = 0.26
    colours = {"sft": "#9aa5b1", "control": "#e0a030", "visrl": "#2f7ed8"}
    for a, (arm, label) in enumerate(ARMS):
        xs = [m + (a - 1) * width for m in range(len(METRICS))]
        means = [summary[arm][key]["mean"] for key, _ in METRICS]
        stds = [summary[arm][key]["std"] for key, _ in METRICS]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=colours[arm])
        if arm != "sft":  # each seed as a dot on its bar
            for x, (key, _) in zip(xs, METRICS, strict=True):
                ax.plot([x] * len(seeds), [s[arm][key] for s in seeds], "k.", ms=4)
    ax.axhline(baseline["direct_answer_acc"], color="#c03030", ls="--", lw=1,
               label=f"direct answer (shipped) {baseline['direct_answer_acc']:.2f}")
    ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test split")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed and 200 generation items (<= 20 min)")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3; --quick: 1)")
    p.add_argument("--items", type=int, help="train items to generate on (default 400; --quick: 200)")
    p.add_argument("--test-items", type=int, default=200, help="test items scored (the card's 200)")
    p.add_argument("--stage1-epochs", type=float, default=2.0, help="stage-1 epochs over the pairs")
    p.add_argument("--stage2-epochs", type=float, default=2.0, help="stage-2 epochs over the pairs")
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA lr of both stages and of the control")
    p.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step (the recipes' 4)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see THREADS_NOTE)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process (at most one per core: each arm "
                        "is timed, and the control gets the VisRL arm's wall time)")
    p.add_argument("--keep", help="keep the workspaces in this folder (default: a deleted temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.items = args.items or (200 if args.quick else 400)
    args.sft_batch = 8  # configs/demo/train_sft.yaml
    # The control draws gt rows from the whole train split; 2,000 scenes outlast its steps.
    args.n_train = max(args.items, 2000)
    return args


# One thread, not two: on this 2-core machine shared with other jobs, torch with 2 threads ran
# the demo model's generate ~16x slower (a 25-item box step: 20 s vs 1.3 s with 1 thread), its
# worker threads spinning while waiting for a busy core.
THREADS_NOTE = "1 torch thread: 2 threads ran ~16x slower on this shared 2-core CPU"


def _quiet_torch(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per model load is noise here


def _seed_process(parent: Path, args: argparse.Namespace, seed: int) -> dict:
    _quiet_torch(args.threads)
    return run_seed(parent, args, seed)


def run_seeds(parent: Path, args: argparse.Namespace) -> list[dict]:
    """Every seed, one after another or ``args.jobs`` at a time in spawned processes (results in
    seed order either way)."""
    if args.jobs <= 1:
        return [run_seed(parent, args, seed) for seed in range(args.seeds)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    print(f"seeds 0..{args.seeds - 1}, {args.jobs} at a time:", flush=True)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_seed_process, [parent] * args.seeds, [args] * args.seeds, range(args.seeds)))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    _quiet_torch(args.threads)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="visrl-learning-") as tmp:
        parent = Path(args.keep).resolve() if args.keep else Path(tmp)
        t = time.monotonic()
        ws = make_workspace(parent, "baseline", 0, args.test_items)
        baseline = evaluate(ws, MODEL, None, args.test_items, True, "exports/eval-sft")
        print(f"shipped SFT model: {_line(baseline)}  direct {baseline['direct_answer_acc']:.3f} "
              f"({time.monotonic() - t:.0f} s)", flush=True)
        seeds = run_seeds(parent, args)
    summary = summarize(baseline, seeds)
    report = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "threads_note": THREADS_NOTE, "baseline": baseline, "seeds": seeds, "summary": summary,
              "total_seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    pairs = ", ".join(str(s["pairs"]) for s in seeds)
    rl_min = statistics.fmean(s["rl_seconds"] for s in seeds) / 60
    plot(summary, seeds, baseline, args.out.with_suffix(".png"),
         f"demo test split ({args.test_items} items), {args.seeds} seed(s); VisRL: {args.items} items -> "
         f"{pairs} pairs, {rl_min:.1f} min; control: same wall time")
    print("\n" + table(summary, args.seeds))
    print(f"\npairs per seed: {pairs}; RL arm {rl_min:.1f} min per seed; total {report['total_seconds'] / 60:.1f} min")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
