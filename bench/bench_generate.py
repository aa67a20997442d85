"""Rollouts per second of `visrl generate`: batched vs one item at a time, on the tiny model.

    .venv/bin/python bench/bench_generate.py [--items 16] [--batch-size 8] [--threads 1]
                                             [--policy tiny|scripted]

Builds a throw-away workspace with demo scenes (visrl.synthetic) and a random tiny Qwen2-VL
(visrl.tiny, preset "test"), then runs the whole stage (sampling 2 boxes per attempt, crops,
answers, judges, pairs) with batch_size 1 and with --batch-size, each on a fresh run key.
``--policy scripted`` swaps the model for a scripted one, which measures what the stage itself
costs around the model (store writes, judging, pairing). Prints a table and writes
bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrl.boxes import format_box  # noqa: E402
from visrl.generate import GenerateConfig, run_generate  # noqa: E402
from visrl.store import Store  # noqa: E402
from visrl.synthetic import SyntheticConfig, render_item  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "generate.json"


def make_workspace(root: Path, n_items: int) -> Store:
    store = Store.open(root)
    cfg = SyntheticConfig()
    dataset_id = store.add_dataset("demo", "synthetic")
    rows = []
    for i in range(n_items):
        scene = render_item(cfg, "train", i)
        path = store.workspace.images_dir / f"train-{i}.png"
        scene.image.save(path)
        rows.append({"split": "train", "source_id": str(i), "image": store.workspace.relative(path),
                     "width": scene.size[0], "height": scene.size[1], "question": scene.question,
                     "answer": scene.answer, "gt_box": scene.target_object.box})
    store.add_items(dataset_id, rows)
    return store


class ScriptedPolicy:
    """The model's calls answered instantly: one box near the object's cell, answer "7"."""

    def propose_boxes(self, images: list[Any], questions: list[str], sampling: Any) -> list[list[str]]:
        from visrl.boxes import Box

        size = images[0].size
        return [[format_box(Box(10, 10, 60, 60), "viscot", size),
                 format_box(Box(200, 150, 260, 210), "viscot", size)] for _ in images]

    def answer(self, images: list[Any], questions: list[str], box_texts: list[str], crops: list[Any],
               sampling: Any) -> list[str]:
        return ["7"] * len(images)


def build_policy(kind: str, root: Path) -> Any:
    if kind == "scripted":
        return ScriptedPolicy()
    from visrl.models import load_model
    from visrl.reasoning import Reasoner
    from visrl.tiny import build_tiny_model

    path = build_tiny_model(root / "models" / "tiny", preset="test", seed=0)
    return Reasoner(load_model(str(path), device="cpu"), box_format="viscot")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--attempts", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--policy", choices=("tiny", "scripted"), default="tiny")
    args = parser.parse_args()
    try:
        import torch

        torch.set_num_threads(args.threads)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        store = make_workspace(root, args.items)
        policy = build_policy(args.policy, root)
        rows = []
        for batch_size in (1, args.batch_size):
            cfg = GenerateConfig(model_name_or_path="bench", dataset="demo", attempts=args.attempts,
                                 batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                                 temperature=1.0, run_key=f"bench-b{batch_size}")
            start = time.perf_counter()
            report = run_generate(store.workspace, cfg, reasoner=policy)
            seconds = time.perf_counter() - start
            rows.append({"batch_size": batch_size, "items": report.items_generated,
                         "rollouts": report.rollouts, "seconds": round(seconds, 3),
                         "rollouts_per_s": round(report.rollouts / seconds, 3),
                         "items_per_s": round(report.items_generated / seconds, 3),
                         "parse_rate": report.parse_rate, "pairs": report.pairs})
    print(f"{'batch':>5} {'items':>5} {'rollouts':>8} {'seconds':>8} {'rollouts/s':>10} {'items/s':>8} {'parsed':>6}")
    for r in rows:
        print(f"{r['batch_size']:>5} {r['items']:>5} {r['rollouts']:>8} {r['seconds']:>8.2f} "
              f"{r['rollouts_per_s']:>10.2f} {r['items_per_s']:>8.2f} {r['parse_rate']:>6.0%}")
    speedup = rows[1]["rollouts_per_s"] / max(rows[0]["rollouts_per_s"], 1e-9)
    print(f"batched speed-up: {speedup:.2f}x")
    result = {"policy": args.policy, "attempts": args.attempts, "max_new_tokens": args.max_new_tokens,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "runs": rows, "batched_speedup": round(speedup, 3)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
