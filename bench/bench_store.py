"""Latency of the curation desk's queries and key presses on a store with 100,000 pairs.

    .venv/bin/python bench/bench_store.py [--pairs 100000] [--items 20000] [--repeat 20] [--presses 200]

Fills a throw-away workspace (two datasets, 80/20; statuses 70% pending, 20% accepted, 10%
rejected; random scores and questions) straight through sqlite-utils, then times what the
Pairs tab runs per key press or page: ``next_pair`` with each kind of filter (also keyset
continuation from a pair in the middle), ``count_pairs``, ``status_counts`` and ``page_pairs``
(first and a deep page). Reports the median and the worst of ``--repeat`` runs in milliseconds.

Then what one key press costs the server (:func:`visrl.desk.act`: the review action, the next
pair, its claim, the progress line), walking ``--presses`` pairs with Accept, with no search, a
common search and a rare one (1 question in 1,000 holds "okapi"), p50 and p95 in milliseconds.
Prints tables and writes bench/results/store.json (store-1000000.json for other sizes).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from visrl import desk  # noqa: E402
from visrl.review import PairFilter, count_pairs, next_pair, page_pairs, status_counts  # noqa: E402
from visrl.store import Store, now  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "store.json"
WORDS = ("red", "green", "blue", "circle", "square", "triangle", "dot", "digit", "sign", "car",
         "left", "right", "top", "bottom", "number", "colour", "text", "label", "person", "tree")


def fill(store: Store, n_pairs: int, n_items: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    db = store.db
    ids = {name: store.add_dataset(name, "bench") for name in ("main", "side")}
    stamp = now()
    items = []
    for i in range(n_items):
        dataset = "main" if i < n_items * 0.8 else "side"
        items.append({"id": i + 1, "dataset_id": ids[dataset], "split": "train", "source_id": str(i),
                      "image": f"images/{i}.png", "width": 640, "height": 480,
                      "question": "What is the " + " ".join(rng.choices(WORDS, k=4))
                      + (" okapi" if i % 1000 == 7 else "") + "?",
                      "answer": rng.choice(WORDS), "created_at": stamp})
    db["items"].insert_all(items, batch_size=5000)
    pairs = []
    for p in range(n_pairs):
        item = items[p % n_items]
        chosen, rejected = round(rng.uniform(0.8, 1.0), 3), round(rng.uniform(0.0, 0.2), 3)
        status = rng.choices(("pending", "accepted", "rejected"), weights=(70, 20, 10))[0]
        pairs.append({
            "item_id": item["id"], "dataset_id": item["dataset_id"],
            "chosen_rollout_id": 2 * p + 1, "rejected_rollout_id": 2 * p + 2,
            "chosen_box": "[10, 10, 100, 100]", "chosen_answer": rng.choice(WORDS), "chosen_score": chosen,
            "rejected_box": "[300, 200, 400, 300]", "rejected_answer": rng.choice(WORDS),
            "rejected_score": rejected, "margin": round(chosen - rejected, 3),
            "priority": round(rng.random() * 2, 4), "status": status, "version": 1, "edited": 0,
            "source": "bench", "created_at": stamp, "updated_at": stamp})
    db["pairs"].insert_all(pairs, batch_size=5000)
    db.execute("ANALYZE")


def timed(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    fn()  # warm the page cache
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) * 1000)
    return {"median_ms": round(statistics.median(runs), 3), "max_ms": round(max(runs), 3)}


def cases(store: Store, n_pairs: int) -> dict[str, Callable[[], Any]]:
    middle = n_pairs // 2
    pending = PairFilter()
    return {
        "next_pair pending (priority)": lambda: next_pair(store, pending),
        "next_pair pending after a middle pair": lambda: next_pair(store, pending, after=middle),
        "next_pair pending, backwards": lambda: next_pair(store, pending, after=middle, backwards=True),
        "next_pair dataset=side": lambda: next_pair(store, PairFilter(dataset="side")),
        "next_pair margin 0.9-0.95": lambda: next_pair(store, PairFilter(min_margin=0.9, max_margin=0.95)),
        "next_pair search 'triangle dot'": lambda: next_pair(store, PairFilter(search="triangle dot")),
        "next_pair any status, oldest": lambda: next_pair(store, PairFilter(status=None), sort="oldest",
                                                         after=middle),
        "count_pairs pending": lambda: count_pairs(store, pending),
        "count_pairs dataset=side accepted": lambda: count_pairs(store, PairFilter(status="accepted", dataset="side")),
        "count_pairs search 'triangle dot'": lambda: count_pairs(store, PairFilter(search="triangle dot")),
        "count_pairs search 'okapi' (rare)": lambda: count_pairs(store, PairFilter(search="okapi")),
        "next_pair search 'okapi' (rare)": lambda: next_pair(store, PairFilter(search="okapi")),
        "status_counts all": lambda: status_counts(store),
        "status_counts dataset=main": lambda: status_counts(store, "main"),
        "page_pairs first 50": lambda: page_pairs(store, pending, limit=50),
        "page_pairs offset 50,000": lambda: page_pairs(store, PairFilter(status=None), offset=50_000, limit=50),
    }


def percentiles(runs: list[float]) -> dict[str, float]:
    ordered = sorted(runs)
    return {"n": len(runs), "p50_ms": round(statistics.median(ordered), 3),
            "p95_ms": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 3),
            "max_ms": round(ordered[-1], 3)}


def key_presses(store: Store, flt: PairFilter, presses: int, action: str = "accept") -> dict[str, float]:
    """Time ``presses`` key presses the way the desk makes them: the pair on screen (claimed),
    its version, the matching count recounted (other reviewers act too: a carried count lagged)."""
    pair = next_pair(store, flt)
    runs = []
    for _ in range(presses):
        if pair is None:
            break
        start = time.perf_counter()
        step = desk.act(store, action, pair["id"], pair["version"], flt, "priority", "bench")
        runs.append((time.perf_counter() - start) * 1000)
        pair = step.shown if step.shown and step.shown["status"] == "pending" else None
    return percentiles(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--presses", type=int, default=200)
    parser.add_argument("--keep", default=None, help="Workspace folder to fill once and reuse (the 1M fill "
                        "takes 10-20 min here); a reused one has the previous run's decisions in it.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="visrl-bench-store-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp) / "w"
        reuse = (root / "visrl.db").is_file()
        store = Store.open(root)
        start = time.perf_counter()
        if not reuse:
            fill(store, args.pairs, args.items)
        fill_s = time.perf_counter() - start
        results = {name: timed(fn, args.repeat) for name, fn in cases(store, args.pairs).items()}
        presses = {
            "accept, no search": key_presses(store, PairFilter(viewer="bench"), args.presses),
            "accept, search 'triangle dot'": key_presses(
                store, PairFilter(search="triangle dot", viewer="bench"), args.presses),
            "accept, rare search 'okapi'": key_presses(store, PairFilter(search="okapi", viewer="bench"),
                                                       args.presses),
            "accept, dataset=side margin 0.7-0.9": key_presses(
                store, PairFilter(dataset="side", min_margin=0.7, max_margin=0.9, viewer="bench"), args.presses),
            "swap (stays on the pair), no search": key_presses(store, PairFilter(viewer="bench"), args.presses,
                                                               "swap"),
        }
        plan = store.db.execute(
            "EXPLAIN QUERY PLAN SELECT p.id FROM pairs p JOIN items i ON i.id = p.item_id "
            "WHERE p.status = 'pending' ORDER BY p.priority DESC, p.id ASC LIMIT 1").fetchall()
        db_mb = store.path.stat().st_size / 1e6
    width = max(len(name) for name in results)
    print(f"{args.pairs:,} pairs, {args.items:,} items; {'reused' if reuse else 'filled in'} {fill_s:.1f} s; "
          f"db {db_mb:.1f} MB")
    print(f"{'query':<{width}}  {'median ms':>9}  {'max ms':>8}")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['median_ms']:>9.2f}  {r['max_ms']:>8.2f}")
    print(f"{'key press (action + next pair + claim + progress)':<{width}}  {'p50 ms':>9}  {'p95 ms':>8}  n")
    for name, r in presses.items():
        print(f"{name:<{width}}  {r['p50_ms']:>9.2f}  {r['p95_ms']:>8.2f}  {r['n']}")
    out = {"pairs": args.pairs, "items": args.items, "repeat": args.repeat, "fill_s": round(fill_s, 2),
           "db_mb": round(db_mb, 1), "queries": results,
           "key_presses": presses, "presses": args.presses, "next_pair_plan": [row[-1] for row in plan],
           "machine": {"python": platform.python_version(), "platform": platform.platform()}}
    path = RESULTS if args.pairs == 100_000 else RESULTS.with_name(f"store-{args.pairs}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
