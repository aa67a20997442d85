"""The fault suite, fast cases: hostile or careless inputs and killed processes lose nothing.

Every bad import is one ``Error:`` line naming the file, record and what to fix, and leaves the
store (rows, image files, ``PRAGMA integrity_check``) exactly as it was. Images are placed by
content and copied. One generate run per run key and one training run per output folder hold a
lease in the store; a killed owner's lease is taken over. Resume skips a checkpoint whose save
was killed. ``visrl stats`` shows a job whose process died as dead. The slow cases (kill -9 of
real generate, train and review processes, concurrent writers) are in bench/bench_faults.py.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from visrl.cli import main
from visrl.errors import DataError, JobError
from visrl.formats import import_file
from visrl.generate import run_generate, run_key_for
from visrl.store import Store

sys.path.insert(0, str(Path(__file__).parent))
from test_generate import ScriptedReasoner, add_items, config, keys, start_slow_generate  # noqa: E402


def save_png(path: Path, size: tuple[int, int] = (64, 48), colour: Any = (30, 120, 200)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, compress_level=0)  # byte size set by the size alone
    return path


def vqa(image: str, **extra: Any) -> dict[str, Any]:
    return {"image": image, "question": "What colour is it?", "answer": "blue", **extra}


def write_json(path: Path, records: Any) -> Path:
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def snapshot(store: Store) -> tuple[Any, ...]:
    """Row counts of every table, the image files with their bytes, and the integrity check."""
    db = store.db
    tables = sorted(t for t in db.table_names() if not t.startswith("_"))
    counts = tuple((t, db[t].count) for t in tables)
    files = tuple(sorted((p.relative_to(store.workspace.root).as_posix(),
                          p.read_bytes() if p.is_file() else None)
                         for p in store.workspace.images_dir.rglob("*")))
    return counts, files


def integrity_ok(store: Store) -> bool:
    return store.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int, rows: int | None = None) -> bytes:
    """A grayscale PNG of ``width`` x ``height`` zeros: a few hundred KB that decode to w*h bytes.
    ``rows`` < height writes only that many rows (the header still claims the full size)."""
    compressor = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", data + compressor.flush()) + png_chunk(b"IEND", b""))


# ---------------------------------------------------------------------- images by content

def test_same_name_and_size_other_pixels_get_their_own_image(store: Store, tmp_path: Path) -> None:
    """Two datasets' a.png of the same byte size but other pixels: each item sees its own pixels."""
    red = save_png(tmp_path / "one" / "a.png", colour=(255, 0, 0))
    blue = save_png(tmp_path / "two" / "a.png", colour=(0, 0, 255))
    assert red.stat().st_size == blue.stat().st_size
    import_file(store, write_json(tmp_path / "one" / "d.json", [vqa("a.png")]), "vqa", dataset="one")
    import_file(store, write_json(tmp_path / "two" / "d.json", [vqa("a.png")]), "vqa", dataset="two")
    for name, colour in (("one", (255, 0, 0)), ("two", (0, 0, 255))):
        [item] = store.items(name)
        with Image.open(store.workspace.absolute(item["image"])) as image:
            assert image.convert("RGB").getpixel((5, 5)) == colour
    # The same bytes imported twice into one dataset are stored once.
    summary = import_file(store, write_json(tmp_path / "one" / "e.json", [vqa("a.png", id="x")]),
                          "vqa", dataset="one", split="val")
    assert summary["images"] == 0
    assert store.items("one", "val")[0]["image"] == store.items("one", "train")[0]["image"]


def test_images_are_copied_not_linked(store: Store, tmp_path: Path) -> None:
    source = save_png(tmp_path / "a.png", colour=(0, 200, 0))
    import_file(store, write_json(tmp_path / "d.json", [vqa("a.png")]), "vqa")
    placed = store.workspace.absolute(store.items()[0]["image"])
    before = placed.read_bytes()
    assert not placed.samefile(source) and placed.stat().st_nlink == 1
    save_png(source, colour=(9, 9, 9))  # the user edits the source afterwards, in place
    with source.open("r+b") as f:  # also in place through the same inode
        f.seek(0)
        f.write(b"garbage!")
    assert placed.read_bytes() == before


def test_a_workspace_image_changed_on_disk_is_not_reused(store: Store, tmp_path: Path) -> None:
    save_png(tmp_path / "a.png")
    import_file(store, write_json(tmp_path / "d.json", [vqa("a.png")]), "vqa", dataset="one")
    placed = store.workspace.absolute(store.items()[0]["image"])
    placed.write_bytes(b"tampered")
    before = snapshot(store)
    with pytest.raises(DataError, match="already exists in the workspace with other content"):
        import_file(store, write_json(tmp_path / "e.json", [vqa("a.png")]), "vqa", dataset="one", split="v")
    assert snapshot(store) == before


# ---------------------------------------------------------------------- adversarial imports

def _text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _good(tmp: Path) -> Path:
    save_png(tmp / "ok.png")
    return tmp / "ok.png"


def _deep(depth: int) -> str:
    return json.dumps([vqa("ok.png")])[:-2] + ', "answers": ' + "[" * depth + "]" * depth + "}]"


def _loop(tmp: Path) -> str:
    os.symlink(tmp / "loop_b.png", tmp / "loop_a.png")
    os.symlink(tmp / "loop_a.png", tmp / "loop_b.png")
    return "loop_a.png"


# name -> (build(tmp) -> the file to import, extra CLI args, fragment of the one error line)
BAD_IMPORTS: dict[str, tuple[Any, list[str], str]] = {
    "utf-16 file": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")]), "utf-16"), [],
                    "the file is UTF-16, not UTF-8; save it as UTF-8"),
    "latin-1 file": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png", answer="bleu é")],
                                                              ensure_ascii=False), "latin-1"), [],
                     "not UTF-8 (byte 0xe9 at line 1)"),
    "deep nesting (parser)": (lambda t: _text(t / "d.json", _deep(100_000)), [],
                              "nested deeper than 32 levels"),
    "deep nesting (record)": (lambda t: _text(t / "d.json", _deep(40)), [],
                              "record 0, field 'answers': nested deeper than 32 levels"),
    "10^400 as id": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")])[:-2] + ', "id": 1'
                                     + "0" * 400 + "}]"), [],
                     "record 0, field 'id': the number 1000"),
    "10^400 in a box": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")])[:-2]
                                        + ', "box": [1, 2, 1' + "0" * 400 + ', 4]}]'), [],
                        "record 0, field 'box': the number"),
    "1e400 in a box": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")])[:-2]
                                       + ', "box": [1, 2, 1e400, 4]}]'), [],
                       "record 0, field 'box': box [1, 2, inf, 4] holds a NaN or infinite number"),
    "NaN as the answer": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")])[:-2]
                                          .replace('"blue"', "NaN") + "}]"), [],
                          "record 0, field 'answer': must be a non-empty string, got nan"),
    "symlink loop": (lambda t: write_json(t / "d.json", [vqa(_loop(t))]), [],
                     "record 0, field 'image': 'loop_a.png' is a symlink loop"),
    "NUL in the image path": (lambda t: write_json(t / "d.json", [vqa("ok\0.png")]), [],
                              "record 0, field 'image': 'ok\\x00.png' is not a usable path"),
    "overlong image name": (lambda t: write_json(t / "d.json", [vqa("x" * 300 + ".png")]), [],
                            "is not a usable path (File name too long)"),
    "overlong image path": (lambda t: write_json(t / "d.json", [vqa("d/" * 3000 + "x.png")]), [],
                            "is not a usable path (File name too long)"),
    "lone surrogate": (lambda t: _text(t / "d.json", json.dumps([vqa("ok.png")])[:-2]
                                       + ', "question": "why \\ud800?"}]'), [],
                       "record 0, field 'question': holds a lone UTF-16 surrogate"),
    "lone surrogate in a key": (lambda t: _text(t / "d.json", '[{"\\udc00": 1}]'), [],
                                "record 0, field '(record)': a key holds a lone UTF-16 surrogate"),
    "pixel bomb 20000x20000": (lambda t: (t / "bomb.png").write_bytes(bomb_png(20000, 20000, rows=8))
                               and write_json(t / "d.json", [vqa("bomb.png")]), [],
                               "record 0, field 'image': 'bomb.png' is too large to decode"),
    "pixel bomb 9000x9000": (lambda t: (t / "bomb.png").write_bytes(bomb_png(9000, 9000))
                             and write_json(t / "d.json", [vqa("bomb.png")]), [],
                             "'bomb.png' is 9000x9000 pixels, over the limit of 64,000,000"),
    "truncated png": (lambda t: (t / "cut.png").write_bytes(_good(t).read_bytes()[:-40])
                      and write_json(t / "d.json", [vqa("ok.png"), vqa("cut.png", id="b")]), [],
                      "record 1, field 'image': 'cut.png' is not a readable image"),
    "not an image": (lambda t: (t / "x.png").write_text("hello")
                     and write_json(t / "d.json", [vqa("x.png")]), [],
                     "'x.png' is not a readable image (unknown format)"),
    "dataset ..": (lambda t: write_json(t / "d.json", [vqa("ok.png")]), ["--dataset", ".."],
                   "dataset name '..' may only hold"),
    "dataset .": (lambda t: write_json(t / "d.json", [vqa("ok.png")]), ["--dataset", "."],
                  "dataset name '.' may only hold"),
    "dataset with a slash": (lambda t: write_json(t / "d.json", [vqa("ok.png")]), ["--dataset", "../x"],
                             "dataset name '../x' may only hold"),
    "hidden file stem": (lambda t: write_json(t / ".d.json", [vqa("ok.png")]), [],
                         "dataset name '.d' may only hold"),
}


@pytest.mark.parametrize("name", list(BAD_IMPORTS))
def test_bad_import_is_one_error_line_and_changes_nothing(name: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    build, args, fragment = BAD_IMPORTS[name]
    src = tmp_path / "src"
    src.mkdir()
    _good(src)
    ws = tmp_path / "workspace"
    store = Store.open(ws)
    # Something committed before, which the failed import must leave as it is.
    import_file(store, write_json(src / "first.json", [vqa("ok.png")]), "vqa", dataset="first")
    before = snapshot(store)
    path = build(src)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["import", str(path), "--format", "vqa", "-w", str(ws), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert len(err) < 600  # a huge value is never echoed in full
    assert snapshot(store) == before and integrity_ok(store)


def test_utf8_bom_is_accepted(store: Store, tmp_path: Path) -> None:
    _good(tmp_path)
    path = tmp_path / "d.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([vqa("ok.png")]).encode())
    assert import_file(store, path, "vqa")["items"] == 1


def test_a_failed_import_keeps_an_image_another_import_committed(store: Store, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A copies a.png, B (same dataset, other split) reuses that copy and commits, then A fails on
    its next image: A's undo must leave a.png, which B's item now uses."""
    import visrl.formats.images as images

    save_png(tmp_path / "a.png")
    save_png(tmp_path / "b.png", colour=(1, 2, 3))
    first = write_json(tmp_path / "first.json", [vqa("a.png"), vqa("b.png", id="b")])
    second = write_json(tmp_path / "second.json", [vqa("a.png")])
    real_copy = images._copy_hashed

    def copy_then_interleave(source: Path, dest: Path) -> str:
        if source.name == "b.png":
            monkeypatch.setattr(images, "_copy_hashed", real_copy)
            import_file(Store(store.workspace), second, "vqa", dataset="d", split="val")  # B commits
            raise OSError(28, "No space left on device")
        return real_copy(source, dest)

    monkeypatch.setattr(images, "_copy_hashed", copy_then_interleave)
    with pytest.raises(OSError, match="No space left"):
        import_file(store, first, "vqa", dataset="d")
    [item] = store.items("d")
    assert item["split"] == "val" and store.workspace.absolute(item["image"]).is_file()
    assert [p.name.split("-")[0] for p in (store.workspace.images_dir / "d").iterdir()] == ["a"]


def test_concurrent_imports_of_one_dataset_and_another(tmp_path: Path) -> None:
    """Three importers start together: two of one file into one dataset (one wins, the other is
    told it was imported already, as one Error line), one into a dataset of its own."""
    src = tmp_path / "src"
    for i in range(20):
        save_png(src / f"{i}.png", colour=(i * 10, 0, 0))
    path = write_json(src / "d.json", [vqa(f"{i}.png", id=str(i)) for i in range(20)])
    ws, ready = tmp_path / "ws", tmp_path / "ready"
    ready.mkdir()
    Store.open(ws)
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time
        from visrl.cli import main
        ready = pathlib.Path({str(ready)!r})
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < 3:
            time.sleep(0.001)
        main(["import", {str(path)!r}, "-w", {str(ws)!r}, "--dataset", sys.argv[1]])
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", script, name], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env)
             for name in ("same", "same", "other")]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    errors = [err for code, _, err in results if code]
    assert codes == [0, 0, 1], results
    assert errors[0].startswith("Error: d.json: record 0 (id '0') is already in dataset 'same'")
    assert errors[0].count("\n") == 1
    store = Store.open(ws)
    assert [(d, store.db.execute("SELECT count(*) FROM items i JOIN datasets s ON s.id = i.dataset_id "
                                 "WHERE s.name = ?", [d]).fetchone()[0]) for d in ("same", "other")] \
        == [("same", 20), ("other", 20)]
    assert all(store.workspace.absolute(item["image"]).is_file() for item in store.items())
    assert integrity_ok(store)


# ---------------------------------------------------------------------- run leases

def test_leases_table_columns(store: Store) -> None:
    assert store.db["leases"].columns_dict == {"key": str, "pid": int, "host": str, "proc_start": float,
                                               "started_at": str, "job_id": int}
    assert store.db["leases"].pks == ["key"]


def test_second_generate_of_a_run_key_is_refused(store: Store) -> None:
    add_items(store, 2)
    cfg = config()
    key = f"generate:{run_key_for(cfg)}"
    with store.acquire_lease(key):
        held = store.leases()[0]
        assert (held["key"], held["pid"]) == (key, os.getpid())
        before = snapshot(store)
        with pytest.raises(JobError, match=rf"{key} is already running \(pid {os.getpid()}, since "):
            run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
        assert snapshot(store) == before  # refused before a single rollout
    assert store.leases() == []  # released on exit
    report = run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
    assert report.rollouts == 2 * 2 * 2 and store.leases() == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_dead_owners_lease_is_taken_over(store: Store) -> None:
    pid = _dead_pid()
    with store.db.conn:
        store.db.execute("INSERT INTO leases (key, pid, host, proc_start, started_at) "
                         "VALUES ('k', ?, ?, 1.0, 'then')", [pid, __import__("socket").gethostname()])
    with store.acquire_lease("k"):
        assert store.leases()[0]["pid"] == os.getpid()
    assert store.leases() == []


def test_a_recycled_pid_does_not_keep_a_lease(store: Store) -> None:
    """The row's pid is alive (ours) but started at another time: it is not the owner."""
    with store.db.conn:
        store.db.execute("INSERT INTO leases (key, pid, host, proc_start, started_at) "
                         "VALUES ('k', ?, ?, 1.0, 'then')", [os.getpid(), __import__("socket").gethostname()])
    with store.acquire_lease("k"):
        assert store.leases()[0]["proc_start"] != 1.0


def test_another_hosts_lease_is_respected(store: Store) -> None:
    with store.db.conn:
        store.db.execute("INSERT INTO leases (key, pid, host, proc_start, started_at) "
                         "VALUES ('k', 1, 'elsewhere', 1.0, 'then')")
    with pytest.raises(JobError, match=r"k is already running \(pid 1 on elsewhere, since then\)"):
        store.acquire_lease("k")
    store.release_lease("k")  # not ours: left alone
    assert store.leases()[0]["host"] == "elsewhere"


def test_only_one_of_many_racing_processes_gets_the_lease(store: Store, tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    ready.mkdir()
    script = textwrap.dedent(f"""
        import os, pathlib, sys, time
        from visrl.store import Store
        from visrl.errors import JobError
        store = Store.open({str(store.workspace.root)!r})
        ready = pathlib.Path({str(ready)!r})
        (ready / str(os.getpid())).touch()
        while len(list(ready.iterdir())) < 3:  # all three race at once
            time.sleep(0.001)
        try:
            with store.acquire_lease("race"):
                print("won", flush=True)
                time.sleep(1.5)  # longer than the losers take to look
        except JobError as exc:
            print("lost", exc, flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert sorted(o.split()[0] for o in outputs) == ["lost", "lost", "won"], outputs
    assert all("already running" in o for o in outputs if o.startswith("lost"))
    assert store.leases() == []


def test_killed_generate_leaves_a_lease_that_the_resume_takes_over(tmp_path: Path, store: Store) -> None:
    """kill -9 mid-batch: the dead run's lease stays; the next run takes it over and resumes
    exactly (no duplicate rollouts, whole attempts only) with no manual cleanup."""
    add_items(store, 6)
    proc, run_key = start_slow_generate(store)
    # While it runs, a second run of the same key is refused.
    with pytest.raises(JobError, match=rf"already running \(pid {proc.pid}, since"):
        run_generate(store.workspace, config(attempts=2, batch_size=1), reasoner=ScriptedReasoner())
    os.kill(proc.pid, 9)
    proc.wait()
    assert [lease["pid"] for lease in store.leases()] == [proc.pid]
    before = len(store.rollouts(run_key=run_key))
    report = run_generate(store.workspace, config(attempts=2, batch_size=1), reasoner=ScriptedReasoner())
    stored = keys(store, run_key)
    assert len(stored) == len(set(stored)) == 24 and report.rollouts == 24 - before
    assert store.leases() == [] and integrity_ok(store)


@pytest.mark.slow  # imports transformers and trl (~9 s here); the lease check itself is instant
def test_second_training_run_of_an_output_folder_is_refused(store: Store, tmp_path: Path) -> None:
    from visrl.train.config import TrainConfig
    from visrl.train.run import train

    cfg = TrainConfig(stage="sft", model_name_or_path=str(tmp_path / "no-model"), dataset="toy",
                      output_dir="runs/sft-a")
    key = f"train:{(store.workspace.root / 'runs/sft-a').resolve()}"
    with store.acquire_lease(key), pytest.raises(JobError, match="already running"):
        train(store.workspace, cfg)


# ---------------------------------------------------------------------- checkpoints

def _checkpoint(folder: Path, step: int, state: str | None) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    if state is not None:
        (path / "trainer_state.json").write_text(state)
    return path


def test_resume_skips_checkpoints_whose_save_was_killed(tmp_path: Path) -> None:
    from visrl.train.config import TrainConfig
    from visrl.train.run import last_complete_checkpoint, resume_checkpoint

    out = tmp_path / "out"
    assert last_complete_checkpoint(out) is None
    _checkpoint(out, 2, json.dumps({"global_step": 2}))
    good = _checkpoint(out, 10, json.dumps({"global_step": 10}))
    _checkpoint(out, 12, None)  # killed before trainer_state.json
    _checkpoint(out, 14, '{"global_st')  # killed while writing it
    (out / "checkpoint-16").mkdir()  # killed right after mkdir
    (out / "checkpoint-x").mkdir()
    assert last_complete_checkpoint(out) == str(good)
    cfg = TrainConfig(stage="sft", model_name_or_path="m", dataset="toy", output_dir=str(out),
                      resume_from_checkpoint="auto")
    assert resume_checkpoint(cfg, out, tmp_path) == str(good)
    assert sorted(p.name for p in out.iterdir())[-1] == "checkpoint-x"  # nothing deleted


class KilledMidSave(BaseException):
    """Stands for kill -9 inside a checkpoint save: the files on disk are what a kill leaves."""


@pytest.mark.slow
def test_training_killed_while_writing_trainer_state_resumes_from_the_last_complete_one(
        store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Save of checkpoint-2 dies half-way through trainer_state.json (weights, optimizer and RNG
    state already written); ``resume_from_checkpoint: auto`` continues from checkpoint-1 and
    finishes. bench/bench_faults.py does this with a real kill -9 at four points of the save."""
    import torch
    from test_train import stage2_rows, to_dataset
    from transformers import TrainerState
    from transformers.trainer_utils import get_last_checkpoint

    import visrl.train.run as run
    from visrl.tiny import build_tiny_model
    from visrl.train.config import TrainConfig

    torch.set_num_threads(1)
    model = build_tiny_model(tmp_path / "tiny", preset="test", seed=0)
    monkeypatch.setattr(run, "stage_rows", lambda cfg, store, ws, **_: stage2_rows(4))
    monkeypatch.setattr(run, "to_dataset", to_dataset)
    real_save = TrainerState.save_to_json

    def dies_at_step_2(self: Any, json_path: str) -> None:
        if self.global_step == 2:
            Path(json_path).write_text('{"global_st')
            raise KilledMidSave
        real_save(self, json_path)

    cfg = TrainConfig(stage="visrl", model_name_or_path=str(model), output_dir="models/s2", max_steps=3,
                      per_device_train_batch_size=2, save_steps=1, learning_rate=1e-3, lora_rank=4)
    monkeypatch.setattr(TrainerState, "save_to_json", dies_at_step_2)
    with pytest.raises(KilledMidSave):
        run.train(store.workspace, cfg)
    monkeypatch.setattr(TrainerState, "save_to_json", real_save)
    out = store.workspace.models_dir / "s2"
    assert Path(get_last_checkpoint(str(out))).name == "checkpoint-2"  # what HF alone would pick
    assert Path(run.last_complete_checkpoint(out)).name == "checkpoint-1"
    result = run.train(store.workspace, cfg)
    assert result.global_step == 3 and not result.stopped
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and integrity_ok(store) and store.leases() == []


# ---------------------------------------------------------------------- dead jobs in stats

def test_stats_shows_a_dead_job_as_dead_with_its_log_tail(store: Store, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    job_id = store.create_job("train", {})
    log = store.workspace.run_dir(job_id) / "log.txt"
    log.write_text("step 1\nstep 2\nRuntimeError: CUDA out of memory\n")
    store.update_job(job_id, status="running", pid=_dead_pid(), log_path=str(log),
                     started_at=store.job(job_id)["created_at"])
    main(["stats", "-w", str(store.workspace.root)])
    out = capsys.readouterr().out
    assert f"job {job_id} (train) died (process gone; was marked running)" in out, out
    assert "| RuntimeError: CUDA out of memory" in out
    assert "jobs: failed 1" in out and store.job(job_id)["status"] == "failed"
