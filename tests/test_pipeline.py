"""The shipped demo recipes, end to end, each as a background job, on a (small) demo workspace.

SFT -> generate -> stage 1 -> stage 2 -> merge -> eval, every stage started through
``visrl.jobs.start_job`` with the very files in ``configs/demo/`` (only step and item counts are
cut), then ``visrl infer`` with the merged model. What each stage leaves behind is checked, so a
recipe that names the wrong folder, or a stage that no longer reads its predecessor's output,
fails here.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from visrl.cli import _register, cli

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo"

pytestmark = pytest.mark.slow


def run_job(root: Path, kind: str, recipe: str, *extra: str, timeout: float = 300) -> dict:
    from visrl.jobs import job_status, log_tail, start_job

    job_id = start_job(root, kind, DEMO / recipe, extra_args=list(extra))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_status(root, job_id)
        if job["status"] not in ("queued", "running"):
            assert job["status"] == "succeeded", f"{recipe}: {job['status']}\n{log_tail(root, job_id, 40)}"
            return job
        time.sleep(0.5)
    raise AssertionError(f"{recipe} did not finish in {timeout} s:\n{log_tail(root, job_id, 40)}")


def test_demo_recipes_run_as_jobs_from_sft_to_eval(tmp_path: Path) -> None:
    from visrl.demo import create_demo_workspace
    from visrl.review import status_counts
    from visrl.store import Store

    root = create_demo_workspace(tmp_path / "ws", n_pairs_items=0, data={"n_train": 12, "n_val": 2, "n_test": 4})
    models = root / "models"

    run_job(root, "train", "train_sft.yaml", "--max-steps", "2")
    assert (models / "tiny-demo-sft" / "adapter_config.json").is_file()

    run_job(root, "generate", "generate.yaml", "--limit", "12")
    store = Store.open(root)
    assert len(store.rollouts()) == 12 * 3 * 2  # 3 attempts, a policy and a negative rollout each
    assert sum(status_counts(store).values()) > 0, "the SFT'd demo model should give some pairs"

    run_job(root, "train", "train_rl_stage1.yaml", "--max-steps", "2")
    assert (models / "tiny-demo-rl-stage1" / "base" / "config.json").is_file()  # base + SFT, merged
    run_job(root, "train", "train_rl_stage2.yaml", "--max-steps", "2")
    assert (models / "tiny-demo-rl-stage2" / "adapter_config.json").is_file()

    run_job(root, "merge", "merge_lora.yaml")
    merged = models / "tiny-demo-visrl"
    assert json.loads((merged / "visrl_model.json").read_text())["box_format"] == "viscot"
    assert not (merged / "adapter_config.json").exists()

    seeded = {row["id"] for row in store.evaluations()}  # the demo ships the card's and benchmark's numbers
    run_job(root, "eval", "eval.yaml", "--limit", "4")
    [evaluation] = [row for row in store.evaluations() if row["id"] not in seeded]
    assert evaluation["n"] == 4 and evaluation["model"] == "models/tiny-demo-visrl"
    stages = [c["stage"] for c in store.checkpoints()]
    assert stages[:1] == ["sft"] and {"dpo", "visrl", "merged"} <= set(stages)

    item = store.items("demo", "test")[0]
    _register()
    result = CliRunner().invoke(cli, ["infer", "-w", str(root), "--model", "models/tiny-demo-visrl",
                                      "--image", str(root / item["image"]), "--question", item["question"],
                                      "--crop-out", str(tmp_path / "crop.png"), "--json"])
    assert result.exit_code == 0, result.output
    answer = json.loads(result.output[result.output.index("{"):])
    assert answer["box"] is not None and (tmp_path / "crop.png").is_file()
    assert answer["answer"] in ("horizontal", "vertical", "checkered")
