"""Stage-2 training rows at scale: peak memory and time to the first step, 1k vs 10k pairs.

    python bench/bench_rows.py [--pairs 1000,10000] [--eager 20] [--rounds 2] [--model data/demo-model]

Builds a throw-away workspace through the store API: N items of 1000x750 photo-like JPEGs (a pool
of 24 images rendered from noise, gradients and shapes, hard-linked to N file names: synthesis
takes seconds and the disk holds 24 files, while every name is its own file to the loader, so a
path that decodes and keeps images keeps N of them), two rollouts per item with boxes and answers,
and one pending pair per item. Then, in a fresh process per size, ``visrl.train.run.train`` runs
stage 2 (``visrl``) on the model and stops after its first optimizer step. Reported per size:
seconds from calling ``train`` to the end of step 1 (store read, rows, dataset, model load,
trainer, the step), the peak RSS up to then, and that peak above the model's own (a process that
imports the same libraries and loads only the model); medians of ``--rounds`` runs that alternate
between the sizes, so a swing in machine load hits both alike. ``--eager N`` times the pre-issue-11 path
(rows holding decoded images and crops, then ``Dataset.from_list``) on N pairs in its own process,
for comparison. Targets (issue 11): at 10k pairs <= 2 GB above the model and <= 30 s to the first
step; 1k -> 10k growth <= 1.5x in both. Prints a table, writes bench/results/rows.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's visrl
from bench_stage2 import PeakRSS  # noqa: E402  (beside this script; stdlib-only at import)

from visrl.vocabulary import POLICY_ROLLOUT  # noqa: E402  (imports nothing)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results" / "rows.json"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "data" / "demo-model"
SIZE = (1000, 750)
POOL = 24


def photo(seed: int) -> Any:
    """A 1000x750 photo-like image: a smooth gradient, a few shapes, sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = SIZE
    x, y = np.meshgrid(np.linspace(0, 1, w), np.linspace(0, 1, h))
    base = np.stack([a * x + b * y + c for a, b, c in rng.uniform(-0.5, 1.0, (3, 3))], axis=-1)
    pixels = np.clip(base * 180 + 40 + rng.normal(0, 12, (h, w, 3)), 0, 255).astype("uint8")
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x1, y1 = int(rng.integers(0, w - 200)), int(rng.integers(0, h - 150))
        box = (x1, y1, x1 + int(rng.integers(60, 200)), y1 + int(rng.integers(40, 150)))
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image


def make_workspace(root: Path, n: int) -> None:
    from visrl import review
    from visrl.boxes import Box, format_box
    from visrl.store import Store, box_to_json

    store = Store.open(root)
    ws = store.workspace
    pool = ws.root / "pool"
    pool.mkdir()
    for k in range(POOL):
        photo(k).save(pool / f"{k}.jpg", quality=90)
    rows = []
    for i in range(n):
        path = ws.images_dir / f"{i:06d}.jpg"
        os.link(pool / f"{i % POOL}.jpg", path)
        rows.append({"split": "train", "source_id": str(i), "image": ws.relative(path), "width": SIZE[0],
                     "height": SIZE[1], "question": f"What colour is the shape near mark {i}?",
                     "answer": "red"})
    ids = store.add_items(store.add_dataset("photos", "bench"), rows)
    good, bad = Box(100, 80, 400, 330), Box(600, 420, 820, 600)
    with store.atomic():
        for item_id in ids:
            sides = []
            for attempt, (box, answer, score) in enumerate([(good, "red", 1.0), (bad, "blue", 0.0)]):
                rollout = {"item_id": item_id, "run_key": "bench", "attempt": attempt, "kind": POLICY_ROLLOUT,
                           "box": box, "box_text": format_box(box, "viscot", SIZE), "answer": answer,
                           "answer_score": score}
                sides.append({**rollout, "id": store.add_rollout(rollout), "box": box_to_json(box)})
            review.add_pair(store, item_id, sides[0], sides[1], source="bench")


class FirstStep:
    """What :class:`visrl.train.callbacks.ProgressCallback` calls; asks to stop after step 1."""

    def __init__(self, started: float) -> None:
        self.started, self.seconds, self.stop_requested, self.total = started, None, False, 0

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, step: int | None = None, **_: Any) -> None:
        if step and self.seconds is None:
            self.seconds = time.perf_counter() - self.started
            self.stop_requested = True  # the run saves after this step and returns

    def message(self, text: str) -> None:
        pass


def child(mode: str, root: str, model: str, eager: int) -> dict[str, Any]:
    import torch  # noqa: F401  (the same libraries as a training process, before the baseline)
    import trl  # noqa: F401

    from visrl.runtime import apply_threads

    apply_threads()
    if mode == "model":
        from visrl.train.config import TrainConfig
        from visrl.train.lora import load_train_model

        with PeakRSS() as rss:
            cfg = TrainConfig(stage="visrl", model_name_or_path=model, output_dir=root)
            load_train_model(cfg, model, None)
        return {"peak_rss_mb": rss.peak / 2**20}
    if mode == "eager":  # what dpo_rows(lazy=False) does, on the first `eager` pairs only
        from visrl.contract import TwoStepContract
        from visrl.formats.row_images import RowImages
        from visrl.formats.trl import _Refs, build_row, pair_records, to_dataset
        from visrl.store import Store

        store = Store.open(root)
        records = pair_records(store, ("pending",), 2)[:eager]
        with PeakRSS() as rss:
            start = time.perf_counter()
            contract = TwoStepContract()
            refs, images = _Refs(store.workspace), RowImages(contract, keep=len(records))  # all kept
            rows = [images.open_row(build_row(r, "dpo2", contract, refs)) for r in records]
            to_dataset(rows)  # Dataset.from_list: every image PNG-encoded into Arrow
            seconds = time.perf_counter() - start
        return {"pairs": len(rows), "seconds": seconds, "peak_rss_mb": rss.peak / 2**20}
    from visrl.train.config import TrainConfig
    from visrl.train.run import train

    cfg = TrainConfig(stage="visrl", model_name_or_path=model, output_dir=str(Path(root) / "out"),
                      pair_status=["pending"], max_steps=3, per_device_train_batch_size=1,
                      save_steps=1000, resume_from_checkpoint=False, lora_rank=4)
    with PeakRSS() as rss:
        progress = FirstStep(time.perf_counter())
        result = train(root, cfg, progress=progress)
        peak = rss.peak  # sampled up to here; the stop's checkpoint save adds nothing it did not
    return {"first_step_s": progress.seconds, "peak_rss_mb": peak / 2**20, "stopped_at": result.global_step}


def run_child(mode: str, root: Path, model: str, eager: int = 0) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", mode, "--root", str(root), "--model", model,
               "--eager", str(eager)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default="1000,10000", help="comma-separated sizes")
    parser.add_argument("--eager", type=int, default=20, help="also time the eager rows on this many pairs (0: no)")
    parser.add_argument("--model", default=str(DEMO_MODEL))
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs per size (medians reported)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.root, args.model, args.eager)))
        return
    sizes = [int(n) for n in args.pairs.split(",")]
    report: dict[str, Any] = {"model": args.model, "image_size": SIZE, "threads": os.environ.get("VISRL_NUM_THREADS"),
                              "sizes": {}, "targets": {"above_model_mb": 2048, "first_step_s": 30, "growth": 1.5}}
    with tempfile.TemporaryDirectory(prefix="bench-rows-") as tmp:
        model_mb = run_child("model", Path(tmp), args.model)["peak_rss_mb"]
        report["model_rss_mb"] = model_mb
        built = {}
        for n in sizes:
            start = time.perf_counter()
            make_workspace(Path(tmp) / f"ws-{n}", n)
            built[n] = time.perf_counter() - start
        runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
        for _ in range(args.rounds):  # 1k, 10k, 1k, 10k: load swings hit both sizes alike
            for n in sizes:
                runs[n].append(run_child("train", Path(tmp) / f"ws-{n}", args.model))
        for n in sizes:
            peak = statistics.median(r["peak_rss_mb"] for r in runs[n])
            report["sizes"][n] = {"first_step_s": statistics.median(r["first_step_s"] for r in runs[n]),
                                  "peak_rss_mb": peak, "above_model_mb": peak - model_mb,
                                  "workspace_build_s": built[n], "runs": runs[n]}
        if args.eager:
            report["eager"] = run_child("eager", Path(tmp) / f"ws-{sizes[0]}", args.model, args.eager)
    first, last = report["sizes"][sizes[0]], report["sizes"][sizes[-1]]
    report["growth"] = {"first_step_s": last["first_step_s"] / first["first_step_s"],
                        "peak_rss": last["peak_rss_mb"] / first["peak_rss_mb"]}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model alone: {model_mb:.0f} MB RSS ({Path(args.model).name}); images {SIZE[0]}x{SIZE[1]} JPEG")
    print(f"{'pairs':>7} {'first step s':>12} {'peak RSS MB':>12} {'above model MB':>15}")
    for n in sizes:
        r = report["sizes"][n]
        print(f"{n:>7} {r['first_step_s']:>12.1f} {r['peak_rss_mb']:>12.0f} {r['above_model_mb']:>15.0f}")
    g = report["growth"]
    print(f"growth {sizes[0]} -> {sizes[-1]} pairs: first step {g['first_step_s']:.2f}x, peak RSS "
          f"{g['peak_rss']:.2f}x (target <= 1.5x)")
    if "eager" in report:
        e = report["eager"]
        print(f"eager rows (before): {e['pairs']} pairs in {e['seconds']:.1f} s, peak RSS {e['peak_rss_mb']:.0f} MB "
              f"(~{e['seconds'] / max(e['pairs'], 1) * sizes[-1] / 60:.0f} min for {sizes[-1]} pairs)")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
