"""Stage-2 cost: VisRLTrainer (box + answer DPO) vs trl's plain DPOTrainer (box step only).

Same pairs, same model, same LoRA, same batch size; each variant trains in its own process (so
one's freed memory does not hide the other's peak). Reports the median step time and the peak
memory added by training: ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set
size above the pre-training level on a CPU (sampled every 2 ms). Writes bench/results/stage2.json.

    python bench/bench_stage2.py [--model DIR] [--steps 12] [--batch 2] [--pairs 16]

Without --model it builds the tiny demo model. Targets: time ratio <= 2.2, memory ratio <= 1.5.
Stage 2 runs four sequences per pair where DPO runs two, and its answer sequences hold two images,
so ~2x time is the floor; memory stays near 1x because the two steps run backward one at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "stage2.json"


def make_rows(n: int, size: int) -> list[dict[str, Any]]:
    from PIL import Image

    from visrl.prompts import answer_prompt, assistant, box_prompt

    rows = []
    for i in range(n):
        full = Image.new("RGB", (size, size * 3 // 4), (37 * i % 255, 90, 160))
        question = f"What colour is the square number {i}?"
        good, bad = "[0.10, 0.20, 0.50, 0.60]", "[0.70, 0.65, 0.90, 0.95]"
        rows.append({
            "images": [full], "prompt": box_prompt(question), "pair_id": i,
            "chosen": assistant(good), "rejected": assistant(bad),
            "chosen_answer_images": [full, full.crop((0, 0, size // 2, size // 2))],
            "chosen_answer_prompt": answer_prompt(question, good),
            "chosen_answer": assistant("red"),
            "rejected_answer_images": [full, full.crop((size // 2, size // 4, size, size * 3 // 4))],
            "rejected_answer_prompt": answer_prompt(question, bad),
            "rejected_answer": assistant("a blue square"),
        })
    return rows


class PeakRSS:
    """Peak resident memory above the level at start, sampled by a thread."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def added_mb(self) -> float:
        return (self.peak - self.start) / 2**20


class StepTimer:
    """A TrainerCallback collecting wall time per optimizer step."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
                timer.begin = time.perf_counter()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                timer.times.append(time.perf_counter() - timer.begin)

        self.times: list[float] = []
        self.begin = 0.0
        self.callback = _Callback()


def run_variant(variant: str, model_dir: str, steps: int, batch: int, pairs: int, size: int) -> dict:
    import torch
    from datasets import Dataset

    from visrl.train.config import TrainConfig
    from visrl.train.lora import load_train_model

    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    cfg = TrainConfig(stage="visrl" if variant == "visrl" else "dpo", model_name_or_path=model_dir,
                      output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                      save_steps=10_000, logging_steps=10_000, resume_from_checkpoint=False)
    tm = load_train_model(cfg, model_dir, None)
    rows = make_rows(pairs, size)
    if variant == "dpo":
        rows = [{k: r[k] for k in ("images", "prompt", "chosen", "rejected")} for r in rows]
    timer = StepTimer()
    if variant == "visrl":
        from visrl.train.joint import build_visrl_trainer as build
    else:
        from visrl.train.dpo import build_dpo_trainer as build
    trainer = build(cfg, tm, Dataset.from_list(rows), None, Path(out), [timer.callback])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with PeakRSS() as rss:
        trainer.train()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss.added_mb
    warm = timer.times[2:] or timer.times  # the first steps pay for lazy initialisation
    return {"variant": variant, "device": "cuda" if cuda else "cpu", "steps": len(timer.times),
            "median_step_s": statistics.median(warm), "peak_added_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: build the tiny demo model)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224, help="full image width, pixels")
    parser.add_argument("--variant", choices=["visrl", "dpo"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, JSON on the last line
        result = run_variant(args.variant, args.model, args.steps, args.batch, args.pairs, args.image_size)
        print(json.dumps(result))
        return
    model = args.model
    if not model:
        from visrl.tiny import build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", preset="demo"))
    results = {}
    for variant in ("dpo", "visrl"):
        command = [sys.executable, __file__, "--variant", variant, "--model", model,
                   "--steps", str(args.steps), "--batch", str(args.batch), "--pairs", str(args.pairs),
                   "--image-size", str(args.image_size)]
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False)
        if done.returncode:
            sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    time_ratio = results["visrl"]["median_step_s"] / results["dpo"]["median_step_s"]
    memory_ratio = results["visrl"]["peak_added_mb"] / max(results["dpo"]["peak_added_mb"], 1e-9)
    report = {"model": model, "batch": args.batch, "steps": args.steps, "image_size": args.image_size,
              **results, "time_ratio": time_ratio, "memory_ratio": memory_ratio,
              "targets": {"time_ratio": 2.2, "memory_ratio": 1.5}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    for variant in ("dpo", "visrl"):
        r = results[variant]
        print(f"{variant:6s} {r['median_step_s'] * 1000:8.1f} ms/step  {r['peak_added_mb']:8.1f} MB peak ({r['device']})")
    print(f"ratio  time {time_ratio:.2f}x (target <= 2.2)  memory {memory_ratio:.2f}x (target <= 1.5)")


if __name__ == "__main__":
    main()
