"""A generation run knows its model and its judges, and asks its servers before it spends.

The run key follows the weights (a content fingerprint), not the folder's name; a cached
judgement follows the judge's settings; ``--dry-run`` prints the plan; validation asks every
server the config names; a first batch that mostly fails to parse stops the run."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file
from test_generate import GT, SIZE, ScriptedReasoner, add_items, config
from test_judges import FakeJudgeServer

from visrl import generate as gen
from visrl import jobs
from visrl.boxes import format_box
from visrl.errors import ConfigError, RemoteError, VisRLError
from visrl.generate import plan_run, run_generate, run_key_for
from visrl.judges import JudgeOptions, make_judges
from visrl.progress import Progress
from visrl.store import Store
from visrl.workspace import Workspace


def model_folder(root: Path, name: str, weights: bytes, adapter: bool = False) -> Path:
    """A model folder (or LoRA adapter folder) the loader would find; weights are raw bytes."""
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    if adapter:
        (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
        (folder / "adapter_model.safetensors").write_bytes(weights)
    else:
        (folder / "config.json").write_text('{"model_type": "qwen2_vl"}')
        (folder / "model.safetensors").write_bytes(weights)
    return folder


class Messages(Progress):
    """A terminal progress that keeps the messages the run says."""

    def __init__(self) -> None:
        super().__init__(bar=False)
        self.said: list[str] = []

    def message(self, text: str) -> None:
        self.said.append(text)
        super().message(text)


# ---------------------------------------------------------------------- the weights fingerprint

def test_fingerprint_follows_content_not_folder(tmp_path: Path) -> None:
    from visrl import fingerprint

    a = model_folder(tmp_path / "a", "m", b"weights-1")
    b = model_folder(tmp_path / "b", "other-name", b"weights-1")
    c = model_folder(tmp_path / "c", "m", b"weights-2")
    fa, fb, fc = (fingerprint.folder_fingerprint(f) for f in (a, b, c))
    assert fa == fb and fa["files"] == 2 and fa["bytes"] == 9 + len('{"model_type": "qwen2_vl"}')
    assert fa["sha256"] != fc["sha256"]
    assert fingerprint.folder_fingerprint(tmp_path) is None  # no weights: not a model


def test_large_safetensors_are_sampled_per_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the whole-file size, the header and both ends of every tensor are read: a change
    to any tensor's values (as a merge or fine-tune makes) or to a shape changes the fingerprint."""
    from visrl import fingerprint

    monkeypatch.setattr(fingerprint, "WHOLE_FILE_BYTES", 0)
    monkeypatch.setattr(fingerprint, "SAMPLE_BYTES", 64)
    tensors = {f"layer{i}.weight": np.arange(4096, dtype=np.float32) + i for i in range(5)}
    path = tmp_path / "model.safetensors"

    def fp(changed: dict[str, np.ndarray]) -> str:
        save_file({**tensors, **changed}, str(path))
        fingerprint._memo.clear()
        return fingerprint.file_fingerprint(path)

    base = fp({})
    assert fp({}) == base
    assert fp({"layer3.weight": tensors["layer3.weight"] * 1.01}) != base  # one tensor merged
    assert fp({"layer0.weight": tensors["layer0.weight"].reshape(64, 64)}) != base  # a shape
    inside = tensors["layer2.weight"].copy()
    inside[2048] += 1  # one value deep inside one tensor: the documented blind spot
    assert fp({"layer2.weight": inside}) == base


# ---------------------------------------------------------------------- runs know their model

def test_re_merged_weights_in_the_same_folder_start_a_new_run_and_say_so(store: Store) -> None:
    root = store.workspace.root
    add_items(store, 2)
    model_folder(root, "merged", b"weights-1")
    cfg = config(model_name_or_path="models/merged", attempts=1)
    first = run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
    assert first.items_generated == 2
    model_folder(root, "merged", b"weights-2")  # `visrl merge` again, other weights, same folder
    said = Messages()
    second = run_generate(store.workspace, cfg, progress=said, reasoner=ScriptedReasoner())
    assert second.run_key != first.run_key and second.items_generated == 2 and second.rollouts == 4
    assert f"the model changed since run {first.run_key}" in said.said[0]
    assert "its 4 rollouts are not reused" in said.said[0]
    model_folder(root, "merged", b"weights-1")  # the first weights back: their run resumes, done
    policy = ScriptedReasoner()
    again = run_generate(store.workspace, cfg, reasoner=policy)
    assert again.run_key == first.run_key and again.items_generated == 0 and policy.box_calls == []


def test_two_workspaces_share_a_key_only_with_the_same_weights(tmp_path: Path) -> None:
    a, b, c = (Workspace.open(tmp_path / n) for n in "abc")
    model_folder(a.root, "m", b"weights-1")
    model_folder(b.root, "m", b"weights-2")
    model_folder(c.root, "m", b"weights-1")
    cfg = config(model_name_or_path="models/m")
    assert run_key_for(cfg, a) != run_key_for(cfg, b)
    assert run_key_for(cfg, a) == run_key_for(cfg, c)  # a copy of the same weights resumes the same run
    # The job's target (validation) names the run the child writes.
    store = Store(a)
    store.add_dataset("toy", "test")
    text = yaml.safe_dump({"model_name_or_path": "models/m", "dataset": "toy"})
    assert jobs.validate_text("generate", text, a)["run_key"] == run_key_for(
        gen.GenerateConfig(model_name_or_path="models/m", dataset="toy"), a)


def test_adapter_weights_and_remote_server_are_part_of_the_key(tmp_path: Path) -> None:
    ws = Workspace.open(tmp_path / "ws")
    model_folder(ws.root, "base", b"base")
    model_folder(ws.root, "lora", b"lora-1", adapter=True)
    cfg = config(model_name_or_path="models/base", adapter_name_or_path="models/lora")
    before = run_key_for(cfg, ws)
    model_folder(ws.root, "lora", b"lora-2", adapter=True)  # retrained into the same folder
    assert run_key_for(cfg, ws) != before
    remote = {"backend": "remote", "model_name_or_path": "", "remote_model": "sft", "base_url": "http://a:8000/v1"}
    keys = {run_key_for(config(**remote)), run_key_for(config(**{**remote, "base_url": "http://b:8000/v1"})),
            run_key_for(config(**{**remote, "remote_model": "sft-2"}))}
    assert len(keys) == 3


def test_a_named_run_key_refuses_another_model(store: Store) -> None:
    add_items(store, 1)
    model_folder(store.workspace.root, "m", b"weights-1")
    cfg = config(model_name_or_path="models/m", attempts=1, run_key="mine")
    run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())
    model_folder(store.workspace.root, "m", b"weights-2")
    with pytest.raises(ConfigError, match="run_key 'mine' holds rollouts of another model .*models/m"):
        run_generate(store.workspace, cfg, reasoner=ScriptedReasoner())


# ---------------------------------------------------------------------- judgements know their judge

def test_changing_only_the_judges_re_judges_stored_rollouts_and_says_so(store: Store) -> None:
    add_items(store, 2)
    first = run_generate(store.workspace, config(attempts=1), reasoner=ScriptedReasoner())
    other = config(attempts=1, answer_judge="exact", crop_judge="iou_threshold", iou_threshold=0.9)
    plan = plan_run(store, other)
    assert plan.run_key == first.run_key and plan.pending == [] and plan.rejudge == 4 and plan.has_work
    assert plan.summary() == (f"nothing to generate: all 2 items already have every attempt in run {first.run_key}; "
                              "the judges changed, so 4 stored rollouts are judged again "
                              "(answer:exact, crop:iou>=0.9)")
    policy = ScriptedReasoner()
    report = run_generate(store.workspace, other, reasoner=policy)
    assert policy.box_calls == [] and report.rollouts == 0 and report.rejudged == 4
    rows = store.rollouts(run_key=first.run_key)
    assert sorted(json.loads(r["scores"])["crop:iou>=0.9"] for r in rows) == [0.0, 0.0, 1.0, 1.0]
    assert plan_run(store, other).summary().startswith("nothing to do: all 2 items")


def test_model_judge_key_names_server_and_prompt_settings() -> None:
    def key(**kw: Any) -> str:
        return make_judges("model", "none", JudgeOptions(**{"base_url": "http://a/v1", "model": "j", **kw}))[0].key

    assert key() == key(base_url="http://a/v1/") == key(api_key="another key")
    assert len({key(), key(base_url="http://b/v1"), key(model="k"), key(max_tokens=8)}) == 4
    assert key().startswith("answer:model:j@")


def test_local_crop_judge_key_follows_its_weights(tmp_path: Path) -> None:
    """``crop_judge: policy``: weights retrained in place (same size, same mtime) are a new judge;
    a copy of the same weights elsewhere is the same judge."""
    import os

    from visrl.crop_judge import make_policy_crop_judge

    folder = model_folder(tmp_path / "a", "judge", b"weights-1")
    copy = model_folder(tmp_path / "b", "judge", b"weights-1")
    before = make_policy_crop_judge(str(folder)).key
    assert make_policy_crop_judge(str(copy)).key == before
    weights = folder / "model.safetensors"
    stat = weights.stat()
    weights.write_bytes(b"weights-2")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert make_policy_crop_judge(str(folder)).key != before


# ---------------------------------------------------------------------- the plan, printed

def test_dry_run_prints_the_plan_and_loads_nothing(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from visrl import fingerprint
    from visrl.cli import main

    add_items(store, 3)
    model_folder(store.workspace.root, "m", b"weights-1")
    monkeypatch.setattr(gen, "load_reasoner", lambda ws, cfg: pytest.fail("a dry run loaded the model"))
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": "models/m", "dataset": "toy", "attempts": 2}))
    main(["generate", str(path), "--dry-run", "--workspace", str(store.workspace.root)])
    lines = capsys.readouterr().out.splitlines()
    cfg = gen.GenerateConfig(model_name_or_path="models/m", dataset="toy", attempts=2)
    digest = fingerprint.folder_fingerprint(store.workspace.root / "models/m")["sha256"][:12]
    assert lines[:6] == [
        f"run key: {run_key_for(cfg, store.workspace)}",
        f"model: {store.workspace.root / 'models/m'} (weights {digest}, 2 files, 35 B)",
        "items: 3 selected, 3 to generate (0 done before)",
        "attempts to generate: 6 (12 rollouts: a policy and a negative one each)",
        "judges: answer:auto@0.5,0.05, crop:iou",
        "stored rollouts of this run: 0; reused as judged: 0; judged again (new judges, or not judged yet): 0"]
    assert store.rollouts() == [] and store.db["generate_runs"].count == 0  # nothing written


# ---------------------------------------------------------------------- servers asked first

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_recipe(url: str, **extra: Any) -> str:
    return yaml.safe_dump({"model_name_or_path": "models/m", "dataset": "toy", "answer_judge": "model",
                           "judge_base_url": url, "judge_model": "judge", **extra})


@pytest.fixture
def ready(store: Store) -> Store:
    store.add_dataset("toy", "test")
    model_folder(store.workspace.root, "m", b"weights-1")
    return store


def test_validation_fails_fast_on_a_dead_judge_server(ready: Store) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(RemoteError, match=rf"judge_base_url {url}: connection refused; start the server"):
        jobs.validate_text("generate", generate_recipe(url), ready.workspace)
    assert time.monotonic() - start <= 5


def test_validation_asks_the_server_for_its_models(ready: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeJudgeServer([], models=("judge",), api_key="k1") as server:
        monkeypatch.setenv("JUDGE_KEY", "k1")
        ok = generate_recipe(server.base_url, judge_api_key_env="JUDGE_KEY")
        assert jobs.validate_text("generate", ok, ready.workspace)["judge_model"] == "judge"
        monkeypatch.setenv("JUDGE_KEY", "wrong")
        with pytest.raises(RemoteError, match=rf"judge_base_url {server.base_url}: HTTP 401, the API key was "
                                              r"refused \(a key was sent\); set judge_api_key_env"):
            jobs.validate_text("generate", ok, ready.workspace)
        monkeypatch.setenv("JUDGE_KEY", "k1")
        with pytest.raises(RemoteError, match=r"serves 'judge', not 'Qwen/Qwen2.5-VL-72B'; set judge_model"):
            jobs.validate_text("generate", ok.replace("judge_model: judge", "judge_model: Qwen/Qwen2.5-VL-72B"),
                               ready.workspace)
        with pytest.raises(RemoteError, match=r"HTTP 404 on GET .*/models .*API root"):
            jobs.validate_text("generate", ok.replace("/v1", "/api"), ready.workspace)
        assert server.probes == ["Bearer k1", "Bearer wrong", "Bearer k1", "Bearer k1"]


def test_a_server_that_never_answers_is_a_timeout() -> None:
    from visrl.remote import Server, check_servers

    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        start = time.monotonic()
        with pytest.raises(RemoteError, match=rf"base_url {url}: timeout, no answer within 0.5 s"):
            check_servers([Server("base_url", url, "m", "api_key_env")], timeout=0.5)
        assert time.monotonic() - start < 2


def test_generate_asks_the_judge_server_before_generating(store: Store) -> None:
    add_items(store, 2)
    cfg = config(answer_judge="model", judge_base_url=f"http://127.0.0.1:{free_port()}/v1", judge_model="j")
    policy = ScriptedReasoner()
    with pytest.raises(RemoteError, match="connection refused"):
        run_generate(store.workspace, cfg, reasoner=policy)
    assert policy.box_calls == [] and store.rollouts() == []


# ---------------------------------------------------------------------- boxes that do not parse

def test_a_first_batch_that_mostly_fails_to_parse_stops_the_run(store: Store) -> None:
    add_items(store, 6)
    replies = lambda q, i: ["The answer is 7.", "I see it."] if i else [format_box(GT, "viscot", SIZE), "none"]  # noqa: E731
    policy = ScriptedReasoner(boxes=replies)
    with pytest.raises(ConfigError) as info:
        run_generate(store.workspace, config(attempts=2, batch_size=2), reasoner=policy)
    message = str(info.value)
    assert message.startswith("only 1 of 8 box texts (12%) of the first batch (2 items, 4 attempts) parsed "
                              "as boxes, below min_parse_rate 0.2; check box_format")
    assert "VisRL's box prompt" in message and "fake is the model meant" in message
    assert "One reply: 'none'" in message
    assert policy.box_calls == [4] and len(store.rollouts()) == 8  # the first batch is kept, no more
    report = run_generate(store.workspace, config(attempts=2, batch_size=2, min_parse_rate=0.0),
                          reasoner=ScriptedReasoner(boxes=replies))
    assert report.items_generated == 4 and report.parse_rate == 0.125  # resumed: the first batch is kept
    with pytest.raises(VisRLError, match=r"min_parse_rate must be in \[0.0, 1.0\]"):
        config(min_parse_rate=1.5)
