"""GPU smoke: the real recipe's shapes through SFT, merge, stage 1 and stage 2, a few steps each.

One command whenever a GPU is at hand (tests never need it):

    python bench/gpu_smoke.py                  # 7B vision geometry, small text model, ~1280 tokens
    python bench/gpu_smoke.py --full           # the whole 7B shape (needs ~40 GB of GPU memory)
    python bench/gpu_smoke.py --cpu --tiny     # seconds-long self-check of this script, on a CPU

The model is a random-init Qwen2.5-VL (:func:`visrl.tiny.build_tiny_qwen2_5`) with the 7B's real
vision geometry: 1280 wide, 16 heads, MLP 3420, 14 px patches merged 2x2, 112 px attention
windows, cut to ``--vision-depth`` blocks (32 with ``--full``); the text model is small (512 wide x
2 layers) unless ``--full`` (3584 x 28, vocabulary 152064). Its processor files are laid out as
the Hub has them. Training runs as the shipped recipes do: LoRA rank 64 on the language model,
bf16 and gradient checkpointing (both forced off on a CPU by the trainers), images of 1280x960 px
under the recipes' budget of 1280 visual tokens (``image_max_pixels: 1003520``: 1230 tokens each).

Stages: SFT on two-step rows (full image + crop) from the base; ``merge`` of that adapter (a stock
folder, timed); stage 1 (DPO on the box step) and stage 2 (VisRL's box + answer DPO, with the
vision cache) from the merged model. A step's time runs from one step's end to the next (batch
collation included); the first step is warm-up. Peak memory is ``torch.cuda.max_memory_allocated``
over the stage (weights included) on a GPU, the process's peak RSS so far on a CPU.

With ``vllm`` importable (and not ``--no-vllm``), the merged model is served by ``vllm serve`` and
the two-step generation of ``backend: remote`` (:class:`visrl.remote.RemoteReasoner`) runs against
it; items/s is recorded. Results go to ``bench/results/gpu_smoke.json`` (``--out``) and a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's visrl
from bench_stage2 import StepTimer  # noqa: E402  (beside this script; stdlib-only at import)

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_smoke.json"
RECIPE_MAX_PIXELS = 1280 * 28 * 28  # configs/train_*.yaml image_max_pixels: 1280 visual tokens
PHOTO = (1280, 960)  # px; under the budget: smart_resize to 1148x840 -> 41x30 = 1230 tokens


def model_shape(args: argparse.Namespace) -> Any:
    from visrl.tiny import Qwen25Shape

    if args.tiny:  # the unit-test size: seconds on a CPU
        return Qwen25Shape()
    vision = {"vision_hidden": 1280, "vision_heads": 16, "vision_intermediate": 3420, "window_size": 112,
              "min_pixels": 3136, "max_pixels": 12845056}  # the 7B's processor ships this budget
    if args.full:
        return Qwen25Shape(text_hidden=3584, text_layers=28, text_heads=28, text_kv_heads=4,
                           text_intermediate=18944, vocab_size=152064, tie_word_embeddings=False,
                           vision_depth=32, fullatt_block_indexes=(7, 15, 23, 31), **vision)
    depth = args.vision_depth
    return Qwen25Shape(text_hidden=512, text_layers=2, text_heads=4, text_kv_heads=2, text_intermediate=1408,
                       vision_depth=depth, fullatt_block_indexes=(depth - 1,), **vision)


def make_rows(n: int, size: tuple[int, int]) -> dict[str, list[dict[str, Any]]]:
    """SFT, stage-1 and stage-2 rows of ``n`` synthetic photos (a bright square to look at)."""
    from PIL import Image, ImageDraw

    from visrl.prompts import answer_prompt, assistant, box_prompt, two_step_conversation

    width, height = size
    rows: dict[str, list[dict[str, Any]]] = {"sft": [], "dpo": [], "visrl": []}
    for i in range(n):
        full = Image.new("RGB", size, (40 + 9 * i % 200, 90, 160))
        square = (width // 8 + i, height // 6, width // 2, height // 2)
        ImageDraw.Draw(full).rectangle(square, fill=(230, 40, 40))
        crop, wrong = full.crop(square), full.crop((width // 2, height // 2, width, height))
        question = f"What colour is the square in photo {i}?"
        good, bad = json.dumps({"bbox_2d": list(square)}), json.dumps({"bbox_2d": [width // 2, height // 2, width, height]})
        rows["sft"].append({"images": [full, crop], "messages": two_step_conversation(question, good, "red")})
        rows["dpo"].append({"images": [full], "prompt": box_prompt(question),
                            "chosen": assistant(good), "rejected": assistant(bad)})
        rows["visrl"].append({
            **rows["dpo"][-1], "pair_id": i,
            "chosen_answer_images": [full, crop], "chosen_answer_prompt": answer_prompt(question, good),
            "chosen_answer": assistant("red"),
            "rejected_answer_images": [full, wrong], "rejected_answer_prompt": answer_prompt(question, bad),
            "rejected_answer": assistant("blue")})
    return rows


def peak_memory_mb(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train_stage(stage: str, model_dir: Path, out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    """A few LoRA steps of ``stage`` (sft | dpo | visrl) on ``model_dir``; its timings and memory."""
    import torch
    from datasets import Dataset

    from visrl.train.config import TrainConfig
    from visrl.train.lora import load_train_model

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = TrainConfig(stage=stage, model_name_or_path=str(model_dir), output_dir=str(out), max_steps=args.steps,
                      per_device_train_batch_size=args.batch, lora_rank=64, lora_alpha=128, learning_rate=1e-5,
                      image_max_pixels=args.max_pixels, bf16=True, gradient_checkpointing=True,
                      save_steps=10**6, logging_steps=10**6, resume_from_checkpoint=False, report_to="none")
    tm = load_train_model(cfg, str(model_dir), None)
    grid = tm.processor.image_processor(images=[rows[0]["images"][0]])["image_grid_thw"][0].tolist()
    if stage == "sft":
        from visrl.train.sft import build_sft_trainer as build
    elif stage == "dpo":
        from visrl.train.dpo import build_dpo_trainer as build
    else:
        from visrl.train.joint import build_visrl_trainer as build
    timer = StepTimer()
    trainer = build(cfg, tm, Dataset.from_list(rows), None, out, [timer.callback])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    trainer.save_model(str(out))
    warm = timer.times[1:] or timer.times  # the first step pays for lazy initialisation
    result = {"stage": stage, "steps": len(timer.times), "batch": args.batch,
              "steps_per_s": round(1 / statistics.median(warm), 4), "train_s": round(wall, 2),
              "peak_memory_mb": round(peak_memory_mb(cuda), 1),
              "visual_tokens_per_image": grid[0] * grid[1] * grid[2] // 4,
              "bf16": bool(trainer.args.bf16), "gradient_checkpointing": bool(trainer.args.gradient_checkpointing),
              "vision_cache": getattr(trainer, "vision_cache", None) is not None}
    del trainer, tm
    gc.collect()
    return result


def merge_adapter(base: Path, adapter: Path, workspace: Path) -> tuple[Path, float]:
    from visrl.train.merge import MergeConfig, merge_lora

    started = time.perf_counter()
    out = merge_lora(workspace, MergeConfig(str(base), str(adapter), "models/sft-merged", register=False))
    return out, round(time.perf_counter() - started, 2)


def vllm_generation(model_dir: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> dict:
    """Serve ``model_dir`` with vLLM and run ``backend: remote``'s two-step generation against it."""
    import httpx

    from visrl.reasoning import Sampling
    from visrl.remote import RemoteReasoner

    key, port = "smoke-key", args.vllm_port
    command = ["vllm", "serve", str(model_dir), "--served-model-name", "smoke", "--port", str(port),
               "--api-key", key, "--max-model-len", "8192", "--gpu-memory-utilization", "0.5",
               "--limit-mm-per-prompt", json.dumps({"image": 2}),
               "--mm-processor-kwargs", json.dumps({"max_pixels": args.max_pixels})]
    log = open(Path(args.work) / "vllm.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        started, url = time.perf_counter(), f"http://127.0.0.1:{port}/v1"
        while time.perf_counter() - started < args.vllm_wait:
            if server.poll() is not None:
                return {"error": f"vllm serve exited {server.returncode}; see {log.name}"}
            try:
                if httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            return {"error": f"vllm serve not up after {args.vllm_wait} s; see {log.name}"}
        ready = round(time.perf_counter() - started, 1)
        images = [r["images"][0] for r in rows]
        questions = [r["prompt"][0]["content"][1]["text"].split("?")[0] + "?" for r in rows]
        with RemoteReasoner(url, "smoke", box_format="qwen2_5", api_key=key, concurrency=16,
                            server_max_pixels=args.max_pixels) as remote:
            begun = time.perf_counter()
            results = remote.two_step(images, questions, Sampling(n=4, temperature=1.0, max_new_tokens=32))
            seconds = time.perf_counter() - begun
        return {"server_ready_s": ready, "items": len(images), "samples_per_item": 4,
                "items_per_s": round(len(images) / seconds, 3),
                "answers": sum(len(r) for r in results)}
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def print_table(report: dict) -> None:
    device = report["device"]
    memory = "peak GPU MB" if device.startswith("cuda") else "peak RSS MB"
    print(f"GPU smoke on {report['device_name']} ({report['model']['kind']}, {report['model']['parameters']:,} "
          f"parameters, {report['stages'][0]['visual_tokens_per_image']} visual tokens per image)")
    print(f"{'stage':8s} {'steps':>5s} {'steps/s':>8s} {memory:>12s}  bf16  grad-ckpt  vision-cache")
    for s in report["stages"]:
        print(f"{s['stage']:8s} {s['steps']:5d} {s['steps_per_s']:8.3f} {s['peak_memory_mb']:12.0f}  "
              f"{'yes' if s['bf16'] else 'no':4s}  {'yes' if s['gradient_checkpointing'] else 'no':9s}  "
              f"{'yes' if s['vision_cache'] else '-'}")
    print(f"merge: {report['merge_s']} s -> {report['merged_files']}")
    gen = report.get("vllm")
    if gen:
        print("vllm remote generation: " + (gen.get("error") or f"{gen['items_per_s']} items/s "
                                              f"({gen['samples_per_item']} samples each, server up in {gen['server_ready_s']} s)"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole 7B shape (text 3584 x 28, vision depth 32)")
    parser.add_argument("--tiny", action="store_true", help="the unit-test model size and small images")
    parser.add_argument("--cpu", action="store_true", help="hide any GPU (with --tiny: a CPU self-check)")
    parser.add_argument("--vision-depth", type=int, default=2, help="vision blocks without --full")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per stage (>= 2)")
    parser.add_argument("--batch", type=int, default=1, help="rows per step (the recipes use 1)")
    parser.add_argument("--rows", type=int, default=8, help="synthetic photos")
    parser.add_argument("--work", help="folder for the model and adapters (default: a temporary one)")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM generation even if vllm imports")
    parser.add_argument("--vllm-port", type=int, default=8011)
    parser.add_argument("--vllm-wait", type=int, default=600, help="seconds to wait for vllm serve")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from visrl.models import count_parameters
    from visrl.tiny import build_tiny_qwen2_5

    cuda = torch.cuda.is_available()
    args.work = args.work or tempfile.mkdtemp(prefix="visrl-gpu-smoke-")
    work = Path(args.work)
    shape = model_shape(args)
    args.max_pixels = 112 * 112 if args.tiny else RECIPE_MAX_PIXELS
    started = time.perf_counter()
    base = build_tiny_qwen2_5(work / "base", shape, device="cuda" if cuda else "cpu",
                              dtype="bfloat16" if cuda else "float32")
    build_s = round(time.perf_counter() - started, 1)
    rows = make_rows(args.rows, (224, 168) if args.tiny else PHOTO)
    stages = [train_stage("sft", base, work / "sft", rows["sft"], args)]
    merged, merge_s = merge_adapter(base, work / "sft", work / "workspace")
    stages += [train_stage(stage, merged, work / stage, rows[stage], args) for stage in ("dpo", "visrl")]
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):  # counts parameters without allocating them
        parameters = count_parameters(AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(base)))
    report: dict[str, Any] = {
        "device": "cuda" if cuda else "cpu",
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "torch": torch.__version__, "when": time.strftime("%Y-%m-%d %H:%M"),
        "model": {"kind": "tiny" if args.tiny else "7B (full)" if args.full else
                  f"7B vision geometry, depth {args.vision_depth}, small text model",
                  "parameters": parameters, "shape": {k: v for k, v in vars(shape).items()}, "build_s": build_s},
        "image_size": list((224, 168) if args.tiny else PHOTO), "max_pixels": args.max_pixels,
        "stages": stages, "merge_s": merge_s, "merged_files": sorted(p.name for p in merged.iterdir()),
    }
    if cuda and not args.no_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            report["vllm"] = {"error": "vllm does not import here; skipped"}
        else:
            report["vllm"] = vllm_generation(merged, rows["dpo"], args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=list) + "\n", encoding="utf-8")
    print_table(report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
