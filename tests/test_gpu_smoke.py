"""bench/gpu_smoke.py's CPU self-check: the script a GPU run depends on works end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_smoke.py"


@pytest.mark.slow
def test_gpu_smoke_runs_every_stage_on_a_cpu(tmp_path: Path) -> None:
    """~40 s of CPU time (build, 3 stages of 2 steps, merge); far longer in wall time on a busy CPU."""
    out = tmp_path / "gpu_smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VISRL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--cpu", "--tiny", "--steps", "2", "--rows", "2",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=1800, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["model"]["kind"] == "tiny"
    assert [s["stage"] for s in report["stages"]] == ["sft", "dpo", "visrl"]
    for stage in report["stages"]:
        assert stage["steps"] == 2 and stage["steps_per_s"] > 0 and stage["peak_memory_mb"] > 0
        assert not stage["bf16"] and not stage["gradient_checkpointing"]  # forced off without a GPU
        # 224x168 under the tiny budget of 112x112 px: smart_resize to 112x84, 8x6 patches, 2x2 per token
        assert stage["visual_tokens_per_image"] == 12
    assert report["stages"][2]["vision_cache"] is True
    # The merge is a stock folder: the base's processor files, no VisRL processor class.
    assert "preprocessor_config.json" in report["merged_files"] and "processor_config.json" not in report["merged_files"]
    assert "vllm" not in report  # never on a CPU
    assert "sft " in done.stdout and "visrl " in done.stdout and f"wrote {out}" in done.stdout
