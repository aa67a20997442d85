"""Stage-2 cost: VisRLTrainer (box + answer DPO) vs trl's plain DPOTrainer (box step only).

Same pairs, same model, same LoRA, same batch size; each run trains in its own process (so one's
freed memory does not hide the other's peak), and the variants alternate (dpo, visrl,
visrl_uncached, dpo, visrl, ...) so a swing in machine load hits all of them alike; the ratios
are of medians over the rounds of this one invocation. ``visrl_uncached`` is stage 2 with the
vision tower run for every sequence and pass (the behaviour before :class:`VisionCache`).
Whole-run step times on a shared CPU swing by +-30 %; ``--vision-ab`` isolates the cache's effect:
one process, one batch, ``training_step`` with and without it, alternating.

A step's time is the wall time from the end of one optimizer step to the end of the next, so it
includes fetching and collating the batch (the stage-2 collator builds two steps' worth of
tokens and images); the first two steps are warm-up and not counted. Peak memory is what
training adds: ``torch.cuda.max_memory_allocated`` on a GPU, the peak resident set size above the
pre-training level on a CPU (sampled every 2 ms). Writes bench/results/stage2.json.

    python bench/bench_stage2.py [--model DIR] [--steps 10] [--batch 2] [--pairs 16] [--rounds 2]
                                 [--visual-tokens N] [--vision-ab ROUNDS]

Without --model it uses the shipped demo model (data/demo-model). Targets: time ratio <= 2.0,
memory ratio <= 1.3 (issue 11).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's visrl
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
    """A TrainerCallback collecting the wall time between consecutive step ends (so the batch's
    fetching and collating, which the Trainer does before ``on_step_begin``, is counted)."""

    def __init__(self) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
                timer.last = time.perf_counter()

            def on_step_end(self, *args: Any, **kwargs: Any) -> None:
                now = time.perf_counter()
                timer.times.append(now - timer.last)
                timer.last = now

        self.times: list[float] = []
        self.last = 0.0
        self.callback = _Callback()


def run_variant(variant: str, model_dir: str, steps: int, batch: int, pairs: int, size: int,
                visual_tokens: int = 0) -> dict:
    import torch
    from datasets import Dataset

    from visrl.runtime import apply_threads
    from visrl.train.config import TrainConfig
    from visrl.train.lora import load_train_model

    apply_threads()  # as a stage process does: VISRL_NUM_THREADS, else OMP, else cores / ranks
    torch.manual_seed(0)
    out = tempfile.mkdtemp(prefix=f"bench-{variant}-")
    cfg = TrainConfig(stage="dpo" if variant == "dpo" else "visrl", model_name_or_path=model_dir,
                      output_dir=out, max_steps=steps, per_device_train_batch_size=batch,
                      save_steps=10_000, logging_steps=10_000, resume_from_checkpoint=False)
    tm = load_train_model(cfg, model_dir, None)
    if visual_tokens:  # every image (full and crop) resized to this many merged tokens
        from transformers.image_utils import SizeDict

        ip = tm.processor.image_processor
        pixels = visual_tokens * (ip.patch_size * ip.merge_size) ** 2
        ip.size = SizeDict(shortest_edge=pixels, longest_edge=pixels)
    rows = make_rows(pairs, size)
    if variant == "dpo":
        rows = [{k: r[k] for k in ("images", "prompt", "chosen", "rejected")} for r in rows]
    timer = StepTimer()
    if variant == "dpo":
        from visrl.train.dpo import build_dpo_trainer as build
    else:
        from visrl.train.joint import build_visrl_trainer as build
    trainer = build(cfg, tm, Dataset.from_list(rows), None, Path(out), [timer.callback])
    if variant == "visrl_uncached" and trainer.vision_cache is not None:
        trainer.vision_cache.remove()
        trainer.vision_cache = None
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


def vision_ab(model_dir: str, rounds: int, batch: int, size: int, visual_tokens: int) -> dict:
    """One process, one stage-2 batch: ``training_step`` with and without :class:`VisionCache`,
    alternating ``rounds`` times (the first of each dropped as warm-up); collation is outside."""
    import torch
    from datasets import Dataset
    from transformers.image_utils import SizeDict

    from visrl.runtime import apply_threads
    from visrl.train.config import TrainConfig
    from visrl.train.joint import build_visrl_trainer
    from visrl.train.lora import load_train_model

    apply_threads()
    out = tempfile.mkdtemp(prefix="bench-ab-")
    cfg = TrainConfig(stage="visrl", model_name_or_path=model_dir, output_dir=out, max_steps=1,
                      per_device_train_batch_size=batch, resume_from_checkpoint=False)
    tm = load_train_model(cfg, model_dir, None)
    if visual_tokens:
        ip = tm.processor.image_processor
        pixels = visual_tokens * (ip.patch_size * ip.merge_size) ** 2
        ip.size = SizeDict(shortest_edge=pixels, longest_edge=pixels)
    rows = make_rows(batch, size)
    trainer = build_visrl_trainer(cfg, tm, Dataset.from_list(rows), None, Path(out), [])
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the Trainer's loop otherwise
    inputs = trainer._prepare_inputs(trainer.data_collator(rows))
    cache = trainer.vision_cache
    times: dict[str, list[float]] = {"cached": [], "uncached": []}
    for _ in range(rounds + 1):
        for mode in times:
            if mode == "cached":
                cache.inner.get_image_features, trainer.vision_cache = cache, cache
            else:
                cache.remove()
                trainer.vision_cache = None
            start = time.perf_counter()
            trainer.training_step(trainer.model, inputs)
            times[mode].append(time.perf_counter() - start)
            trainer.model.zero_grad()
            torch.manual_seed(0)
    median = {mode: statistics.median(t[1:]) for mode, t in times.items()}
    return {"visual_tokens": visual_tokens or "processor's", "batch": batch, "rounds": rounds,
            "median_step_s": median, "speedup": median["uncached"] / median["cached"]}


VARIANTS = ("dpo", "visrl", "visrl_uncached")


def run_child(variant: str, model: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--variant", variant, "--model", model,
               "--steps", str(args.steps), "--batch", str(args.batch), "--pairs", str(args.pairs),
               "--image-size", str(args.image_size), "--visual-tokens", str(args.visual_tokens)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ}, check=False)
    if done.returncode:
        sys.exit(f"{variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: data/demo-model)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved runs of each variant")
    parser.add_argument("--image-size", type=int, default=224, help="full image width, pixels")
    parser.add_argument("--visual-tokens", type=int, default=0,
                        help="resize every image to this many visual tokens (0: the processor's budget; the "
                             "demo model's is 12, a real Qwen2.5-VL recipe's ~1280, where the vision tower costs more)")
    parser.add_argument("--vision-ab", type=int, default=0, metavar="ROUNDS",
                        help="only compare training_step with and without the vision cache, ROUNDS times "
                             "alternating in one process; writes bench/results/stage2_vision_ab.json")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # child process: one variant, JSON on the last line
        result = run_variant(args.variant, args.model, args.steps, args.batch, args.pairs, args.image_size,
                             args.visual_tokens)
        print(json.dumps(result))
        return
    model = args.model or str(Path(__file__).resolve().parents[1] / "data" / "demo-model")
    if args.vision_ab:
        result = {"model": model, **vision_ab(model, args.vision_ab, args.batch, args.image_size,
                                              args.visual_tokens)}
        path = RESULTS.with_name("stage2_vision_ab.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2))
        m = result["median_step_s"]
        print(f"training_step, {result['visual_tokens']} visual tokens: cached {m['cached'] * 1000:.0f} ms, "
              f"uncached {m['uncached'] * 1000:.0f} ms: {result['speedup']:.2f}x faster with the vision cache")
        return
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:  # A B C A B C: load swings hit every variant alike
            runs[variant].append(run_child(variant, model, args))
    results = {v: {"device": r[0]["device"], "runs": r,
                   "median_step_s": statistics.median(x["median_step_s"] for x in r),
                   "peak_added_mb": statistics.median(x["peak_added_mb"] for x in r)}
               for v, r in runs.items()}

    def ratio(a: str, b: str, key: str) -> float:
        return results[a][key] / max(results[b][key], 1e-9)

    report = {"model": model, "batch": args.batch, "steps": args.steps, "rounds": args.rounds,
              "visual_tokens": args.visual_tokens or "processor's",
              "image_size": args.image_size, "threads": os.environ.get("VISRL_NUM_THREADS"), **results,
              "time_ratio": ratio("visrl", "dpo", "median_step_s"),
              "memory_ratio": ratio("visrl", "dpo", "peak_added_mb"),
              "uncached_time_ratio": ratio("visrl_uncached", "dpo", "median_step_s"),
              "uncached_memory_ratio": ratio("visrl_uncached", "dpo", "peak_added_mb"),
              "targets": {"time_ratio": 2.0, "memory_ratio": 1.3}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2))
    print(f"{'variant':15s} {'ms/step':>9s} {'peak MB':>9s}  (median of {args.rounds} interleaved runs, "
          f"{results['dpo']['device']})")
    for variant in VARIANTS:
        r = results[variant]
        print(f"{variant:15s} {r['median_step_s'] * 1000:9.1f} {r['peak_added_mb']:9.1f}")
    print(f"stage 2 / dpo: time {report['time_ratio']:.2f}x (target <= 2.0), memory "
          f"{report['memory_ratio']:.2f}x (target <= 1.3); uncached: time "
          f"{report['uncached_time_ratio']:.2f}x, memory {report['uncached_memory_ratio']:.2f}x")


if __name__ == "__main__":
    main()
