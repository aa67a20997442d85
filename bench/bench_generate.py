"""Rollouts per second of `visrl generate`: batched vs one item at a time, on the demo model.

    .venv/bin/python bench/bench_generate.py [--items 16] [--batch-size 8] [--rounds 2] [--threads 1]
                                             [--policy demo|tiny|scripted] [--adapter]

Builds a throw-away workspace with demo scenes (visrl.synthetic) and runs the whole stage
(sampling 2 boxes per attempt, crops, answers, judges, pairs) with batch_size 1 and with
--batch-size. The policy is the shipped demo model (data/demo-model), which writes boxes that
parse, so the answer step really runs (a random model's box texts do not parse and the answer
step is skipped: its numbers say nothing about generation). ``--policy tiny`` is a random tiny
Qwen2-VL; ``--policy scripted`` swaps the model for a scripted one, which measures what the stage
costs around the model (store writes, judging, pairing). Runs alternate (batch 1, batched,
batch 1, ...) for --rounds, each on a fresh run key, so load swings hit both alike; speed-ups
are ratios of medians. ``--adapter`` adds a random LoRA adapter and compares sampling through
it unmerged with merged weights (what ``visrl generate`` does), also alternating. Prints a table
and writes bench/results/generate.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


DEMO_MODEL = Path(__file__).resolve().parents[1] / "data" / "demo-model"


def model_path(kind: str, root: Path) -> Path:
    if kind == "demo":
        return DEMO_MODEL
    from visrl.tiny import build_tiny_model

    return Path(build_tiny_model(root / "models" / "tiny", preset="test", seed=0))


def build_policy(kind: str, root: Path, adapter: Path | None = None, merge: bool = False) -> Any:
    if kind == "scripted":
        return ScriptedPolicy()
    from visrl.models import load_model
    from visrl.reasoning import Reasoner
    from visrl.train.merge import merge_reasoner_adapter

    reasoner = Reasoner(load_model(str(model_path(kind, root)), adapter=adapter, device="cpu"))
    if merge:
        merge_reasoner_adapter(reasoner)
    return reasoner


def random_adapter(kind: str, root: Path) -> Path:
    """A LoRA on every language-model projection, B drawn at random (so it changes outputs)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from visrl.models import load_model
    from visrl.train.config import LANGUAGE_MODEL_TARGET

    loaded = load_model(str(model_path(kind, root)), dtype="float32", device="cpu")
    model = get_peft_model(loaded.model, LoraConfig(r=8, lora_alpha=16, target_modules=LANGUAGE_MODEL_TARGET))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.save_pretrained(root / "adapter")
    return root / "adapter"


def run_once(store: Store, policy: Any, batch_size: int, key: str, args: argparse.Namespace) -> dict:
    cfg = GenerateConfig(model_name_or_path="bench", dataset="demo", attempts=args.attempts,
                         batch_size=batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=1.0, run_key=key, min_parse_rate=0.0)  # throughput: any box text counts
    start = time.perf_counter()
    report = run_generate(store.workspace, cfg, reasoner=policy)
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "items": report.items_generated, "rollouts": report.rollouts,
            "seconds": round(seconds, 3), "rollouts_per_s": round(report.rollouts / seconds, 3),
            "items_per_s": round(report.items_generated / seconds, 3),
            "parse_rate": report.parse_rate, "failed": report.failed, "pairs": report.pairs}


def median_rate(runs: list[dict]) -> float:
    return statistics.median(r["rollouts_per_s"] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--attempts", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each setting")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the CPU is shared)")
    parser.add_argument("--policy", choices=("demo", "tiny", "scripted"), default="demo")
    parser.add_argument("--adapter", action="store_true", help="also time an unmerged vs merged LoRA")
    args = parser.parse_args()
    os.environ["VISRL_NUM_THREADS"] = str(args.threads)
    if args.policy != "scripted":
        from visrl.runtime import apply_threads

        apply_threads()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ws"
        store = make_workspace(root, args.items)
        policy = build_policy(args.policy, root)
        runs: dict[str, list[dict]] = {"sequential": [], "batched": []}
        for r in range(args.rounds):  # A B A B: load swings hit both alike
            runs["sequential"].append(run_once(store, policy, 1, f"seq-{r}", args))
            runs["batched"].append(run_once(store, policy, args.batch_size, f"batched-{r}", args))
        if args.adapter and args.policy != "scripted":
            lora = random_adapter(args.policy, root)
            unmerged, merged = build_policy(args.policy, root, lora), build_policy(args.policy, root, lora, merge=True)
            runs.update({"adapter_unmerged": [], "adapter_merged": []})
            for r in range(args.rounds):
                runs["adapter_unmerged"].append(run_once(store, unmerged, args.batch_size, f"unmerged-{r}", args))
                runs["adapter_merged"].append(run_once(store, merged, args.batch_size, f"merged-{r}", args))
    print(f"{'setting':<17} {'batch':>5} {'rollouts':>8} {'seconds':>8} {'rollouts/s':>10} {'parsed':>6} {'failed':>6}")
    for name, rows in runs.items():
        for r in rows:
            print(f"{name:<17} {r['batch_size']:>5} {r['rollouts']:>8} {r['seconds']:>8.2f} "
                  f"{r['rollouts_per_s']:>10.2f} {r['parse_rate']:>6.0%} {r['failed']:>6}")
    speedup = median_rate(runs["batched"]) / max(median_rate(runs["sequential"]), 1e-9)
    print(f"batched speed-up: {speedup:.2f}x (median of {args.rounds} alternating runs)")
    result = {"policy": args.policy, "model": str(DEMO_MODEL) if args.policy == "demo" else args.policy,
              "attempts": args.attempts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
              "threads": args.threads, "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "runs": runs, "batched_speedup": round(speedup, 3)}
    if "adapter_merged" in runs:
        gain = median_rate(runs["adapter_merged"]) / max(median_rate(runs["adapter_unmerged"]), 1e-9)
        result["merged_speedup"] = round(gain, 3)
        print(f"merged adapter vs unmerged: {gain:.2f}x")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
