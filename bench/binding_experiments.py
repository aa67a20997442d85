"""What makes question-to-object binding learnable on this CPU? Short demo-model runs, side by side.

Each arm is one ``scripts/train_demo_model.py`` run on the demo task (3 objects of distinct colours
and distinct patterns, so chance Acc@0.5 is ~1/3), one torch thread, the same seed; the curve is
val Acc@0.5 (50 items) against optimizer steps, read from the run's ``val {...}`` log lines. Curves
are compared by *steps*, not wall time: a run slowed by other work on the machine gets fewer
steps in its minutes but the same curve.

    python bench/binding_experiments.py --arms base bw10 --jobs 2        # run, then collect
    python bench/binding_experiments.py --collect LOGDIR                  # only collect NAME.log files

Writes ``bench/results/binding_experiments.json`` and ``.png``. ``bench/binding_capacity.py`` is
the capacity check (a plain transformer over the same visual tokens).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TASK = ["data.min_objects=3", "data.max_objects=3", "data.distinct_details=true"]
COMMON = ["batch_size=16", "threads=1", "n_eval=100", "data_split=train"]
# name -> (what it tests, minutes, --set overrides). init: the weights shipped before issue 17 (they
# localise objects and read crops, but pick the named object at chance), kept as data/demo-base;
# the scratch arms set init_from=null (a random Qwen3-VL of the config's sizes, seed 0).
SHORT = ["learning_rate=5e-4", "warmup_steps=20", "eval_every=100", "save_every=100"]  # 12-minute arms
LONG = ["learning_rate=1e-3", "warmup_steps=50", "eval_every=250", "save_every=200", "binding_weight=10"]
NAMES = ["name_fraction=0.4"]
QFIRST = ["question_first=true"]
POINTER = ["learning_rate=1e-3", "warmup_steps=50", "eval_every=250", "save_every=250", "binding_weight=10",
           "box_fraction=0.5", "direct_fraction=0.1", "question_first=true", "pointer_weight=1", "pointer_layer=2",
           "threads=2"]
ARMS: dict[str, tuple[str, float, list[str]]] = {
    "base": ("continued from the base weights, the shipped recipe (lr 5e-4)", 12, SHORT),
    "bw10": ("the same, box leading digits weighted x10", 12, [*SHORT, "binding_weight=10"]),
    "long-bw10": ("box-heavy rows (60% box-only, 10% direct), lr 1e-3, x10 (stopped at step ~1,050)", 55,
                  [*LONG, "box_fraction=0.6", "direct_fraction=0.1"]),
    "long-names": ("40% name rows ('red circle' -> box), 30% box rows, 10% direct, lr 1e-3, x10 (stopped ~1,050)", 45,
                   [*LONG, *NAMES, "box_fraction=0.3", "direct_fraction=0.1"]),
    "long-qfirst": ("as long-names, with the question before the image in every user turn", 40,
                    [*LONG, *NAMES, "box_fraction=0.3", "direct_fraction=0.1", *QFIRST]),
    "qfirst-box": ("question first, box-step rows only (60% box, 40% name), lr 1e-3, x10 (stopped ~850)", 25,
                   [*LONG, *NAMES, "box_fraction=0.6", "direct_fraction=0.0", *QFIRST]),
    "scratch-qfirst": ("from a random start, question first: 50% box rows, 10% direct, lr 1e-3, x10", 28,
                       ["init_from=null", *LONG, "box_fraction=0.5", "direct_fraction=0.1", *QFIRST]),
    "scratch-ifirst": ("the same from the same random start, image first", 28,
                       ["init_from=null", *LONG, "box_fraction=0.5", "direct_fraction=0.1"]),
    # Issue 17, second session: the pointer loss (train_demo_model.py's pointer_weight) breaks the plateau.
    "qfirst-pointer": ("question first + the pointer loss, 50% box rows, x10, 2 threads: the shipped phase 2 "
                       "(configs/demo/train_demo_binding.yaml)", 70, POINTER),
    "warmup-pointer": ("the same on 300 boxed scenes cycled, 800-step cosine, 1 thread: the learning bench's "
                       "warm-up (stopped at step 500)", 40,
                       ["steps=800", "learning_rate=1e-3", "warmup_steps=10", "eval_every=100", "save_every=0",
                        "binding_weight=10", "direct_fraction=0.1", "data_split=warmup", "boxed_items=300", *QFIRST,
                        "pointer_weight=1"]),
    "long-bw30": ("box-heavy rows, lr 2e-3, leading digits x30 (stopped at step ~600)", 55,
                  ["learning_rate=2e-3", "warmup_steps=50", "eval_every=250", "save_every=200",
                   "binding_weight=30", "box_fraction=0.6", "direct_fraction=0.1"]),
}


def command(name: str, init: Path, out: Path) -> list[str]:
    _, minutes, sets = ARMS[name]
    args = [sys.executable, str(ROOT / "scripts" / "train_demo_model.py"),
            str(ROOT / "configs" / "demo" / "train_demo_model.yaml"), "--out", str(out / name),
            "--device", "cpu", "--workers", "0", "--max-minutes", str(minutes)]
    for pair in [f"init_from={init}", *COMMON, *TASK, *sets]:
        args += ["--set", pair]
    return args


def run_arm(name: str, init: Path, out: Path) -> None:
    with open(out / f"{name}.log", "w", encoding="utf-8") as log:
        subprocess.run(command(name, init, out), stdout=log, stderr=subprocess.STDOUT, check=False,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def curve(log: Path) -> list[dict]:
    """The ``val {...}`` lines of a training log, in order."""
    points = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("val {"):
            points.append(json.loads(line[4:]))
    return points


def collect(logdir: Path, out: Path) -> dict:
    arms = {}
    for name, (what, minutes, sets) in ARMS.items():
        log = logdir / f"{name}.log"
        if log.is_file():
            arms[name] = {"what": what, "minutes": minutes, "overrides": [*COMMON, *TASK, *sets],
                          "curve": curve(log)}
    report = {"metric": "val Acc@0.5 (50 items; chance ~0.33)", "arms": arms}
    start = logdir / "start.json"  # the starting weights' own val metrics (step 0 of every arm)
    if start.is_file():
        report["start"] = json.loads(start.read_text(encoding="utf-8"))
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, out.with_suffix(".png"))
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 7), dpi=110)
    for name, arm in report["arms"].items():
        pts = arm["curve"]
        if pts:
            ax.plot([p["step"] for p in pts], [p["acc@0.5"] for p in pts], marker="o", ms=3,
                    label=f"{name}: {arm['what']}")
    if "start" in report:
        ax.plot([0], [report["start"]["acc@0.5"]], "ks", ms=5, label="the starting weights (step 0)")
    ax.axhline(1 / 3, color="#999", ls="--", lw=1, label="chance (3 objects)")
    ax.set_xlabel("optimizer steps (batch 16)")
    ax.set_ylabel("val Acc@0.5 (50 items)")
    ax.set_ylim(0, 1.05)
    # Below the axes: the curves that matter run along the top.
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=1, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arms", nargs="*", default=[], choices=sorted(ARMS), help="arms to run")
    p.add_argument("--init", type=Path, default=ROOT / "data" / "demo-base", help="starting weights")
    p.add_argument("--logdir", type=Path, default=Path("build/binding"), help="run folders and logs")
    p.add_argument("--jobs", type=int, default=2, help="arms at once (one torch thread each)")
    p.add_argument("--collect", type=Path, help="only collect the NAME.log files of this folder")
    p.add_argument("--out", type=Path, default=RESULTS / "binding_experiments.json")
    args = p.parse_args(argv)
    logdir = args.collect or args.logdir
    if not args.collect:
        logdir.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            list(pool.map(lambda name: run_arm(name, args.init.resolve(), logdir.resolve()), args.arms))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = collect(logdir, args.out)
    for name, arm in report["arms"].items():
        last = arm["curve"][-1] if arm["curve"] else {}
        print(f"{name:10s} {len(arm['curve'])} points, last step {last.get('step')}: "
              f"Acc@0.5 {last.get('acc@0.5')}  ({arm['what']})")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
