from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ScriptedTwoStep
from PIL import Image

from visrl import generate as gen
from visrl.boxes import Box, format_box, iou, parse_box
from visrl.config import load_config
from visrl.contract import TwoStepContract
from visrl.errors import ConfigError
from visrl.generate import GenerateConfig, judge_rollouts, run_generate, run_key_for
from visrl.judges import make_judges
from visrl.progress import Progress
from visrl.prompts import BOX_PROMPT
from visrl.review import PairFilter, count_pairs
from visrl.store import Store, box_from_json

SIZE = (120, 90)
GT = Box(10, 10, 40, 40)  # every item's object; the fake answers right only when its box hits it
FAR = Box(80, 50, 110, 80)  # never overlaps GT


class ScriptedReasoner(ScriptedTwoStep):
    """A scripted two-step policy (the prompts, parsing, random boxes and crops are the production
    ones, the contract's); box steps are scripted per batch, to count and delay them.

    ``boxes(question, attempt_index)`` gives the two texts of one box prompt; an answer is right
    ("7") when the box text the answer prompt carries names a box overlapping the object
    (IoU > 0.5), else "3".
    """

    def __init__(self, boxes: Any = None, progress: Progress | None = None, stop_after: int | None = None,
                 delay_s: float = 0.0, contract: TwoStepContract | None = None) -> None:
        super().__init__(contract)
        self.boxes = boxes or (lambda q, i: [self.contract.format(GT, SIZE), self.contract.format(FAR, SIZE)])
        self.progress, self.stop_after, self.delay_s = progress, stop_after, delay_s
        self.box_calls: list[int] = []
        self.answer_calls: list[int] = []
        self.samplings: list[Any] = []
        self.crops: list[Image.Image] = []

    def generate(self, conversations: list, sampling: Any, progress: bool = False) -> list[list[str]]:
        self.samplings.append(sampling)
        if self.is_box_step(conversations[0]):
            return self._boxes(conversations, sampling)
        self.answer_calls.append(len(conversations))
        return super().generate(conversations, sampling)

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        """The answer step: right when the box text it carries names a box on the object."""
        self.crops.append(self.crop_image(conversation))
        box = self.parse(self.box_text(conversation), self.full_image(conversation))
        return ["7" if iou(box, GT) > 0.5 else "3"] * sampling.n

    def _boxes(self, conversations: list, sampling: Any) -> list[list[str]]:
        assert sampling.n == 2
        self.box_calls.append(len(conversations))
        if self.stop_after is not None and len(self.box_calls) >= self.stop_after and self.progress:
            self.progress.stop_requested = True  # as SIGTERM would, while a batch is in flight
        time.sleep(self.delay_s)
        questions = [c[0]["content"][1]["text"].removesuffix(" " + BOX_PROMPT) for c in conversations]
        return [self.boxes(q, i) for i, q in enumerate(questions)]


def add_items(store: Store, n: int, name: str = "toy", with_box: bool = True) -> list[int]:
    ws = store.workspace
    dataset_id = store.add_dataset(name, "test")
    rows = []
    for i in range(n):
        path = ws.images_dir / f"{name}-{i}.png"
        Image.new("RGB", SIZE, (i * 20 % 255, 100, 100)).save(path)
        rows.append({"split": "train", "source_id": str(i), "image": ws.relative(path), "width": SIZE[0],
                     "height": SIZE[1], "question": f"What digit is on object {i}?", "answer": "7",
                     "gt_box": GT if with_box else None})
    return store.add_items(dataset_id, rows)


def config(**kw: Any) -> GenerateConfig:
    return GenerateConfig(**{"model_name_or_path": "fake", "dataset": "toy", "attempts": 2,
                             "batch_size": 2, **kw})


def keys(store: Store, run_key: str) -> list[tuple[int, int, str]]:
    return [(r["item_id"], r["attempt"], r["kind"]) for r in store.rollouts(run_key=run_key)]


def test_generate_end_to_end(store: Store) -> None:
    ids = add_items(store, 3)
    policy = ScriptedReasoner()
    report = run_generate(store.workspace, config(temperature=2.0), reasoner=policy)
    assert (report.items, report.items_generated, report.rollouts, report.failed) == (3, 3, 12, 0)
    assert report.parse_rate == 1.0 and report.pairs == 3 and report.pairs_total == 3
    assert policy.box_calls == [4, 2]  # batches of 2 items x 2 attempts, then 1 item x 2
    assert policy.samplings[0].temperature == 2.0 and policy.samplings[1].temperature == 0.0
    rows = store.rollouts(run_key=report.run_key)
    assert Counter(r["kind"] for r in rows) == {"policy": 6, "negative": 6}
    for r in rows:
        good = r["kind"] == "policy"
        assert r["answer"] == ("7" if good else "3")
        assert r["answer_score"] == (1.0 if good else 0.0)
        assert r["crop_score"] == pytest.approx(1.0 if good else 0.0, abs=0.02)
        assert r["iou"] == r["crop_score"] and r["model"] == "fake" and r["item_id"] in ids
        assert set(json.loads(r["scores"])) == {"answer:auto@0.5,0.05", "crop:iou"}
    assert count_pairs(store, PairFilter(status="pending")) == 3


def test_failed_parses_are_rollouts_not_crashes(store: Store) -> None:
    add_items(store, 2)
    texts = iter([["I cannot tell", format_box(FAR, "viscot", SIZE)], ["[nan, 1, 2]", "box: none"]] * 2)
    report = run_generate(store.workspace, config(attempts=1),
                          reasoner=ScriptedReasoner(boxes=lambda q, i: next(texts)))
    rows = store.rollouts(run_key=report.run_key)
    assert len(rows) == 4 and report.failed == 3 and report.parse_rate == 0.25
    failed = [r for r in rows if r["box"] is None]
    assert [(r["kind"], r["answer"], r["answer_score"], r["crop_score"]) for r in failed] == [
        ("policy", None, 0.0, 0.0), ("policy", None, 0.0, 0.0), ("negative", None, 0.0, 0.0)]
    # With no policy box there is nothing to avoid: the second sample stays the negative.
    assert [r["kind"] for r in rows] == ["policy", "negative", "policy", "negative"]
    assert report.pairs == 0


def test_overlapping_or_unparseable_second_sample_becomes_random_box(store: Store) -> None:
    add_items(store, 2)
    first = format_box(GT, "viscot", SIZE)
    near = format_box(Box(12, 12, 42, 42), "viscot", SIZE)  # IoU with GT ~0.78 > 0.05
    texts = iter([[first, near], [first, "no box"]])
    report = run_generate(store.workspace, config(attempts=1, run_key="r1"),
                          reasoner=ScriptedReasoner(boxes=lambda q, i: next(texts)))
    negatives = [r for r in store.rollouts(run_key="r1") if r["kind"] != "policy"]
    assert [r["kind"] for r in negatives] == ["random", "random"]
    for r in negatives:
        box = box_from_json(r["box"])
        assert iou(box, GT) == 0.0
        assert 0.7 * GT.width - 1 <= box.width <= 1.3 * GT.width + 1
        assert 0.7 * GT.height - 1 <= box.height <= 1.3 * GT.height + 1
        assert parse_box(r["box_text"], "viscot", SIZE) is not None and r["answer"] == "3"
    # The random box is a pure function of (seed, item, attempt): a second run draws the same.
    texts = iter([[first, near], [first, "no box"]])
    run_generate(store.workspace, config(attempts=1, run_key="r2"),
                 reasoner=ScriptedReasoner(boxes=lambda q, i: next(texts)))
    again = [r["box"] for r in store.rollouts(run_key="r2") if r["kind"] != "policy"]
    assert again == [r["box"] for r in negatives]
    assert report.parse_rate == 0.75


def test_stop_and_resume_gives_one_set_per_attempt(store: Store) -> None:
    add_items(store, 5)
    cfg = config(attempts=3, batch_size=2)
    progress = Progress(bar=False)
    policy = ScriptedReasoner(progress=progress, stop_after=1)
    first = run_generate(store.workspace, cfg, progress=progress, reasoner=policy)
    assert first.stopped and first.items_generated == 2 and first.rollouts == 12
    assert policy.box_calls == [6]  # the batch in flight finished and was saved
    resumed = ScriptedReasoner()
    second = run_generate(store.workspace, cfg, progress=Progress(bar=False), reasoner=resumed)
    assert (second.items_done_before, second.items_generated, second.rollouts) == (2, 3, 18)
    assert resumed.box_calls == [6, 3] and not second.stopped
    stored = keys(store, first.run_key)
    assert len(stored) == len(set(stored)) == 5 * 3 * 2
    third = run_generate(store.workspace, cfg, reasoner=None)  # nothing left: no model is loaded
    assert third.rollouts == 0 and third.items_done_before == 5 and third.pairs_total == 5


def start_slow_generate(store: Store) -> tuple[subprocess.Popen, str]:
    """A ``config(attempts=2, batch_size=1)`` generate in another process, 0.3 s per reasoner
    call; returns once its first item (4 rollouts) is stored, with the process and its run key."""
    script = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_generate as t
        from types import SimpleNamespace
        t.gen._sampling = lambda a, b, c, n: SimpleNamespace(temperature=a, top_p=b, max_new_tokens=c, n=n)
        t.run_generate({str(store.workspace.root)!r}, t.config(attempts=2, batch_size=1),
                       reasoner=t.ScriptedReasoner(delay_s=0.3))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    run_key = run_key_for(config(attempts=2, batch_size=1))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(store.rollouts(run_key=run_key)) < 4:
        time.sleep(0.05)
    return proc, run_key


def test_killed_process_resumes_exactly(tmp_path: Path, store: Store) -> None:
    add_items(store, 6)
    proc, run_key = start_slow_generate(store)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(store.rollouts(run_key=run_key))
    assert 4 <= before < 24 and before % 4 == 0  # whole items only: attempts land atomically
    report = run_generate(store.workspace, config(attempts=2, batch_size=1), reasoner=ScriptedReasoner())
    stored = keys(store, run_key)
    assert len(stored) == len(set(stored)) == 24
    assert report.rollouts == 24 - before and report.pairs_total == 6


def test_rejudging_with_another_judge_uses_cache(store: Store) -> None:
    add_items(store, 2)
    report = run_generate(store.workspace, config(attempts=1), reasoner=ScriptedReasoner())
    answer, crop = make_judges("auto", "iou", GenerateConfig(model_name_or_path="m", dataset="toy").judge_options())
    assert judge_rollouts(store, report.run_key, answer, crop) == 0  # all scored already
    exact, thresholded = make_judges("exact", "iou_threshold",
                                     config(iou_threshold=0.9).judge_options())
    assert judge_rollouts(store, report.run_key, exact, thresholded) == 4
    rows = store.rollouts(run_key=report.run_key)
    assert {json.loads(r["scores"])["crop:iou>=0.9"] for r in rows} == {0.0, 1.0}
    judged = store.db.execute("SELECT count(*) FROM judgements").fetchone()[0]
    assert judged == 4 * 4  # two judges twice: cached per (rollout, judge)
    assert store.cached_judgement(rows[0]["id"], "answer:exact") == 1.0


def test_items_without_box_have_no_crop_score(store: Store) -> None:
    add_items(store, 2, with_box=False)
    report = run_generate(store.workspace, config(attempts=1), reasoner=ScriptedReasoner())
    rows = store.rollouts(run_key=report.run_key)
    assert {r["crop_score"] for r in rows} == {None} and {r["iou"] for r in rows} == {None}
    assert report.pairs == 2  # the answer judge alone separates them


def test_config_loading_and_validation(tmp_path: Path) -> None:
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "m", "dataset": "d", "temprature": 2}))
    with pytest.raises(ConfigError, match="unknown key.*temprature"):
        load_config(GenerateConfig, path)
    with pytest.raises(ConfigError, match="attempts must be at least 1"):
        GenerateConfig(model_name_or_path="m", dataset="d", attempts=0)
    with pytest.raises(ConfigError, match="remote backend needs base_url"):
        GenerateConfig(dataset="d", backend="remote")
    a, b = GenerateConfig(model_name_or_path="m", dataset="d"), GenerateConfig(model_name_or_path="m", dataset="d")
    assert run_key_for(a) == run_key_for(b) != run_key_for(GenerateConfig(model_name_or_path="m", dataset="d", seed=1))
    for name in ("configs/generate.yaml", "configs/demo/generate.yaml"):
        cfg = load_config(GenerateConfig, Path(__file__).parents[1] / name)
        assert cfg.attempts == 3 and cfg.min_chosen_score == 0.8
        assert cfg.pairs_config().random_chosen is False
    # The pair rule is not a rollout setting: it changes no run key.
    assert run_key_for(GenerateConfig(model_name_or_path="m", dataset="d", random_chosen=True)) == run_key_for(a)
    assert GenerateConfig(model_name_or_path="m", dataset="d", random_chosen=True).pairs_config().random_chosen


def test_relative_model_path_resolves_in_workspace(store: Store) -> None:
    (store.workspace.models_dir / "tiny").mkdir()
    assert gen.resolve_model_path(store.workspace, "models/tiny") == str(store.workspace.root / "models/tiny")
    assert gen.resolve_model_path(store.workspace, "/abs/model") == "/abs/model"


def test_cli_generate_and_pairs(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from visrl.cli import main

    add_items(store, 3)
    monkeypatch.setattr(gen, "load_reasoner", lambda ws, cfg: ScriptedReasoner())
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "fake", "dataset": "toy", "attempts": 1}))
    ws = str(store.workspace.root)
    main(["generate", str(path), "--workspace", ws, "--limit", "2"])
    out = capsys.readouterr().out
    assert "2 items generated now" in out and "4 rollouts" in out and "pairs: 2 new" in out
    main(["pairs", str(path), "--workspace", ws])
    assert "0 new pairs, 2 in this run" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["generate", str(tmp_path / "missing.yaml"), "--workspace", ws])
    assert "config file not found" in capsys.readouterr().err


def test_cli_generate_as_job_reports_progress(store: Store, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.cli import main

    add_items(store, 3)
    monkeypatch.setattr(gen, "load_reasoner", lambda ws, cfg: ScriptedReasoner())
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "fake", "dataset": "toy", "attempts": 1,
                                    "batch_size": 2}))
    job_id = store.create_job("generate", {}, str(path))
    main(["generate", str(path), "--workspace", str(store.workspace.root), "--job-id", str(job_id)])
    job = store.job(job_id)
    assert (job["status"], job["step"], job["total"], job["exit_code"]) == ("succeeded", 3, 3, 0)
    assert {m["name"] for m in store.metrics(job_id)} == {"items_per_s", "parse_rate"}
    assert {r["job_id"] for r in store.rollouts()} == {job_id}


def test_job_counts_only_new_work_and_says_what_it_made(store: Store, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from visrl.cli import main

    add_items(store, 3)
    monkeypatch.setattr(gen, "load_reasoner", lambda ws, cfg: ScriptedReasoner())
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "fake", "dataset": "toy", "attempts": 1, "limit": 2}))
    first = store.create_job("generate", {}, str(path))
    main(["generate", str(path), "--workspace", str(store.workspace.root), "--job-id", str(first)])
    pairs = store.db["pairs"].count
    assert store.job(first)["message"].startswith(f"{pairs} new pairs from 2 new items (")
    path.write_text(path.read_text().replace("limit: 2", "limit: 3"))  # one more item
    second = store.create_job("generate", {}, str(path))
    main(["generate", str(path), "--workspace", str(store.workspace.root), "--job-id", str(second)])
    job = store.job(second)
    assert (job["step"], job["total"]) == (1, 1)  # the bar counts the new item, not the 2 done
    again = store.create_job("generate", {}, str(path))
    main(["generate", str(path), "--workspace", str(store.workspace.root), "--job-id", str(again)])
    job = store.job(again)
    assert (job["status"], job["total"]) == ("succeeded", 0)
    assert job["message"].startswith("nothing to do: all 3 items already have every attempt in run toy-train-")
    done = gen.plan_run(store, gen.GenerateConfig(model_name_or_path="fake", dataset="toy", attempts=1))
    assert done.pending == [] and done.summary() == job["message"]
    more = gen.GenerateConfig(model_name_or_path="fake", dataset="toy", attempts=2, run_key=done.run_key)
    plan = gen.plan_run(store, more)  # the same run, one more attempt per item
    assert [plan.todo[i["id"]] for i in plan.items] == [[1], [1], [1]] and len(plan.pending) == 3


def test_model_judges_run_concurrently_and_are_cached(store: Store) -> None:
    from test_judges import FakeJudgeServer

    add_items(store, 3)
    with FakeJudgeServer([]) as server:  # every reply: {"score": 0.5}
        server.replies = ['{"score": 1.0}', "```{\"score\": 0.9}```"] * 6
        cfg = config(attempts=2, answer_judge="model", crop_judge="model", judge_base_url=server.base_url,
                     judge_model="judge", judge_workers=4)
        report = run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
        assert len(server.requests) == 12 * 2  # every rollout, both judges
        rows = store.rollouts(run_key=report.run_key)
        assert {r["answer_score"] for r in rows} <= {1.0, 0.9, 0.5}
        assert {r["crop_score"] for r in rows} <= {1.0, 0.9, 0.5}
        keys = {j.key for j in make_judges("model", "model", cfg.judge_options())}
        assert {k.split("@")[0] for k in keys} == {"answer:model:judge", "crop:model:judge"}
        assert all(set(json.loads(r["scores"])) == keys for r in rows)
        run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
        assert len(server.requests) == 24  # resumed run: all cached, no new calls


def _tiny_model_and_scenes(store: Store, n: int) -> None:
    """The random ``test`` tiny model at models/tiny and ``n`` demo train scenes as dataset "demo"."""
    from visrl import tiny
    from visrl.synthetic import SyntheticConfig, render_item

    tiny.build_tiny_model(store.workspace.models_dir / "tiny", preset="test", seed=0)
    dataset_id = store.add_dataset("demo", "synthetic")
    rows = []
    for i in range(n):
        scene = render_item(SyntheticConfig(), "train", i)
        path = store.workspace.images_dir / f"{i}.png"
        scene.image.save(path)
        rows.append({"split": "train", "source_id": str(i), "image": store.workspace.relative(path),
                     "width": scene.size[0], "height": scene.size[1], "question": scene.question,
                     "answer": scene.answer, "gt_box": scene.target_object.box})
    store.add_items(dataset_id, rows)


@pytest.mark.slow
def test_generate_with_tiny_model(store: Store) -> None:
    import torch

    torch.set_num_threads(1)
    _tiny_model_and_scenes(store, 2)
    cfg = GenerateConfig(model_name_or_path="models/tiny", dataset="demo", attempts=2, batch_size=2,
                         max_new_tokens=16, temperature=1.0, min_parse_rate=0.0)  # random init: few boxes parse
    report = run_generate(store.workspace.root, cfg)  # relative model path: found in the workspace
    stored = keys(store, report.run_key)
    assert report.rollouts == len(stored) == len(set(stored)) == 8
    assert 0.0 <= report.parse_rate <= 1.0
    for r in store.rollouts(run_key=report.run_key):
        if r["box"] is None:
            assert (r["answer"], r["answer_score"]) == (None, 0.0)
        else:
            assert isinstance(r["answer"], str) and 0.0 <= r["answer_score"] <= 1.0


def test_unscored_judge_replies_are_dropped_and_counted(store: Store) -> None:
    from test_judges import FakeJudgeServer

    add_items(store, 2)
    # The policy's right answer ("7") is scored; the reply about the negative's wrong one holds
    # no score. As 0.0 it would have become the rejected side of a pair.
    def reply(body: dict[str, Any]) -> str:
        prompt = body["messages"][0]["content"][-1]["text"]
        return '{"score": 1.0}' if "Candidate answer: 7" in prompt else "I cannot tell."

    with FakeJudgeServer(reply) as server:
        cfg = config(attempts=1, answer_judge="model", crop_judge="none", judge_base_url=server.base_url,
                     judge_model="judge")
        report = run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
        assert len(server.requests) == 4
        assert (report.unscored, report.pairs, report.pairs_total) == (2, 0, 0)
        rows = store.rollouts(run_key=report.run_key)
        negatives = [r for r in rows if r["kind"] == "negative"]
        assert {r["answer_score"] for r in negatives} == {None}
        key = make_judges("model", "none", cfg.judge_options())[0].key
        assert all(json.loads(r["scores"])["unscored"] == [key] for r in negatives)
        assert {r["answer_score"] for r in rows if r["kind"] == "policy"} == {1.0}
        again = run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
        assert len(server.requests) == 4 and again.unscored == 2  # not re-asked; still counted
    # Re-judged by a rule judge that scores every answer, the rollouts are no longer held back.
    exact, _ = make_judges("exact", "none", config().judge_options())
    assert judge_rollouts(store, report.run_key, exact, None) == 4
    rows = store.rollouts(run_key=report.run_key)
    assert not any("unscored" in json.loads(r["scores"]) for r in rows)
    assert {r["answer_score"] for r in rows if r["kind"] == "negative"} == {0.0}


@pytest.mark.slow
def test_same_config_and_seed_give_the_same_rollouts(store: Store) -> None:
    _tiny_model_and_scenes(store, 3)

    def rollouts(run_key: str, seed: int = 0) -> list[tuple[Any, ...]]:
        cfg = GenerateConfig(model_name_or_path="models/tiny", dataset="demo", attempts=2, batch_size=2,
                             max_new_tokens=12, temperature=1.5, answer_temperature=1.0, seed=seed,
                             run_key=run_key, min_parse_rate=0.0)  # random init: few boxes parse
        run_generate(store.workspace.root, cfg)
        return [(r["item_id"], r["attempt"], r["kind"], r["box_text"], r["answer"])
                for r in store.rollouts(run_key=run_key)]

    first = rollouts("a")
    assert first == rollouts("b")  # a second run in the same process: the torch RNG has moved on
    assert len(first) == 12
    assert [r[3] for r in first] != [r[3] for r in rollouts("c", seed=1)]  # the seed matters
