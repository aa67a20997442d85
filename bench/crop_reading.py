"""How well does a demo model read a crop that is not the annotated one? (issue 17)

The exact answer judge sees a sampled box only through the answer the model gives on its crop.
If the model reads the named object's exact crop but not a crop a little off it, its answers do not
follow its boxes, and the judge's pairs are noise. This reads, for items 0..n-1 of a split, the
answer step (greedy, the model's own layout) on:

* ``exact``     the named object's annotated box;
* ``jitter``    that box with each side moved by up to ``--jitter`` of its size (train_demo_model's
                ``jitter_box``, the augmentation ``crop_jitter`` trains on);
* ``grow X``    the box grown (X > 0) or shrunk (X < 0) by X of its size on every side;
* ``other``     another object's exact box: ``other_reads_its_own`` is the share answering *that*
                object's detail (a crop reader), ``other_says_named`` the share answering the named
                object's (an answer that ignores the crop).

Measured (``bench/results/crop_reading.json``: val, 60 items, one thread): ``data/demo-base`` reads
exact 1.00, jitter 0.25 0.48, grown 10% 0.58, grown 20% 0.30 (chance 0.33); the learning
benchmark's start after its reader phase (650 steps of jittered crops) 0.95, 0.85, 0.80, 0.43;
``data/demo-model`` 1.00, 0.48, 0.62, 0.37.

    python bench/crop_reading.py data/demo-model [more model folders] [--n 90] [--split val]

Prints a table and writes ``bench/results/crop_reading.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GROW = (-0.1, 0.1, 0.2, 0.35)


def grown(box: Any, share: float, size: tuple[int, int]) -> Any:
    """``box`` with every side moved out by ``share`` of its width/height (in, when negative),
    clamped to the image."""
    from visrl.boxes import Box

    dx, dy = box.width * share, box.height * share
    return Box(box.x1 - dx, box.y1 - dy, box.x2 + dx, box.y2 + dy).clamp(size)


def other_object(scene: Any) -> Any:
    """The first object of ``scene`` that the question does not name."""
    return next(o for k, o in enumerate(scene.objects) if k != scene.target)


def read_crops(model_dir: Path, split: str, n: int, jitter: float, batch: int = 30) -> dict[str, Any]:
    """The shares above for one model folder (its visrl_model.json gives the prompt layout)."""
    import torch
    from learning import recipe  # bench/learning.py: loads scripts/train_demo_model.py
    from transformers import AutoModelForImageTextToText

    from visrl.boxes import crop_box, format_box
    from visrl.contract import read_contract
    from visrl.demo import demo_data
    from visrl.prompts import two_step_conversation
    from visrl.synthetic import SyntheticConfig, render_item

    module = recipe()
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    processor = module.load_processor(model_dir)
    question_first = read_contract(model_dir).prompt_layout == "question_first"
    data = SyntheticConfig(**demo_data())
    scenes = [render_item(data, split, i) for i in range(n)]

    def answers(boxes: list[Any]) -> list[str]:
        out: list[str] = []
        for lo in range(0, n, batch):
            part = list(zip(scenes[lo:lo + batch], boxes[lo:lo + batch], strict=True))
            prompts = [two_step_conversation(s.question, format_box(b, "viscot", s.size), "")[:-1] for s, b in part]
            out += module.generate(model, processor, prompts, [[s.image, crop_box(s.image, b)] for s, b in part],
                                   module.ANSWER_TOKENS, question_first)
        return [a.strip() for a in out]

    def share(replies: list[str], truths: list[str]) -> float:
        return round(sum(r == t for r, t in zip(replies, truths, strict=True)) / n, 4)

    named = [s.answer for s in scenes]
    rng = random.Random(0)
    result = {"exact": share(answers([s.target_object.box for s in scenes]), named),
              "jitter": share(answers([module.jitter_box(s.target_object.box, s.size, rng, jitter)
                                       for s in scenes]), named)}
    for g in GROW:
        result[f"grow {g:+g}"] = share(answers([grown(s.target_object.box, g, s.size) for s in scenes]), named)
    others = [other_object(s) for s in scenes]
    replies = answers([o.box for o in others])
    result["other_reads_its_own"] = share(replies, [o.detail_answer for o in others])
    result["other_says_named"] = share(replies, named)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", type=Path, help="model folders (trained on the demo task)")
    p.add_argument("--split", default="val", help="split of the demo task's seeded stream (never tune on test)")
    p.add_argument("--n", type=int, default=90, help="items read")
    p.add_argument("--jitter", type=float, default=0.25, help="share each side of the jittered box moves")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "crop_reading.json")
    args = p.parse_args(argv)
    missing = [str(m) for m in args.models if not (m / "model.safetensors").is_file()]
    if missing:
        p.error(f"no model.safetensors in {', '.join(missing)}")
    import torch

    torch.set_num_threads(args.threads)
    rows = {str(m): read_crops(m, args.split, args.n, args.jitter) for m in args.models}
    columns = list(next(iter(rows.values())))
    print("| model | " + " | ".join(columns) + " |\n|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.2f}" for c in columns) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"split": args.split, "n": args.n, "jitter": args.jitter, "models": rows},
                                   indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
