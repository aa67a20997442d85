"""The fault suite, slow cases: kill -9 at many points, concurrent writers, hostile imports.

    .venv/bin/python bench/bench_faults.py [--trials 5] [--only imports,generate,review,train]

Each case runs real processes in a throw-away workspace and checks that nothing committed was
lost or changed: ``PRAGMA integrity_check`` ok, row counts as expected, every action a process
reported as committed present, and the next run resuming without manual cleanup.

- ``imports``: every adversarial input of tests/test_faults.py plus full-size pixel bombs, each as
  ``visrl import`` in its own process: exit 1, one ``Error:`` line, no traceback, store and images
  unchanged; wall time and the process's peak RSS.
- ``generate``: kill -9 at a random point of a generate run (mid-batch), then resume; and two runs
  of one run key started together (one must be refused "already running").
- ``review``: kill -9 of a reviewer mid-stream (every accept it printed must be in the store);
  two reviewers x 200 pairs on the same pairs (every loser ConflictError, no lost update).
- ``train``: kill -9 inside a checkpoint save (after mkdir, after the weights, while writing
  trainer_state.json) of a tiny-model training run, then ``resume_from_checkpoint: auto``.

Prints a table and writes bench/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_faults import BAD_IMPORTS, _good, bomb_png, integrity_ok, snapshot, vqa, write_json  # noqa: E402

from visrl.store import Store  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "faults.json"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def python(script: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ---------------------------------------------------------------------- imports

RSS_WRAPPER = """
import atexit, resource, sys
atexit.register(lambda: print(f"MAXRSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr))
from visrl.cli import main
main(sys.argv[1:])
"""

EXTRA_IMPORTS: dict[str, tuple[Any, list[str], str]] = {
    "pixel bomb 20000x20000 (full data)": (
        lambda t: (t / "bomb.png").write_bytes(bomb_png(20000, 20000)) and write_json(t / "d.json", [vqa("bomb.png")]),
        [], "too large to decode"),
    "pixel bomb 13000x13000 (full data)": (
        lambda t: (t / "bomb.png").write_bytes(bomb_png(13000, 13000)) and write_json(t / "d.json", [vqa("bomb.png")]),
        [], "over the limit of 64,000,000"),
}


def bench_imports(tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for name, (build, args, fragment) in {**BAD_IMPORTS, **EXTRA_IMPORTS}.items():
        case = Path(tempfile.mkdtemp(dir=tmp))
        src = case / "src"
        src.mkdir()
        _good(src)
        store = Store.open(case / "ws")
        from visrl.formats import import_file

        import_file(store, write_json(src / "first.json", [vqa("ok.png")]), "vqa", dataset="first")
        before = snapshot(store)
        path = build(src)
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-c", RSS_WRAPPER, "import", str(path), "--format", "vqa",
                               "-w", str(case / "ws"), *args], env=ENV, capture_output=True, text=True)
        seconds = time.monotonic() - start
        err_lines = [line for line in proc.stderr.splitlines() if not line.startswith("MAXRSS_KB=")]
        rss = [int(line.split("=")[1]) for line in proc.stderr.splitlines() if line.startswith("MAXRSS_KB=")]
        ok = (proc.returncode == 1 and len(err_lines) == 1 and err_lines[0].startswith("Error: ")
              and fragment in err_lines[0] and "Traceback" not in proc.stderr
              and snapshot(store) == before and integrity_ok(store))
        rows.append({"case": f"import: {name}", "ok": ok, "seconds": round(seconds, 2),
                     "peak_rss_mb": round(rss[0] / 1024) if rss else None,
                     "detail": err_lines[0][:120] if err_lines else proc.stderr[-200:]})
    return rows


# ---------------------------------------------------------------------- generate

GENERATE = """
import sys; sys.path.insert(0, {tests!r})
import test_generate as t
from types import SimpleNamespace
from visrl.errors import JobError
t.gen._sampling = lambda a, b, c, n: SimpleNamespace(temperature=a, top_p=b, max_new_tokens=c, n=n)
try:
    r = t.run_generate({ws!r}, t.config(attempts=3, batch_size=2), reasoner=t.ScriptedReasoner(delay_s={delay}))
    print("done", r.rollouts, flush=True)
except JobError as exc:
    print("refused", exc, flush=True)
"""


def _generate_store(tmp: Path, n_items: int) -> tuple[Store, str]:
    from test_generate import add_items, config

    from visrl.generate import run_key_for

    store = Store.open(Path(tempfile.mkdtemp(dir=tmp)) / "ws")
    add_items(store, n_items)
    return store, run_key_for(config(attempts=3, batch_size=2))


def bench_generate_kill(tmp: Path, trials: int, rng: random.Random) -> list[dict[str, Any]]:
    from test_generate import ScriptedReasoner, config, keys

    from visrl.generate import run_generate

    rows = []
    for trial in range(trials):
        store, run_key = _generate_store(tmp, 10)
        proc = python(GENERATE.format(tests=str(ROOT / "tests"), ws=str(store.workspace.root), delay=0.3))
        deadline = time.monotonic() + 120
        target = rng.randrange(1, 5) * 12  # kill after 1..4 of 5 batches (2 items x 3 attempts x 2 kinds)
        while time.monotonic() < deadline and len(store.rollouts(run_key=run_key)) < target:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.25))  # somewhere inside the next batch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        before = keys(store, run_key)
        whole = len(before) % 6 == 0 and len(before) == len(set(before))
        integrity_before = integrity_ok(store)
        start = time.monotonic()
        report = run_generate(store.workspace, config(attempts=3, batch_size=2), reasoner=ScriptedReasoner())
        after = keys(store, run_key)
        ok = (whole and integrity_before and integrity_ok(store) and len(after) == len(set(after)) == 60
              and report.rollouts == 60 - len(before) and report.pairs_total == 10 and store.leases() == [])
        rows.append({"case": f"generate: kill -9 mid-batch #{trial + 1}", "ok": ok,
                     "seconds": round(time.monotonic() - start, 2),
                     "detail": f"{len(before)} rollouts before the kill, {report.rollouts} on resume, "
                               f"{len(after) - len(set(after))} duplicates"})
    return rows


def bench_generate_concurrent(tmp: Path, trials: int) -> list[dict[str, Any]]:
    from test_generate import keys

    rows = []
    for trial in range(trials):
        store, run_key = _generate_store(tmp, 6)
        script = GENERATE.format(tests=str(ROOT / "tests"), ws=str(store.workspace.root), delay=0.2)
        procs = [python(script) for _ in range(2)]
        outs = [p.communicate(timeout=300)[0].strip() for p in procs]
        stored = keys(store, run_key)
        kinds = sorted(o.split()[0] for o in outs if o)
        ok = (kinds == ["done", "refused"] and all("already running" in o for o in outs if o.startswith("refused"))
              and len(stored) == len(set(stored)) == 36 and integrity_ok(store))
        rows.append({"case": f"generate: 2 runs of one run key #{trial + 1}", "ok": ok, "seconds": None,
                     "detail": f"{kinds}; {len(stored)} rollouts, {len(stored) - len(set(stored))} duplicates"})
    return rows


# ---------------------------------------------------------------------- review

REVIEWER = """
import os, pathlib, sys, time
from visrl.errors import ConflictError
from visrl.review import accept, reject, get_pair
from visrl.store import Store
store = Store.open({ws!r})
action = {{"accept": accept, "reject": reject}}[{action!r}]
ready = pathlib.Path({ready!r})
(ready / str(os.getpid())).touch()
while len(list(ready.iterdir())) < {wait_for}:  # reviewers start together, to contend
    time.sleep(0.001)
for pair_id in {ids!r}:
    try:
        pair = get_pair(store, pair_id)
        if pair["status"] == "pending":
            action(store, pair_id, pair["version"], reviewer={name!r})
            print("ok", pair_id, flush=True)
    except ConflictError:
        print("conflict", pair_id, flush=True)
    except Exception as exc:
        print("error", pair_id, type(exc).__name__, str(exc).replace(" ", "_"), flush=True)
    time.sleep({pause})
"""


def _review_store(tmp: Path, n_pairs: int) -> tuple[Store, list[int]]:
    from visrl.formats import import_file

    case = Path(tempfile.mkdtemp(dir=tmp))
    _good(case)
    record = {"conversations": [{"from": "human", "value": "<image>Colour?"}],
              "chosen_step": {"from": "gpt", "value": "[0.1, 0.2, 0.5, 0.5]"},
              "rejected_step": {"from": "gpt", "value": "[0.6, 0.6, 0.9, 0.8]"}, "images": ["ok.png"]}
    records = [{**record, "id": str(i)} for i in range(n_pairs)]
    store = Store.open(case / "ws")
    import_file(store, write_json(case / "pairs.json", records), "sharegpt", dataset="pairs")
    return store, [r[0] for r in store.db.execute("SELECT id FROM pairs ORDER BY id").fetchall()]


def bench_review_kill(tmp: Path, trials: int, rng: random.Random) -> list[dict[str, Any]]:
    rows = []
    for trial in range(trials):
        store, ids = _review_store(tmp, 200)
        ready = Path(tempfile.mkdtemp(dir=tmp))
        proc = python(REVIEWER.format(ws=str(store.workspace.root), ids=ids, action="accept", name="a",
                                      pause=0.005, ready=str(ready), wait_for=1))
        target, deadline = rng.randrange(5, 150), time.monotonic() + 120
        while time.monotonic() < deadline and store.db.execute("SELECT count(*) FROM reviews").fetchone()[0] < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))  # somewhere inside the next actions
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        reported = {int(line.split()[1]) for line in out.splitlines() if line.startswith("ok")}
        accepted = {r[0] for r in store.db.execute("SELECT id FROM pairs WHERE status = 'accepted'")}
        reviews = store.db.execute("SELECT count(*) FROM reviews").fetchone()[0]
        # At most one action may have committed after its process printed nothing (killed between).
        ok = (reported <= accepted and len(accepted) - len(reported) <= 1 and reviews == len(accepted)
              and integrity_ok(store))
        rows.append({"case": f"review: kill -9 mid-stream #{trial + 1}", "ok": ok, "seconds": None,
                     "detail": f"{len(reported)} reported, {len(accepted)} committed, {reviews} reviews"})
    return rows


def bench_review_concurrent(tmp: Path, trials: int) -> list[dict[str, Any]]:
    rows = []
    for trial in range(trials):
        store, ids = _review_store(tmp, 200)
        ready = Path(tempfile.mkdtemp(dir=tmp))
        procs = [python(REVIEWER.format(ws=str(store.workspace.root), ids=ids, action=action, name=name, pause=0,
                                        ready=str(ready), wait_for=2))
                 for action, name in (("accept", "a"), ("reject", "b"))]
        outs = [p.communicate(timeout=600)[0].splitlines() for p in procs]
        lines = [line.split() for out in outs for line in out]
        wins = sum(1 for line in lines if line[0] == "ok")
        conflicts = sum(1 for line in lines if line[0] == "conflict")
        errors = [" ".join(line[2:])[:80] for line in lines if line[0] == "error"]
        versions = store.db.execute("SELECT sum(version - 1), count(*) FROM pairs WHERE status != 'pending'").fetchone()
        reviews = store.db.execute("SELECT count(*) FROM reviews").fetchone()[0]
        # No lost update: each pair decided once, by exactly one review, whose version moved once.
        ok = (wins == 200 and versions == (200, 200) and reviews == 200 and not errors and integrity_ok(store))
        rows.append({"case": f"review: 2 reviewers x 200 pairs #{trial + 1}", "ok": ok, "seconds": None,
                     "detail": f"{wins} decided, {conflicts} ConflictError, {len(errors)} other errors"
                               + (f" (first: {errors[0]})" if errors else "")})
    return rows


# ---------------------------------------------------------------------- train

TRAIN = """
import os, sys
sys.path.insert(0, {tests!r})
import torch; torch.set_num_threads(1)
import visrl.train.run as run
import test_train as t
from visrl.train.config import TrainConfig
run.stage_rows = lambda cfg, store, ws: t.stage2_rows(4)
run.to_dataset = t.to_dataset
KILL_AT, POINT = {kill_at}, {point!r}
if KILL_AT:
    import transformers
    from transformers import Trainer, TrainerState

    def killer(original, point):
        def wrapped(self, *args, **kwargs):
            step = self.global_step if isinstance(self, TrainerState) else self.state.global_step
            if step == KILL_AT and point == POINT:
                if point == "state":  # half of the JSON written, then killed
                    open(args[0], "w").write('{{"global_st')
                os.kill(os.getpid(), 9)
            return original(self, *args, **kwargs)
        return wrapped

    Trainer._save_optimizer_and_scheduler = killer(Trainer._save_optimizer_and_scheduler, "optimizer")
    Trainer._save_rng_state = killer(Trainer._save_rng_state, "rng")
    TrainerState.save_to_json = killer(TrainerState.save_to_json, "state")
    original_save_model = Trainer.save_model
    def save_model(self, output_dir=None, _internal_call=False):
        if _internal_call and self.state.global_step == KILL_AT and POINT == "mkdir":
            os.makedirs(output_dir, exist_ok=True)
            os.kill(os.getpid(), 9)
        return original_save_model(self, output_dir, _internal_call)
    Trainer.save_model = save_model
cfg = TrainConfig(stage="visrl", model_name_or_path={model!r}, output_dir="models/stage2", max_steps=4,
                  per_device_train_batch_size=2, save_steps=1, learning_rate=1e-3, lora_rank=4)
result = run.train({ws!r}, cfg)
print("finished", result.global_step, result.stopped, flush=True)
"""


def bench_train_kill(tmp: Path) -> list[dict[str, Any]]:
    from transformers.trainer_utils import get_last_checkpoint

    from visrl.tiny import build_tiny_model

    model = build_tiny_model(tmp / "tiny", preset="test", seed=0)
    rows = []
    for point in ("mkdir", "optimizer", "rng", "state"):
        ws = Path(tempfile.mkdtemp(dir=tmp)) / "ws"
        Store.open(ws)
        args = {"tests": str(ROOT / "tests"), "model": str(model), "ws": str(ws)}
        killed = python(TRAIN.format(kill_at=2, point=point, **args))
        killed.communicate(timeout=600)
        out_dir = ws / "models" / "stage2"
        broken = out_dir / "checkpoint-2"
        left = [p.name for p in broken.iterdir()] if broken.is_dir() else []
        # What HF Trainer's own choice would be (the newest folder, complete or not).
        hf_pick = Path(get_last_checkpoint(str(out_dir)) or "none").name
        start = time.monotonic()
        resumed = python(TRAIN.format(kill_at=0, point="", **args))
        out, err = resumed.communicate(timeout=600)
        store = Store.open(ws)
        state = json.loads((ws / "models" / "stage2" / "checkpoint-4" / "trainer_state.json").read_text()) \
            if (ws / "models" / "stage2" / "checkpoint-4" / "trainer_state.json").is_file() else {}
        last = (out.strip().splitlines() or err.strip().splitlines() or [""])[-1]
        ok = (killed.returncode == -9 and last == "finished 4 False" and state.get("global_step") == 4
              and integrity_ok(store) and store.leases() == [])
        rows.append({"case": f"train: kill -9 mid-save ({point}) then resume auto", "ok": ok,
                     "seconds": round(time.monotonic() - start, 1),
                     "detail": f"checkpoint-2 held {len(left)} files (trainer_state.json: "
                               f"{'trainer_state.json' in left}); HF would pick {hf_pick}; resume: {last[:100]}"})
    return rows


# ---------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="Trials of each kill / race case.")
    parser.add_argument("--only", default="imports,generate,review,train", help="Comma-separated groups.")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    groups = set(args.only.split(","))
    rng = random.Random(args.seed)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "imports" in groups:
            rows += bench_imports(tmp)
        if "generate" in groups:
            rows += bench_generate_kill(tmp, args.trials, rng) + bench_generate_concurrent(tmp, max(1, args.trials // 2))
        if "review" in groups:
            rows += bench_review_kill(tmp, args.trials, rng) + bench_review_concurrent(tmp, max(1, args.trials // 2))
        if "train" in groups:
            rows += bench_train_kill(tmp)
    width = max(len(r["case"]) for r in rows)
    print(f"{'case':<{width}}  ok    s      RSS MB  detail")
    for r in rows:
        seconds = "" if r.get("seconds") is None else f"{r['seconds']:.2f}"
        rss = "" if r.get("peak_rss_mb") is None else str(r["peak_rss_mb"])
        print(f"{r['case']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {seconds:>6}  {rss:>6}  {r['detail']}")
    passed = sum(r["ok"] for r in rows)
    print(f"{passed} of {len(rows)} cases ok")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(),
                                   "cpus": os.cpu_count(), "trials": args.trials, "passed": passed,
                                   "cases": rows}, indent=2))
    print(f"wrote {RESULTS}")
    sys.exit(0 if passed == len(rows) else 1)


if __name__ == "__main__":
    main()
