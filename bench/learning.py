"""The learning benchmark: the paper's setting in miniature. Do few boxes + VisRL beat more SFT?

VisRL assumes a small annotated set for the SFT warm-up and many plain VQA items (question and
reference answer, no box) for the reinforcement stage, whose judges read no region annotation.
On the demo task (``visrl.synthetic``), from the shipped demo model (``data/demo-model``), per seed:

* ``base``      the shipped model as it is (greedy: evaluated once, shared by every seed).
* ``warmup``    SFT warm-up on a *small boxed set*: ``--boxed`` scenes of their own seeded stream
                (``warmup``, disjoint from the workspace's items), cycled for ``--warmup-minutes``:
                two-step rows (full image -> gt box text, crop -> answer), crop-naming rows
                ("Which object does this image show?" on crops of gt boxes, of other objects and
                off them -> "red circle" / "nothing": what makes the model a crop judge) and direct rows
                (``scripts/train_demo_model.py``, the whole model trained, cosine lr).
* ``control``   the warm-up continued on the same boxed set, the same recipe, for the VisRL
                arm's wall time.
* ``visrl``     from the warm-up, on ``--items`` *unboxed* train items (the workspace's train
                boxes are deleted from the store before this arm runs): ``configs/demo/generate.yaml``
                (3 attempts, exact-match answer judge, crop judge ``policy``: the warm-up model's
                probability of naming the question's object on the crop, :mod:`visrl.crop_judge`; the method's
                0.8 / 0.2 thresholds) -> pairs -> stage 1 (box-step DPO) -> stage 2 (joint DPO),
                LoRA on the language model.
* ``visrl_iou`` the ablation: the same, but the crop judge is IoU >= 0.5 with the annotated box
                (a second workspace whose train items keep their boxes). ``--no-ablation`` skips it.

Each arm is scored by :func:`visrl.evaluate.run_eval` on the test split (Acc@0.5, mean IoU,
two-step answer accuracy, box-parse rate; the shipped model also direct). Every phase is timed;
the VisRL run also reports how often its crop judge agreed with the (withheld) annotated boxes.
Writes ``bench/results/learning.json`` and ``bench/results/learning.png``.

    python bench/learning.py            # 3 seeds, 400 RL items
    python bench/learning.py --quick    # 1 seed, 200 RL items (~40 min on one core of this CPU)
    python bench/learning.py --jobs 2   # seeds in 2 processes of 1 thread each (one per core)
"""

from __future__ import annotations

import argparse
import importlib.util
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
WARMUP, CONTROL = "models/bench-warmup", "models/bench-control"
METRICS = (("acc50", "Acc@0.5"), ("mean_iou", "mean IoU"), ("answer_acc", "answer (two-step)"),
           ("parse_rate", "box parse"))
ARMS = (("base", "shipped model"), ("warmup", "SFT warm-up (few boxes)"),
        ("control", "warm-up + SFT continued (control)"), ("visrl", "warm-up + VisRL, model crop judge"),
        ("visrl_iou", "ablation: VisRL, IoU crop judge (reads boxes)"))
SEED_ARMS = ("warmup", "control", "visrl", "visrl_iou")


# ---------------------------------------------------------------------- phases

def make_workspace(parent: Path, name: str, n_train: int, n_test: int) -> Path:
    from visrl.demo import create_demo_workspace

    # n_pairs_items=0: the bench makes its own pairs, with its own seed.
    return create_demo_workspace(parent / name, n_pairs_items=0, progress=lambda _: None,
                                 data={"n_train": n_train, "n_val": 0, "n_test": n_test})


def strip_boxes(ws: Path, split: str) -> dict[int, str]:
    """Delete the annotated boxes of ``split``'s items from the store (the VisRL arm's items are
    unboxed VQA); returns {item id: the box as it was}, for judging the judge afterwards."""
    from visrl.store import Store

    store = Store.open(ws)
    rows = [r for r in store.items("demo", split) if r.get("gt_box")]
    with store.atomic():
        for row in rows:
            store.db["items"].update(row["id"], {"gt_box": None})
    store.close()
    return {r["id"]: r["gt_box"] for r in rows}


def evaluate(ws: Path, model: str, adapter: str | None, n_test: int, direct: bool, out: str) -> dict:
    from visrl.config import load_config
    from visrl.evaluate import EvalConfig, run_eval

    cfg = load_config(EvalConfig, CONFIGS / "eval.yaml", {
        "model_name_or_path": model, "adapter_name_or_path": adapter, "limit": n_test,
        "batch_size": 25, "box_format": "viscot", "answer_judge": "exact",
        "direct_baseline": direct, "output_dir": out})
    return run_eval(ws, cfg).metrics


def recipe() -> Any:
    """scripts/train_demo_model.py as a module: the warm-up and the control run its loop."""
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def sft_on_boxes(ws: Path, start: str, out: str, args: argparse.Namespace, seed: int, minutes: float) -> dict:
    """The demo recipe on the small boxed set, from ``start`` into ``out`` (workspace folders)."""
    from visrl.demo import demo_data
    from visrl.models import copy_model_info

    module = recipe()
    cfg = module.DemoTrainConfig(
        output_dir=str(ws / out), init_from=str(ws / start), seed=seed, steps=100_000, max_minutes=minutes,
        batch_size=args.sft_batch, learning_rate=args.sft_lr, warmup_steps=10, direct_fraction=0.1,
        check_fraction=args.check_share, data_split="warmup", boxed_items=args.boxed, threads=args.threads,
        device="cpu", workers=0, log_every=50, eval_every=0, data=demo_data())
    report, _, _ = module.train(cfg, ws / out)
    copy_model_info(ws / start, ws / out)
    return {"steps": report["steps"], "seconds": report["train_seconds"], "rows_seen": report["scenes_seen"]}


def generate_pairs(ws: Path, model: str, n_items: int, seed: int, crop_judge: str,
                   withheld: dict[int, str] | None = None) -> dict[str, Any]:
    """Rollouts on the first ``n_items`` train items, judged and paired; what was kept and why.
    ``withheld`` (the boxes deleted from the store) scores the crop judge against them."""
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_generate
    from visrl.pairs import build_pairs
    from visrl.store import Store

    judge = {"crop_judge": "policy", "judge_model": model} if crop_judge == "policy" else {
        "crop_judge": "iou_threshold", "iou_threshold": 0.5}
    cfg = load_config(GenerateConfig, CONFIGS / "generate.yaml", {
        "model_name_or_path": model, "adapter_name_or_path": None, "split": "train",
        "limit": n_items, "attempts": 3, "box_format": "viscot", "answer_judge": "exact",
        "batch_size": 16, "seed": seed, **judge})
    report = run_generate(ws, cfg)
    store = Store.open(ws)
    # Called again on the same source it adds nothing; it only says why the other items gave none.
    skipped = build_pairs(store, cfg.pairs_config(), run_key=report.run_key, source=report.run_key).skipped
    rollouts = store.rollouts(run_key=report.run_key)
    store.close()
    policy = [r for r in rollouts if r["kind"] == "policy"]
    out = {"items": report.items, "rollouts": report.rollouts, "parse_rate": report.parse_rate,
           "pairs": report.pairs_total, "skipped": skipped, "crop_judge": cfg.crop_judge,
           "policy_crop_score": _share(r["crop_score"] for r in policy),
           "policy_answer_rate": _share(r["answer_score"] for r in policy),
           "thresholds": asdict(cfg.pairs_config())}
    if withheld:
        out["judge_vs_boxes"] = judge_agreement(rollouts, withheld)
    return out


def judge_agreement(rollouts: list[dict], withheld: dict[int, str]) -> dict[str, Any]:
    """How the crop judge's scores sit against the withheld boxes: of the rollouts it passed
    (>= 0.8) and failed (<= 0.2), the share whose box has IoU > 0.5 with the annotated one."""
    from visrl.boxes import iou
    from visrl.store import box_from_json

    hit = {"passed": [], "failed": []}
    for r in rollouts:
        box, gt = box_from_json(r["box"]), box_from_json(withheld.get(r["item_id"]))
        if box is None or gt is None or r["crop_score"] is None:
            continue
        side = "passed" if r["crop_score"] >= 0.8 else "failed" if r["crop_score"] <= 0.2 else None
        if side:
            hit[side].append(iou(box, gt) > 0.5)
    return {f"{side}_n": len(v) for side, v in hit.items()} | {
        f"{side}_iou_hit": round(sum(v) / len(v), 4) if v else None for side, v in hit.items()}


def _share(scores: Any) -> float:
    values = [float(s or 0.0) for s in scores]
    return round(sum(values) / len(values), 4) if values else 0.0


def train_stage(ws: Path, recipe_file: str, overrides: dict[str, Any]) -> Any:
    from visrl.train.config import load_train_config
    from visrl.train.run import train

    base = {"resume_from_checkpoint": False, "save_steps": 100_000, "save_total_limit": 1,
            "logging_steps": 10, "box_format": "viscot", "bf16": False, "gradient_checkpointing": False}
    cfg = load_train_config(CONFIGS / recipe_file, {**base, **overrides})
    return train(cfg, ws, progress=Progress(bar=False, desc=recipe_file))


def visrl_arm(ws: Path, args: argparse.Namespace, seed: int, crop_judge: str, tag: str,
              withheld: dict[int, str] | None = None) -> dict:
    """generate -> pairs -> stage 1 -> stage 2 from the warm-up; where the result is, pairs, times."""
    import torch

    torch.manual_seed(seed)  # box sampling
    times: dict[str, float] = {}
    t = time.monotonic()
    gen = generate_pairs(ws, WARMUP, args.items, seed, crop_judge, withheld)
    times["generate"] = time.monotonic() - t
    print(f"  [seed {seed}] {tag} generate: {gen['items']} items, {gen['rollouts']} rollouts, {gen['pairs']} pairs "
          f"({times['generate']:.0f} s); judge vs boxes {gen.get('judge_vs_boxes')}; no pair: {gen['skipped']}",
          flush=True)
    if gen["pairs"] < 2:  # nothing to train on: the arm is its start, and says so
        print(f"  [seed {seed}] {tag}: only {gen['pairs']} pairs from {args.items} items; no DPO", flush=True)
        return {"model": WARMUP, "adapter": None, "generate": gen, "times": times,
                "steps": {"stage1": 0, "stage2": 0}}
    lr = {"learning_rate": args.lr, "per_device_train_batch_size": args.dpo_batch, "seed": seed,
          "max_steps": -1, "pair_status": ["pending", "accepted"], "adapter_name_or_path": None}
    t = time.monotonic()
    s1 = train_stage(ws, "train_rl_stage1.yaml", {**lr, "model_name_or_path": WARMUP,
                                                  "output_dir": f"models/bench-{tag}-stage1",
                                                  "num_train_epochs": args.stage1_epochs})
    times["stage1"] = time.monotonic() - t
    t = time.monotonic()
    s2 = train_stage(ws, "train_rl_stage2.yaml", {**lr, "model_name_or_path": s1.base,
                                                  "adapter_name_or_path": str(s1.path),
                                                  "output_dir": f"models/bench-{tag}-stage2",
                                                  "num_train_epochs": args.stage2_epochs})
    times["stage2"] = time.monotonic() - t
    print(f"  [seed {seed}] {tag} stage 1: {s1.global_step} steps ({times['stage1']:.0f} s), "
          f"stage 2: {s2.global_step} steps ({times['stage2']:.0f} s)", flush=True)
    return {"model": s2.base, "adapter": str(s2.path), "generate": gen, "times": times,
            "steps": {"stage1": s1.global_step, "stage2": s2.global_step}}


def run_seed(parent: Path, args: argparse.Namespace, seed: int) -> dict:
    times: dict[str, float] = {}
    ws = make_workspace(parent, f"seed-{seed}", args.items, args.test_items)
    withheld = strip_boxes(ws, "train")  # the VisRL arm's items are unboxed from here on
    warm = sft_on_boxes(ws, MODEL, WARMUP, args, seed, args.warmup_minutes)
    times["warmup"] = warm["seconds"]
    print(f"  [seed {seed}] warm-up: {warm['steps']} steps x {args.sft_batch} rows on {args.boxed} boxed scenes "
          f"({warm['seconds']} s)", flush=True)
    rl = visrl_arm(ws, args, seed, "policy", "visrl", withheld)
    times.update({f"visrl_{k}": v for k, v in rl["times"].items()})
    budget = sum(rl["times"].values())
    control = sft_on_boxes(ws, WARMUP, CONTROL, args, seed, budget / 60)
    times["control"] = control["seconds"]
    print(f"  [seed {seed}] control: {control['steps']} steps x {args.sft_batch} ({control['seconds']} s of "
          f"{budget:.0f} s)", flush=True)
    runs: dict[str, dict[str, Any]] = {"warmup": {"model": WARMUP, "adapter": None},
                                       "control": {"model": CONTROL, "adapter": None}, "visrl": rl}
    out: dict[str, Any] = {"seed": seed, "pairs": rl["generate"]["pairs"], "generate": rl["generate"],
                           "steps": {**rl["steps"], "warmup": warm["steps"], "control": control["steps"]}}
    if args.ablation:
        iou_ws = make_workspace(parent, f"seed-{seed}-iou", args.items, args.test_items)
        _copy_model(ws / WARMUP, iou_ws / WARMUP)
        ablation = visrl_arm(iou_ws, args, seed, "iou_threshold", "visrl_iou")
        times.update({f"visrl_iou_{k}": v for k, v in ablation["times"].items()})
        out["generate_iou"] = ablation["generate"]
        runs["visrl_iou"] = {**ablation, "ws": iou_ws}
    for arm, run in runs.items():
        t = time.monotonic()
        out[arm] = evaluate(run.get("ws", ws), run["model"], run["adapter"], args.test_items, False,
                            f"exports/eval-{arm}")
        times[f"eval_{arm}"] = time.monotonic() - t
        print(f"  [seed {seed}] eval {arm}: {_line(out[arm])} ({times[f'eval_{arm}']:.0f} s)", flush=True)
    out["times_s"] = {k: round(v, 1) for k, v in times.items()}
    out["rl_seconds"] = round(budget, 1)
    return out


def _copy_model(source: Path, dest: Path) -> None:
    import shutil

    shutil.copytree(source, dest)


def _line(m: dict) -> str:
    return "  ".join(f"{label} {m[key]:.3f}" for key, label in METRICS)


# ---------------------------------------------------------------------- summary

def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def summarize(baseline: dict, seeds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    summary = {"base": {key: mean_std([baseline[key]]) for key, _ in METRICS}}
    summary["base"]["direct_answer_acc"] = mean_std([baseline["direct_answer_acc"]])
    for arm in SEED_ARMS:
        if all(arm in s for s in seeds):
            summary[arm] = {key: mean_std([s[arm][key] for s in seeds]) for key, _ in METRICS}
    return summary


def table(summary: dict, n_seeds: int) -> str:
    lines = ["| arm | " + " | ".join(label for _, label in METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for arm, label in ARMS:
        if arm in summary:
            cells = [f"{summary[arm][key]['mean']:.3f} ± {summary[arm][key]['std']:.3f}" for key, _ in METRICS]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    direct = summary["base"]["direct_answer_acc"]["mean"]
    lines.append(f"\nDirect answer (shipped model, no box step): {direct:.3f}. "
                 f"Mean ± std over {n_seeds} seed(s); the shipped model is greedy, so its std is 0.")
    return "\n".join(lines)


def plot(summary: dict, seeds: list[dict], baseline: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [(arm, label) for arm, label in ARMS if arm in summary]
    fig, ax = plt.subplots(figsize=(9.5, 4.4), dpi=110)
    width = 0.8 / len(arms)
    colours = {"base": "#9aa5b1", "warmup": "#6c7a89", "control": "#e0a030", "visrl": "#2f7ed8",
               "visrl_iou": "#9bc1ea"}
    for a, (arm, label) in enumerate(arms):
        xs = [m + (a - (len(arms) - 1) / 2) * width for m in range(len(METRICS))]
        means = [summary[arm][key]["mean"] for key, _ in METRICS]
        stds = [summary[arm][key]["std"] for key, _ in METRICS]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=colours[arm])
        if arm != "base":  # each seed as a dot on its bar
            for x, (key, _) in zip(xs, METRICS, strict=True):
                ax.plot([x] * len(seeds), [s[arm][key] for s in seeds], "k.", ms=4)
    ax.axhline(baseline["direct_answer_acc"], color="#c03030", ls="--", lw=1,
               label=f"direct answer (shipped) {baseline['direct_answer_acc']:.2f}")
    ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test split")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed and 200 RL items")
    p.add_argument("--seeds", type=int, help="number of seeds (default 3; --quick: 1)")
    p.add_argument("--items", type=int, help="unboxed train items the VisRL arm generates on (default 400; --quick: 200)")
    p.add_argument("--boxed", type=int, default=300, help="scenes of the small boxed set (warm-up and control)")
    p.add_argument("--warmup-minutes", type=float, default=5.0, help="wall time of the SFT warm-up")
    p.add_argument("--check-share", type=float, default=0.3,
                   help="share of crop-naming rows in the warm-up and control (the crop judge's skill)")
    p.add_argument("--sft-lr", type=float, default=3e-4, help="peak lr of the warm-up and the control (cosine)")
    p.add_argument("--sft-batch", type=int, default=16, help="rows per warm-up / control step")
    p.add_argument("--test-items", type=int, default=200, help="test items scored (the card's 200)")
    p.add_argument("--stage1-epochs", type=float, default=2.0, help="stage-1 epochs over the pairs")
    p.add_argument("--stage2-epochs", type=float, default=2.0, help="stage-2 epochs over the pairs")
    p.add_argument("--lr", type=float, default=5e-4, help="LoRA lr of both DPO stages")
    p.add_argument("--dpo-batch", type=int, default=4, help="pairs per DPO step (the recipes' 4)")
    p.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the IoU-judge ablation arm (saves one RL run per seed)")
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
        baseline = evaluate(ws, MODEL, None, args.test_items, True, "exports/eval-base")
        print(f"shipped model: {_line(baseline)}  direct {baseline['direct_answer_acc']:.3f} "
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
         f"demo test split ({args.test_items} items), {args.seeds} seed(s); warm-up on {args.boxed} boxed scenes; "
         f"VisRL: {args.items} unboxed items -> {pairs} pairs, {rl_min:.1f} min; control: same wall time")
    print("\n" + table(summary, args.seeds))
    print(f"\npairs per seed: {pairs}; RL arm {rl_min:.1f} min per seed; total {report['total_seconds'] / 60:.1f} min")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
