"""Items per second of two-step inference: batched vs one item at a time (greedy).

    .venv/bin/python bench/bench_inference.py [--model PATH] [--items 64] [--batch-sizes 16,32,64]
                                              [--max-new-tokens 40] [--threads N] [--rounds 2]

Renders ``--items`` scenes of the demo benchmark's "test" split (visrl.synthetic) and runs
``Reasoner.two_step`` on them item by item (``batch_size=1``) and once per batch size. The runs
alternate (sequential, batched..., sequential, batched...) for ``--rounds`` so a swing in machine
load hits every setting alike; speed-ups are ratios of the median times of this one run. The
model is ``--model``, by default the shipped demo model (data/demo-model, trained: its boxes
parse, so the answer step sees real crops); ``--model random`` builds a tiny "demo" preset with
random weights. Prints a table (items/s, speed-up over one at a time, how many outputs equal the
sequential ones) and the process's peak RSS, and writes bench/results/inference.json. Targets:
batched >= 5x sequential (issue 11); peak RSS < 1.5 GB.

A random model's greedy output length decides the cost of a step (a batch runs until its longest
row stops), so the table also shows the mean characters generated per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrl.models import count_parameters, load_model  # noqa: E402
from visrl.reasoning import Reasoner, Sampling  # noqa: E402
from visrl.synthetic import SyntheticConfig, render_item  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "inference.json"
TARGET_SPEEDUP = 5.0
DEMO_MODEL = Path(__file__).resolve().parents[1] / "data" / "demo-model"
TARGET_PEAK_MB = 1536


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def outputs(results: list[list[Any]]) -> list[tuple[str | None, str | None]]:
    return [(r[0].box_text, r[0].answer) for r in results]


def run_sequential(loaded: Any, images: list[Any], questions: list[str], sampling: Sampling) -> tuple[float, list]:
    reasoner = Reasoner(loaded, batch_size=1)
    start = time.perf_counter()
    results = [reasoner.two_step([im], [q], sampling)[0] for im, q in zip(images, questions, strict=True)]
    return time.perf_counter() - start, results


def run_batched(loaded: Any, images: list[Any], questions: list[str], sampling: Sampling,
                batch_size: int) -> tuple[float, list]:
    reasoner = Reasoner(loaded, batch_size=batch_size)
    start = time.perf_counter()
    results = reasoner.two_step(images, questions, sampling)
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEMO_MODEL),
                        help="Model folder (default: data/demo-model); 'random': a random tiny 'demo' preset.")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each setting")
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--batch-sizes", default="16,32,64")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="Per step; a Visual-CoT box is ~30.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: as a stage process chooses, see visrl.runtime).")
    parser.add_argument("--device", default="cpu", help="cpu (the issue's target) or cuda.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import statistics

    import torch

    from visrl.runtime import apply_threads

    if args.threads:
        os.environ["VISRL_NUM_THREADS"] = str(args.threads)
    apply_threads()  # as a stage process chooses: VISRL_NUM_THREADS, else OMP, else cores
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model
        if model_path == "random":
            from visrl.tiny import build_tiny_model

            model_path = str(build_tiny_model(Path(tmp) / "tiny-demo", preset="demo"))
        loaded = load_model(model_path, device=args.device)
        scenes = [render_item(SyntheticConfig(), "test", i) for i in range(args.items)]
        images, questions = [s.image for s in scenes], [s.question for s in scenes]
        sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
        Reasoner(loaded, batch_size=2).two_step(images[:2], questions[:2], sampling)  # warm-up

        sizes = [int(b) for b in args.batch_sizes.split(",")]
        times: dict[int, list[float]] = {1: [], **{b: [] for b in sizes}}
        same: dict[int, int] = {}
        reference: list = []
        for _ in range(args.rounds):  # A B C A B C: load swings hit every setting alike
            seconds, sequential = run_sequential(loaded, images, questions, sampling)
            times[1].append(seconds)
            reference = outputs(sequential)
            for batch_size in sizes:
                seconds, batched = run_batched(loaded, images, questions, sampling, batch_size)
                times[batch_size].append(seconds)
                same[batch_size] = sum(a == b for a, b in zip(outputs(batched), reference, strict=True))
        median = {b: statistics.median(t) for b, t in times.items()}
        rows = [{"mode": "one at a time", "batch_size": 1, "seconds": median[1], "runs": times[1],
                 "items_per_s": args.items / median[1], "speedup": 1.0, "same_as_sequential": args.items}]
        rows += [{"mode": "batched", "batch_size": b, "seconds": median[b], "runs": times[b],
                  "items_per_s": args.items / median[b], "speedup": median[1] / median[b],
                  "same_as_sequential": same[b]} for b in sizes]
        chars = [len(b or "") for b, _ in reference] + [len(a or "") for _, a in reference]
        report = {
            "model": model_path if args.model != "random" else "tiny demo preset (random weights)",
            "rounds": args.rounds,
            "parameters": count_parameters(loaded.model), "family": loaded.family, "device": loaded.device,
            "items": args.items, "max_new_tokens": args.max_new_tokens, "threads": torch.get_num_threads(),
            "mean_chars_per_step": sum(chars) / len(chars), "rows": rows,
            "best_speedup": max(r["speedup"] for r in rows[1:]), "peak_rss_mb": peak_rss_mb(),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if loaded.device.startswith("cuda") else None,
            "targets": {"speedup": TARGET_SPEEDUP, "peak_rss_mb": TARGET_PEAK_MB},
            "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "torch": torch.__version__, "platform": platform.platform()},
        }
    print(f"{report['model']}: {report['parameters']:,} parameters ({report['family']}), {args.items} demo items, "
          f"greedy, max_new_tokens {args.max_new_tokens}, {report['threads']} threads, "
          f"{report['mean_chars_per_step']:.1f} chars per step on average, device {loaded.device} ({loaded.dtype})")
    print(f"{'mode':<14} {'batch':>5} {'seconds':>8} {'items/s':>8} {'speed-up':>8} {'same':>5}")
    for row in rows:
        print(f"{row['mode']:<14} {row['batch_size']:>5} {row['seconds']:>8.2f} {row['items_per_s']:>8.2f} "
              f"{row['speedup']:>7.2f}x {row['same_as_sequential']:>5}")
    ok_speed = report["best_speedup"] >= TARGET_SPEEDUP
    ok_memory = report["peak_rss_mb"] < TARGET_PEAK_MB
    print(f"best speed-up {report['best_speedup']:.2f}x (target >= {TARGET_SPEEDUP}x: {'met' if ok_speed else 'NOT met'}); "
          f"peak RSS {report['peak_rss_mb']:.0f} MB (target < {TARGET_PEAK_MB} MB: {'met' if ok_memory else 'NOT met'})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
