"""The learning benchmark: the paper's setting in miniature. Does VisRL, judged by answers alone, beat SFT?

VisRL assumes a small annotated set for the SFT warm-up and many plain VQA items (question and
reference answer, no box) for the reinforcement stage, whose judge reads no region annotation.
On the demo task (``visrl.synthetic`` as the shipped model's ``training_report.json`` names it:
exactly 3 objects, each with its own answer, so a crop of a wrong object always answers wrong and
the exact answer judge alone tells a right box from a wrong one), from ``--base`` (a model that
localises objects and reads crops but does not bind the question's colour to an object) after a
shared reader phase (:func:`reader_phase`: it learns to read loose crops too), per seed:

* ``base``       the start model as it is (greedy: evaluated once, shared by every seed).
* ``warmup``     SFT warm-up on a *small boxed set*: ``--boxed`` scenes of their own seeded stream
                 (``warmup``, disjoint from the workspace's items), cycled for ``--warmup-minutes``
                 (or ``--warmup-steps``): two-step rows (full image -> gt box text, crop -> answer)
                 and a share of direct rows, ``--binding-weight`` on the box's leading digits
                 (``scripts/train_demo_model.py``, the whole model trained, cosine lr).
* ``visrl``      from the warm-up, on ``--items`` *unboxed* train items (the workspace's train
                 boxes are deleted from the store before any arm reads it): generate with
                 ``answer_judge: exact`` and ``crop_judge: none`` (the answer is the only judge),
                 pairs at the method's 0.8 / 0.2 thresholds with the model's own boxes as the only
                 chosen sides (``random_chosen: false``), stage 1 (box-step DPO), stage 2 (joint
                 DPO), both with the SFT term (``--pref-ftx``) and the whole model trained
                 (``--dpo-finetuning``), like the SFT arms. Its wall time is every other arm's budget.
* ``control_a``  the warm-up continued on the same boxed set, same recipe, for that wall time.
* ``control_b``  from the warm-up, SFT on the unboxed items' answers only (direct rows: full
                 image + question -> answer) for that wall time: what a user without VisRL does.
* ``upper``      from the warm-up, SFT with boxes on all ``--items`` items (two-step rows) for that
                 wall time: what the annotations VisRL does without would buy.
* ``grpo``       from the warm-up, GRPO with the two-step answer as its only reward
                 (``configs/demo/train_grpo_answer.yaml``: no box read) for that wall time.

Each arm is scored by :func:`visrl.evaluate.run_eval` on the test split (Acc@0.5, mean IoU,
two-step answer accuracy, box-parse rate; ``DIRECT_ARMS`` also answer directly). Every phase is
timed; the VisRL run also reports how often the answer judge's verdicts agree with the withheld
boxes. Writes ``bench/results/learning.json`` and ``bench/results/learning.png``.

    python bench/learning.py --jobs 3              # 3 seeds, 1,000 RL items, 3 processes (56 min here)
    python bench/learning.py --jobs 2              # seeds in 2 processes of 1 thread each
    python bench/learning.py --base data/demo-model --reader-steps 3 --seeds 1 --items 40 \
        --test-items 20 --warmup-steps 5 --arm-minutes 0.3   # a 3-minute smoke run of every arm

The reader phase runs once before the seeds (650 steps: 12 min on one thread). Time per seed on
one core (``cpu_s`` in the JSON) is about warm-up + 5 x the VisRL arm + the
evaluations, since four arms get the VisRL arm's wall time; ``--attempts``, ``--gen-batch`` and
``--gen-tokens`` size its generation, the longest phase.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh clone runs it without installing the package

from visrl.demo import BENCH_ARMS, BENCH_VERSION  # noqa: E402
from visrl.model_files import is_adapter  # noqa: E402
from visrl.progress import Progress  # noqa: E402
from visrl.vocabulary import POLICY_ROLLOUT  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CONFIGS = ROOT / "configs" / "demo"
BASE = ROOT / "data" / "demo-base"
START = "models/bench-base"  # --base, copied into each workspace
FOLDERS = {"reader": "models/bench-reader", "warmup": "models/bench-warmup", "control_a": "models/bench-control-a",
           "control_b": "models/bench-control-b", "upper": "models/bench-upper"}
METRICS = (("acc50", "Acc@0.5"), ("mean_iou", "mean IoU"), ("answer_acc", "answer (two-step)"),
           ("parse_rate", "box parse"))
# Every arm, in table order, with its label (the app's, visrl.demo.BENCH_ARMS) and plot colour.
ARMS = tuple((arm, label, colour) for (arm, label), colour in zip(
    (("base", "start model (base)"), *BENCH_ARMS.items()),
    ("#9aa5b1", "#6c7a89", "#e0a030", "#c06040", "#8fbf7f", "#9cc3ef", "#2f7ed8", "#9b6fd0"), strict=True))
SEED_ARMS = tuple(BENCH_ARMS)
DIRECT_ARMS = ("base", "warmup", "control_b")  # also scored answering directly (control B trains that)


# ---------------------------------------------------------------------- workspace

def task_data(overrides: dict[str, Any]) -> dict[str, Any]:
    """The demo task: the shipped model's (visrl.demo.demo_data), with ``--data`` overrides."""
    from visrl.demo import demo_data

    return {**demo_data(), **overrides}


def make_workspace(parent: Path, name: str, n_train: int, n_test: int, data: dict[str, Any],
                   base: Path | None) -> Path:
    """A demo workspace of ``n_train``/``n_test`` items of ``data``'s task, with ``base`` at START."""
    from visrl.demo import create_demo_workspace

    # n_pairs_items=0: the bench makes its own pairs, with its own seed.
    ws = create_demo_workspace(parent / name, n_pairs_items=0, progress=lambda _: None,
                               data={**data, "n_train": n_train, "n_val": 0, "n_test": n_test})
    if base is not None:
        shutil.copytree(base, ws / START, dirs_exist_ok=True)
    return ws


def strip_boxes(ws: Path, split: str) -> dict[int, str]:
    """Delete the annotated boxes of ``split``'s items from the store (the RL arms' items are
    unboxed VQA); returns {item id: the box as it was}, for judging the judge afterwards."""
    from visrl.store import Store

    store = Store.open(ws)
    rows = [r for r in store.items("demo", split) if r.get("gt_box")]
    with store.atomic():
        for row in rows:
            store.db["items"].update(row["id"], {"gt_box": None})
    store.close()
    return {r["id"]: r["gt_box"] for r in rows}


def evaluate(ws: Path, model: str, adapter: str | None, args: argparse.Namespace, direct: bool, out: str) -> dict:
    from visrl.config import load_config
    from visrl.evaluate import EvalConfig, run_eval

    cfg = load_config(EvalConfig, CONFIGS / "eval.yaml", {
        "model_name_or_path": model, "adapter_name_or_path": adapter, "limit": args.test_items,
        "batch_size": args.eval_batch, "box_format": "viscot", "answer_judge": "exact",
        "direct_baseline": direct, "output_dir": out})
    return run_eval(ws, cfg).metrics


# ---------------------------------------------------------------------- SFT arms

def recipe() -> Any:
    """scripts/train_demo_model.py as a module: the warm-up and the SFT arms run its loop."""
    spec = importlib.util.spec_from_file_location("train_demo_model", ROOT / "scripts" / "train_demo_model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def sft(ws: Path, start: str, out: str, args: argparse.Namespace, seed: int, *, split: str, scenes: int,
        direct: float, minutes: float, steps: int = 0, boxes: bool = True, **overrides: Any) -> dict:
    """The demo recipe from ``start`` into ``out`` (workspace folders) on scenes 0..``scenes``-1
    of ``split``'s stream, cycled; ``direct`` is the share of direct rows. Runs ``minutes`` of
    training, or ``steps`` when given (the cosine spans whichever ends first). ``boxes``: the arm
    reads box annotations, so it gets the pointer loss too (``--pointer-weight``); control B does not.
    ``overrides``: DemoTrainConfig fields over these."""
    from visrl.contract import read_contract
    from visrl.models import copy_model_info

    module = recipe()
    fields = dict(
        output_dir=str(ws / out), init_from=str(ws / start), seed=seed, steps=steps or 1_000_000,
        max_minutes=minutes if not steps else 1e6, batch_size=args.sft_batch, learning_rate=args.sft_lr,
        warmup_steps=10, direct_fraction=direct, binding_weight=args.binding_weight, save_every=0,
        data_split=split, boxed_items=scenes, threads=args.threads, device="cpu", workers=0,
        log_every=50, eval_every=0, data=task_data(args.data), question_first=args.question_first,
        pointer_weight=args.pointer_weight if boxes and args.question_first else 0.0,
        crop_jitter=args.crop_jitter if boxes else 0.0)
    cfg = module.DemoTrainConfig(**{**fields, **overrides})
    report, _, _ = module.train(cfg, ws / out)
    # A new model id; the layout is the one this run trained in (train wrote it), not the start's.
    copy_model_info(ws / start, ws / out, contract=read_contract(ws / out))
    return {"steps": report["steps"], "seconds": report["train_seconds"], "rows_seen": report["scenes_seen"]}


def reader_phase(parent: Path, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The start model of every arm: ``--base`` taught to read *loose* crops, once for all seeds.

    ``data/demo-base`` reads the named object's exact crop (1.00 on val) but not a crop a little
    off it (sides moved up to 25%: 0.48, chance 0.33; bench/crop_reading.py), so its answers,
    and the answer judge's verdicts on its sampled boxes, say little about the box.
    ``--reader-steps`` of two-step rows on fresh scenes with jittered crops (``--crop-jitter``),
    question first, no pointer loss and no binding weight, fix the reading (0.85 on jittered crops
    after 650 steps) and leave the binding at chance (test Acc@0.5 0.21): the model VisRL is meant
    for, one that sees but does not yet look at the right place. Kept under ``--keep`` and reused when it is there already."""
    if not args.reader_steps:
        return args.base, {"steps": 0}
    # Beside the model, not in it: the folder is copied into every seed's workspace as its start.
    done = parent / "reader" / "reader.json"
    if done.is_file():
        return done.parent / FOLDERS["reader"], json.loads(done.read_text())
    ws = make_workspace(parent, "reader", 0, 1, task_data(args.data), args.base)
    run = sft(ws, START, FOLDERS["reader"], args, 0, split="reader", scenes=0, direct=args.direct_share,
              minutes=1e6, steps=args.reader_steps, boxes=True, pointer_weight=0.0, binding_weight=1.0)
    done.write_text(json.dumps(run))
    return ws / FOLDERS["reader"], run


# ---------------------------------------------------------------------- VisRL arm

def generate_pairs(ws: Path, model: str, args: argparse.Namespace, seed: int,
                   withheld: dict[int, str] | None = None, reasoner: Any = None) -> dict[str, Any]:
    """Rollouts on the first ``args.items`` train items, judged by the exact answer judge alone
    and paired; what was kept and why. ``withheld`` (the boxes deleted from the store) scores the
    judge's verdicts against them; ``reasoner`` replaces the model (tests)."""
    from visrl.config import load_config
    from visrl.generate import GenerateConfig, run_generate
    from visrl.pairs import build_pairs
    from visrl.store import Store

    cfg = load_config(GenerateConfig, CONFIGS / "generate.yaml", {
        "model_name_or_path": model, "adapter_name_or_path": None, "split": "train", "limit": args.items,
        "attempts": args.attempts, "box_format": "viscot", "answer_judge": "exact", "crop_judge": "none",
        "batch_size": args.gen_batch, "max_new_tokens": args.gen_tokens, "temperature": args.gen_temperature,
        "seed": seed})
    cpu = time.process_time()
    report = run_generate(ws, cfg, reasoner=reasoner)
    cpu = time.process_time() - cpu
    store = Store.open(ws)
    # Called again on the same source it adds nothing; it only says why the other items gave none.
    skipped = build_pairs(store, cfg.pairs_config(), run_key=report.run_key, source=report.run_key).skipped
    rollouts = store.rollouts(run_key=report.run_key)
    pairs = stored_pairs(store, report.run_key)
    store.close()
    policy = [r for r in rollouts if r["kind"] == POLICY_ROLLOUT]
    out = {"items": report.items, "rollouts": report.rollouts, "parse_rate": report.parse_rate,
           "pairs": report.pairs_total, "skipped": skipped, "crop_judge": cfg.crop_judge,
           "answer_judge": cfg.answer_judge, "policy_answer_rate": _share(r["answer_score"] for r in policy),
           "seconds_per_100_items": round(100 * report.seconds / max(report.items, 1), 1),
           "cpu_seconds_per_100_items": round(100 * cpu / max(report.items, 1), 1),
           "settings": {"attempts": cfg.attempts, "batch_size": cfg.batch_size, "max_new_tokens": cfg.max_new_tokens,
                        "temperature": cfg.temperature},
           "thresholds": asdict(cfg.pairs_config())}
    if withheld:
        out["judge_vs_boxes"] = judge_agreement(rollouts, pairs, withheld)
    return out


def stored_pairs(store: Any, run_key: str) -> list[dict[str, Any]]:
    """The run's pairs: item id and both rollout ids (visrl.review's query)."""
    from visrl.review import source_pairs

    item_ids = sorted({r["item_id"] for r in store.rollouts(run_key=run_key)})
    return source_pairs(store, run_key, item_ids)


def judge_agreement(rollouts: list[dict], pairs: list[dict], withheld: dict[int, str]) -> dict[str, Any]:
    """The answer judge's verdicts against the withheld boxes: of the rollouts it passed (>= 0.8)
    and failed (<= 0.2), the share whose box has IoU > 0.5 with the annotated one; of the pairs,
    the share whose chosen box hits it and whose rejected box misses it."""
    from visrl.boxes import iou
    from visrl.store import box_from_json

    def overlap(r: dict) -> float:
        box, gt = box_from_json(r["box"]), box_from_json(withheld.get(r["item_id"]))
        return -1.0 if box is None or gt is None else iou(box, gt)

    def hit(r: dict) -> bool | None:
        o = overlap(r)
        return None if o < 0 else o > 0.5

    sides: dict[str, list[bool]] = {"passed": [], "failed": []}
    for r in rollouts:
        side = "passed" if (r["answer_score"] or 0) >= 0.8 else "failed" if (r["answer_score"] or 0) <= 0.2 else None
        if side and hit(r) is not None:
            sides[side].append(bool(hit(r)))
    by_id = {r["id"]: r for r in rollouts}
    right = [hit(by_id[p["chosen_rollout_id"]]) is True and hit(by_id[p["rejected_rollout_id"]]) is False
             for p in pairs]
    ordered = [overlap(by_id[p["chosen_rollout_id"]]) > overlap(by_id[p["rejected_rollout_id"]]) for p in pairs]
    # Answer accuracy where the box lands: IoU > 0.5 with the named object, some overlap, none.
    bins: dict[str, list[float]] = {"hit": [], "near": [], "off": []}
    for r in rollouts:
        if box_from_json(r["box"]) is not None and r["answer_score"] is not None:
            o = overlap(r)
            bins["hit" if o > 0.5 else "near" if o > 0 else "off"].append(float(r["answer_score"]))
    return ({f"{side}_n": len(v) for side, v in sides.items()}
            | {f"{side}_iou_hit": round(sum(v) / len(v), 4) if v else None for side, v in sides.items()}
            | {"pairs_right": round(sum(right) / len(right), 4) if right else None,
               "pairs_ordered": round(sum(ordered) / len(ordered), 4) if ordered else None}
            | {f"answer_when_{b}": round(sum(v) / len(v), 4) if v else None for b, v in bins.items()}
            | {f"rollouts_{b}": len(v) for b, v in bins.items()})


def _share(scores: Any) -> float:
    values = [float(s or 0.0) for s in scores]
    return round(sum(values) / len(values), 4) if values else 0.0


class Clock:
    """Wall and CPU seconds of each phase. CPU seconds (this process, every thread) are what a
    phase costs on a core of its own; wall seconds are what it took here, other jobs' load
    included (the two differ by the share of a core the process got)."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        wall, cpu = time.monotonic(), time.process_time()
        try:
            yield
        finally:
            self.wall[phase] = round(time.monotonic() - wall, 1)
            self.cpu[phase] = round(time.process_time() - cpu, 1)


class Deadline(Progress):
    """A Progress that asks the trainer to stop (after the current step, with a save) once
    ``seconds`` of training have passed; the clock starts when training does (set_total)."""

    def __init__(self, seconds: float, desc: str) -> None:
        super().__init__(bar=False, desc=desc)
        self.seconds, self.started = seconds, time.monotonic()

    def set_total(self, total: int) -> None:
        super().set_total(total)
        self.started = time.monotonic()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        if time.monotonic() - self.started >= self.seconds:
            self.stop_requested = True


def train_stage(ws: Path, recipe_file: str, overrides: dict[str, Any], seconds: float | None = None) -> Any:
    from visrl.train.config import load_train_config
    from visrl.train.run import train

    base = {"resume_from_checkpoint": False, "save_steps": 100_000, "save_total_limit": 1,
            "logging_steps": 10, "box_format": "viscot", "bf16": False, "gradient_checkpointing": False}
    cfg = load_train_config(CONFIGS / recipe_file, {**base, **overrides})
    progress = Deadline(seconds, recipe_file) if seconds else Progress(bar=False, desc=recipe_file)
    return train(ws, cfg, progress=progress)


def visrl_arm(ws: Path, args: argparse.Namespace, seed: int, withheld: dict[int, str] | None,
              clock: Clock) -> dict:
    """generate -> pairs -> stage 1 -> stage 2 from the warm-up; where the result is, pairs, steps.
    Phases are timed by ``clock`` as visrl_generate, visrl_stage1, visrl_stage2."""
    import torch

    torch.manual_seed(seed)  # box sampling
    with clock("visrl_generate"):
        gen = generate_pairs(ws, FOLDERS["warmup"], args, seed, withheld)
    print(f"  [seed {seed}] visrl generate: {gen['items']} items, {gen['rollouts']} rollouts, {gen['pairs']} pairs "
          f"({clock.wall['visrl_generate']:.0f} s; per 100 items {gen['seconds_per_100_items']} s, "
          f"{gen['cpu_seconds_per_100_items']} CPU s); judge vs boxes {gen.get('judge_vs_boxes')}; "
          f"no pair: {gen['skipped']}", flush=True)
    if gen["pairs"] < 2:  # nothing to train on: the arm is its start, and says so
        print(f"  [seed {seed}] visrl: only {gen['pairs']} pairs from {args.items} items; no DPO", flush=True)
        warmup = {"model": FOLDERS["warmup"], "adapter": None}
        return {**warmup, "stage1": warmup, "generate": gen, "steps": {"stage1": 0, "stage2": 0}}
    common = {"learning_rate": args.lr, "per_device_train_batch_size": args.dpo_batch, "seed": seed,
              "pref_ftx": args.pref_ftx, "finetuning_type": args.dpo_finetuning,
              "max_steps": -1, "pair_status": ["pending", "accepted"], "adapter_name_or_path": None}
    with clock("visrl_stage1"):
        s1 = train_stage(ws, "train_rl_stage1.yaml", {**common, "model_name_or_path": FOLDERS["warmup"],
                                                      "output_dir": "models/bench-visrl-stage1",
                                                      "num_train_epochs": args.stage1_epochs})
    model, adapter = trained(s1)
    with clock("visrl_stage2"):
        s2 = train_stage(ws, "train_rl_stage2.yaml", {**common, "model_name_or_path": model,
                                                      "adapter_name_or_path": adapter,
                                                      "output_dir": "models/bench-visrl-stage2",
                                                      "num_train_epochs": args.stage2_epochs})
    print(f"  [seed {seed}] visrl stage 1: {s1.global_step} steps ({clock.wall['visrl_stage1']:.0f} s, "
          f"{clock.cpu['visrl_stage1']:.0f} CPU s), stage 2: {s2.global_step} steps "
          f"({clock.wall['visrl_stage2']:.0f} s, {clock.cpu['visrl_stage2']:.0f} CPU s)", flush=True)
    stage1 = {"model": model, "adapter": adapter}
    model, adapter = trained(s2)
    return {"model": model, "adapter": adapter, "stage1": stage1, "generate": gen,
            "steps": {"stage1": s1.global_step, "stage2": s2.global_step}}


def trained(result: Any) -> tuple[str, str | None]:
    """(model, adapter) a stage's result loads as: a full fine-tune wrote a whole model, LoRA an
    adapter on ``result.base``."""
    if is_adapter(result.path):
        return result.base, str(result.path)
    return str(result.path), None


def grpo_arm(ws: Path, args: argparse.Namespace, seed: int, seconds: float) -> dict:
    """GRPO with the answer reward alone from the warm-up, for ``seconds`` of training."""
    result = train_stage(ws, "train_grpo_answer.yaml", {
        "model_name_or_path": FOLDERS["warmup"], "adapter_name_or_path": None, "output_dir": "models/bench-grpo",
        "seed": seed, "learning_rate": args.grpo_lr, "max_steps": 1_000_000, "lr_scheduler_type": "constant",
        "logging_steps": 5}, seconds=seconds)
    return {"model": result.base, "adapter": str(result.path), "steps": result.global_step}


# ---------------------------------------------------------------------- one seed

def run_seed(parent: Path, args: argparse.Namespace, seed: int) -> dict:
    clock = Clock()
    with clock("workspace"):
        ws = make_workspace(parent, f"seed-{seed}", args.items, args.test_items, task_data(args.data), args.base)
        withheld = strip_boxes(ws, "train")  # every RL arm's items are unboxed from here on
    with clock("warmup"):
        warm = sft(ws, START, FOLDERS["warmup"], args, seed, split="warmup", scenes=args.boxed,
                   direct=args.direct_share, minutes=args.warmup_minutes, steps=args.warmup_steps)
    print(f"  [seed {seed}] warm-up: {warm['steps']} steps x {args.sft_batch} rows on {args.boxed} boxed scenes "
          f"({warm['seconds']} s)", flush=True)
    rl = visrl_arm(ws, args, seed, withheld, clock)
    rl_seconds = sum(v for k, v in clock.wall.items() if k.startswith("visrl_"))
    budget = args.arm_minutes * 60 if args.arm_minutes else rl_seconds
    steps = {**rl["steps"], "warmup": warm["steps"]}
    # Stage 1 is scored too: a stage-2 drop would otherwise hide a stage-1 lift.
    runs: dict[str, dict[str, Any]] = {"warmup": {"model": FOLDERS["warmup"], "adapter": None},
                                       "visrl_stage1": rl["stage1"], "visrl": rl}
    for arm, kwargs in (("control_a", {"split": "warmup", "scenes": args.boxed, "direct": args.direct_share}),
                        ("control_b", {"split": "train", "scenes": args.items, "direct": 1.0, "boxes": False}),
                        ("upper", {"split": "train", "scenes": args.items, "direct": args.direct_share})):
        with clock(arm):
            done = sft(ws, FOLDERS["warmup"], FOLDERS[arm], args, seed, minutes=budget / 60, **kwargs)
        steps[arm] = done["steps"]
        runs[arm] = {"model": FOLDERS[arm], "adapter": None}
        print(f"  [seed {seed}] {arm}: {done['steps']} steps x {args.sft_batch} ({done['seconds']} s of "
              f"{budget:.0f} s)", flush=True)
    if args.grpo:
        with clock("grpo"):
            runs["grpo"] = grpo_arm(ws, args, seed, budget)
        steps["grpo"] = runs["grpo"]["steps"]
        print(f"  [seed {seed}] grpo: {steps['grpo']} steps ({clock.wall['grpo']:.0f} s)", flush=True)
    out: dict[str, Any] = {"seed": seed, "pairs": rl["generate"]["pairs"], "generate": rl["generate"],
                           "steps": steps}
    for arm in SEED_ARMS:
        if arm not in runs:
            continue
        with clock(f"eval_{arm}"):
            out[arm] = evaluate(ws, runs[arm]["model"], runs[arm]["adapter"], args, arm in DIRECT_ARMS,
                                f"exports/eval-{arm}")
        print(f"  [seed {seed}] eval {arm}: {_line(out[arm])} ({clock.wall[f'eval_{arm}']:.0f} s)", flush=True)
    out["times_s"], out["cpu_s"] = clock.wall, clock.cpu
    out["rl_seconds"], out["budget_seconds"] = round(rl_seconds, 1), round(budget, 1)
    out["seed_seconds"], out["seed_cpu_seconds"] = round(sum(clock.wall.values()), 1), round(sum(clock.cpu.values()), 1)
    return out


def _line(m: dict) -> str:
    direct = f"  direct {m['direct_answer_acc']:.3f}" if m.get("direct_answer_acc") is not None else ""
    return "  ".join(f"{label} {m[key]:.3f}" for key, label in METRICS) + direct


# ---------------------------------------------------------------------- summary

def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 4),
            "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}


def summarize(baseline: dict, seeds: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    keys = [key for key, _ in METRICS] + ["direct_answer_acc"]
    summary = {"base": {key: mean_std([baseline[key]]) for key in keys if baseline.get(key) is not None}}
    for arm in SEED_ARMS:
        if seeds and all(arm in s for s in seeds):
            summary[arm] = {key: mean_std([s[arm][key] for s in seeds]) for key in keys
                            if all(s[arm].get(key) is not None for s in seeds)}
    return summary


def table(summary: dict, n_seeds: int) -> str:
    columns = [*METRICS, ("direct_answer_acc", "answer (direct)")]
    lines = ["| arm | " + " | ".join(label for _, label in columns) + " |", "|---|" + "---:|" * len(columns)]
    for arm, label, _ in ARMS:
        if arm in summary:
            cells = [f"{summary[arm][key]['mean']:.3f} ± {summary[arm][key]['std']:.3f}" if key in summary[arm]
                     else "" for key, _ in columns]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"\nMean ± std over {n_seeds} seed(s); the start model is greedy, so its std is 0.")
    return "\n".join(lines)


def plot(summary: dict, seeds: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm in ARMS if arm[0] in summary]
    fig, ax = plt.subplots(figsize=(10, 5.0), dpi=110)
    width = 0.85 / len(arms)
    for a, (arm, label, colour) in enumerate(arms):
        xs = [m + (a - (len(arms) - 1) / 2) * width for m in range(len(METRICS))]
        means = [summary[arm][key]["mean"] for key, _ in METRICS]
        stds = [summary[arm][key]["std"] for key, _ in METRICS]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, color=colour)
        if arm != "base":  # each seed as a dot on its bar
            for x, (key, _) in zip(xs, METRICS, strict=True):
                ax.plot([x] * len(seeds), [s[arm][key] for s in seeds], "k.", ms=4)
    ax.set_xticks(range(len(METRICS)), [label for _, label in METRICS])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test split")
    ax.set_title(title, fontsize=9)
    # Below the axes: inside, it hid the tallest bars (the upper bound's Acc@0.5).
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=3, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------- main

def _data_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--data expects key=value, got {text!r}")
    return key, yaml.safe_load(value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=BASE, help="the start model's folder (default data/demo-base)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds")
    p.add_argument("--items", type=int, default=1000, help="unboxed train items of the RL arms (control B "
                   "and the upper bound train on the same items); 1,000 keeps a seed near an hour with 3 "
                   "seeds at once on 2 cores (four arms get the VisRL arm's wall time)")
    p.add_argument("--boxed", type=int, default=128,
                   help="scenes of the small boxed set (warm-up, control A). Chosen on val so that SFT on it "
                        "plateaus (bench/results/dpo_probes.json): from the reader start, 64 scenes stay at "
                        "chance (val Acc@0.5 0.14-0.18 to step 450), 128 plateau at 0.28-0.34 (steps 150-400), "
                        "200 rise to 0.38 and, continued, to 0.46-0.52; 300 reached 0.6-0.97")
    p.add_argument("--warmup-minutes", type=float, default=4.0, help="wall time of the SFT warm-up")
    p.add_argument("--warmup-steps", type=int, default=200,
                   help="warm-up steps (0: --warmup-minutes instead). From the reader start on 128 boxed "
                        "scenes, a 200-step cosine scored Acc@0.5 0.27 on 100 val items (another data seed)")
    p.add_argument("--binding-weight", type=float, default=10.0,
                   help="loss weight of the box's leading digits in every SFT arm (train_demo_model.py)")
    p.add_argument("--question-first", action=argparse.BooleanOptionalAction, default=True,
                   help="SFT arms put the question before the image (the shipped model's layout, written "
                        "to each arm's visrl_model.json, so generation, DPO and evaluation follow it)")
    p.add_argument("--pointer-weight", type=float, default=1.0,
                   help="the pointer loss of the SFT arms that read boxes (train_demo_model.py; 0: off)")
    p.add_argument("--reader-steps", type=int, default=650,
                   help="steps of the shared reader phase that makes --base read loose crops (see "
                        "reader_phase; 0: start from --base as it is)")
    p.add_argument("--crop-jitter", type=float, default=0.25,
                   help="two-step rows of the SFT arms crop a box moved by up to this share of its size "
                        "(train_demo_model.py crop_jitter), so the answer step reads the loose crops the "
                        "model's own sampled boxes give")
    p.add_argument("--direct-share", type=float, default=0.1, help="share of direct rows in the two-step SFT arms")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="peak lr of the SFT arms (cosine)")
    p.add_argument("--sft-batch", type=int, default=16, help="rows per SFT step")
    p.add_argument("--test-items", type=int, default=200, help="test items scored")
    p.add_argument("--eval-batch", type=int, default=50, help="items per evaluation batch")
    # Measured (CPU seconds of one thread, 128 items, the current demo model on the 3-object task):
    # 1 attempt, 64 items a batch: 14.6 s per 100 items, 57% of items paired (2,000 items: ~5 min,
    # ~1,100 pairs); 2 attempts: 23.6 s per 100 items, 82% paired (about the same per pair).
    # Generation is the VisRL arm's longest phase, and four other arms get its wall time: one attempt.
    p.add_argument("--attempts", type=int, default=1, help="generation attempts per item (each: 2 boxes)")
    p.add_argument("--gen-batch", type=int, default=64, help="items per generation batch")
    p.add_argument("--gen-tokens", type=int, default=32, help="max new tokens of a box step (a box is ~28)")
    p.add_argument("--gen-temperature", type=float, default=0.5,
                   help="box sampling temperature. The answer judge sees the box only through the crop, and "
                        "the demo's crop reader reads near-exact crops only (a box grown 10%% a side reads "
                        "0.58, 20%%: chance), so a cooler sample keeps the digits after the object's choice "
                        "precise: on 300 items from the warm-up, pairs ordered by IoU 0.48 at 1.0, 0.53 at "
                        "0.5, 0.55 at 0.25")
    p.add_argument("--stage1-epochs", type=float, default=5.0,
                   help="stage-1 epochs over the pairs. On 541 answer-judged pairs from the 128-scene warm-up "
                        "(full, lr 1e-3), 5 epochs took val Acc@0.5 from 0.27 to 0.37; 1 epoch at 1e-4 to "
                        "5e-4, LoRA or full, moved nothing")
    p.add_argument("--stage2-epochs", type=float, default=1.0, help="stage-2 epochs over the pairs")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of both DPO stages (the SFT arms' peak lr)")
    p.add_argument("--pref-ftx", type=float, default=1.0,
                   help="SFT term on the chosen completions in both DPO stages (TrainConfig.pref_ftx). On "
                        "177 pairs with known right/wrong boxes, plain DPO took the warm-up's box parse "
                        "rate from 1.00 to 0.905 and Acc@0.5 from 0.525 to 0.465; with 1.0: 0.985, 0.515")
    p.add_argument("--dpo-batch", type=int, default=8, help="pairs per DPO step")
    p.add_argument("--dpo-finetuning", choices=("lora", "full"), default="full",
                   help="finetuning_type of both DPO stages (the SFT arms train the whole model too)")
    p.add_argument("--grpo-lr", type=float, default=5e-4, help="LoRA lr of the GRPO arm")
    p.add_argument("--no-grpo", dest="grpo", action="store_false", help="skip the GRPO arm")
    p.add_argument("--arm-minutes", type=float, default=0.0,
                   help="fixed budget of the other arms (smoke runs only; 0: the VisRL arm's wall time)")
    p.add_argument("--data", type=_data_override, action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the demo task (SyntheticConfig), e.g. distinct_details=true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (see THREADS_NOTE)")
    p.add_argument("--jobs", type=int, default=1,
                   help="seeds run at once, each in its own process (at most one per core: each arm "
                        "is timed, and the other arms get the VisRL arm's wall time)")
    p.add_argument("--keep", help="keep the workspaces in this folder (default: a deleted temp folder)")
    p.add_argument("--out", type=Path, default=RESULTS / "learning.json")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if not (args.base / "model.safetensors").is_file():
        p.error(f"--base {args.base} holds no model.safetensors (copy the start model there, "
                "e.g. cp -r data/demo-model data/demo-base)")
    args.data = dict(args.data)
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
    data = task_data(args.data)
    if not (data.get("distinct_details") and data.get("max_objects") == data.get("min_objects") == 3):
        print(f"warning: the task is not 3 objects with distinct details ({data}); a wrong crop can "
              "answer right, so the answer judge alone can pair a wrong box as chosen", flush=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="visrl-learning-") as tmp:
        parent = Path(args.keep).resolve() if args.keep else Path(tmp)
        t = time.monotonic()
        start, reader = reader_phase(parent, args)
        print(f"reader phase: {reader} ({time.monotonic() - t:.0f} s)", flush=True)
        t = time.monotonic()
        seed_args = argparse.Namespace(**{**vars(args), "base": start})  # every arm starts from the reader
        ws = make_workspace(parent, "baseline", 0, args.test_items, data, start)
        baseline = evaluate(ws, START, None, args, True, "exports/eval-base")
        print(f"start model: {_line(baseline)} ({time.monotonic() - t:.0f} s)", flush=True)
        seeds = run_seeds(parent, seed_args)
    summary = summarize(baseline, seeds)
    report = {"bench_version": BENCH_VERSION, "config": {k: str(v) if isinstance(v, Path) else v
                                                         for k, v in vars(args).items()},
              "task": data, "threads_note": THREADS_NOTE, "reader": reader, "baseline": baseline, "seeds": seeds,
              "summary": summary, "total_seconds": round(time.monotonic() - started, 1),
              "machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu": platform.processor() or platform.machine()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    pairs = ", ".join(str(s["pairs"]) for s in seeds)
    rl_min = statistics.fmean(s["rl_seconds"] for s in seeds) / 60
    plot(summary, seeds, args.out.with_suffix(".png"),
         f"demo test split ({args.test_items} items), {args.seeds} seed(s); warm-up on {args.boxed} boxed scenes\n"
         f"VisRL (answer judge only): {args.items} unboxed items -> {pairs} pairs, {rl_min:.1f} min; other arms: "
         + (f"{args.arm_minutes:g} min (smoke run)" if args.arm_minutes else "the same wall time"))
    print("\n" + table(summary, args.seeds))
    seed_min = ", ".join(f"{s['seed_seconds'] / 60:.1f} ({s['seed_cpu_seconds'] / 60:.1f} CPU)" for s in seeds)
    print(f"\npairs per seed: {pairs}; VisRL arm {rl_min:.1f} min per seed; minutes per seed: {seed_min}; "
          f"total {report['total_seconds'] / 60:.1f} min")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
