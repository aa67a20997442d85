"""The stage table (visrl.stages): what the CLI, jobs and the app offer comes from it, and only
from it; every stage's recipe, config and run function fit together."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from visrl import stages
from visrl.errors import ConfigError, JobError

ROOT = Path(__file__).resolve().parents[1]
# The only modules that may list stage names or job kinds: the table itself.
ALLOWED = {"visrl/stages.py"}


def test_the_table_in_the_pipelines_order() -> None:
    assert stages.NAMES == ("generate", "sft", "dpo", "visrl", "grpo", "merge", "eval")
    assert stages.KINDS == ("generate", "train", "merge", "eval")
    assert stages.TRAIN_STAGES == ("sft", "dpo", "visrl", "grpo")
    assert stages.single_process_kinds() == ("generate", "merge", "eval")
    assert [s.name for s in stages.STAGES if s.preference] == ["dpo", "visrl"]
    assert [s.name for s in stages.STAGES if s.rolls_out] == ["generate", "eval"]
    assert {s.name: s.output_field for s in stages.STAGES} == {
        "generate": None, "sft": "output_dir", "dpo": "output_dir", "visrl": "output_dir", "grpo": "output_dir",
        "merge": "export_dir", "eval": "output_dir"}
    assert len({s.title for s in stages.STAGES}) == len(stages.STAGES)


@pytest.mark.parametrize("kind", stages.KINDS)
def test_the_stages_of_one_kind_share_what_a_job_reads(kind: str) -> None:
    """A job knows its kind only; stage_of_kind answers for all its stages."""
    first = stages.stage_of_kind(kind)
    for stage in (s for s in stages.STAGES if s.kind == kind):
        assert (stage.config, stage.parser, stage.run, stage.output_field, stage.single_process,
                stage.rolls_out) == (first.config, first.parser, first.run, first.output_field,
                                     first.single_process, first.rolls_out)


def test_lookups_name_what_there_is() -> None:
    assert stages.stage_named("visrl").title == "visrl (VisRL stage 2: box + answer)"
    with pytest.raises(ConfigError, match="unknown stage 'ppo'; use one of generate, sft, dpo, visrl, grpo, merge, eval"):
        stages.stage_named("ppo")
    with pytest.raises(JobError, match="unknown job kind 'sleep'; use one of generate, train, merge, eval"):
        stages.stage_of_kind("sleep")
    assert stages.stage_of_job("train", {"stage": "dpo"}).name == "dpo"
    assert stages.stage_of_job("merge", {}).name == "merge"
    assert stages.stage_of_job("train", {"stage": "ppo"}) is None
    with pytest.raises(ConfigError, match="stage 'merge' trains nothing"):
        _ = stages.stage_named("merge").trainer_builder


# ---------------------------------------------------------------------- who reads the table

def test_the_cli_offers_the_tables_stages() -> None:
    from visrl.cli import MODEL_COMMANDS, SINGLE_PROCESS, _register, cli

    _register()
    assert set(stages.KINDS) <= set(cli.commands)  # `visrl KIND CONFIG` for every kind
    assert tuple(cli.commands["jobs"].commands["start"].params[0].type.choices) == stages.KINDS
    assert MODEL_COMMANDS == ("generate", "train", "merge", "eval", "serve", "infer")
    assert SINGLE_PROCESS == ("generate", "merge", "eval", "serve", "infer")
    help_text = cli.commands["train"].help
    assert all(stages.stage_named(name).title in help_text for name in stages.TRAIN_STAGES)


def test_training_and_jobs_accept_the_tables_names_only(tmp_path: Path) -> None:
    from visrl.jobs import Launcher, start_job
    from visrl.train.config import TrainConfig

    assert TrainConfig(stage="visrl", model_name_or_path="m", output_dir="o").is_preference
    with pytest.raises(ConfigError, match="stage must be one of sft, dpo, visrl, grpo, got 'merge'"):
        TrainConfig(stage="merge", model_name_or_path="m", output_dir="o")
    with pytest.raises(JobError, match="a merge job runs in one process; only train jobs take several"):
        start_job(tmp_path, "merge", tmp_path / "merge.yaml", launcher=Launcher(num_processes=2))


def test_the_apps_stage_choices_come_from_the_table() -> None:
    from visrl_app import evaluate_tab, generate_tab, train_tab

    assert list(train_tab.STAGES) == ["sft", "dpo (VisRL stage 1: box step)", "visrl (VisRL stage 2: box + answer)",
                                      "grpo (online RL: IoU reward)", "merge LoRA"]
    assert all(train_tab.STAGES[s.title] is s for s in stages.STAGES if s.app_tab == "train")
    assert train_tab.KINDS == ("train", "merge")
    assert set(generate_tab.KINDS) | set(evaluate_tab.KINDS) <= set(stages.KINDS)
    job = {"kind": "train", "config": '{"stage": "grpo"}'}
    assert train_tab.stage_of(job) == "grpo (online RL: IoU reward)"


# ---------------------------------------------------------------------- records that fit together

@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_run_functions_take_workspace_then_config(stage: stages.Stage) -> None:
    params = list(inspect.signature(stage.run_function).parameters)
    assert params[:2] == ["workspace", "cfg"]
    assert {"progress", "job_id"} <= set(params)


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_each_stages_recipes_load_as_its_config(stage: stages.Stage) -> None:
    recipes = [folder / stage.recipe for folder in (ROOT / "configs", ROOT / "configs" / "demo")]
    assert all(path.is_file() for path in recipes), recipes
    for path in recipes:
        cfg = stage.load(path)
        assert isinstance(cfg, stage.config_class)
        assert getattr(cfg, "stage", stage.name) == stage.name  # a training recipe names its own stage
    if stage.output_field:
        assert stage.output_field in {f.name for f in fields(stage.config_class)}
    if stage.trainer:
        assert callable(stage.trainer_builder)


def test_importing_the_table_imports_no_torch_and_no_other_visrl_module() -> None:
    code = "import sys, visrl.stages; print(sorted(m for m in sys.modules if m.startswith(('visrl', 'torch'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['visrl', 'visrl.errors', 'visrl.stages']"


# ---------------------------------------------------------------------- no copies of the names

def vocabulary_copies(source: str) -> list[tuple[int, list[str]]]:
    """Collection literals (tuple, list, set, dict keys) made mostly of stage names or job kinds:
    a copy of the table's vocabulary. ``__all__`` lists are exempt (function names may match)."""
    names = set(stages.NAMES) | set(stages.KINDS)
    tree = ast.parse(source)
    exempt = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
              and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)}
    copies = []
    for node in ast.walk(tree):
        elements: list[Any]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and id(node) not in exempt:
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [key for key in node.keys if key is not None]
        else:
            continue
        strings = {e.value for e in elements if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        found = sorted(strings & names)
        if len(found) >= 2 and 2 * len(found) >= len(strings):  # a table of other names may share one or two
            copies.append((node.lineno, found))
    return copies


@pytest.mark.parametrize(("source", "copies"), [
    ('KINDS = ("train", "merge")', [(1, ["merge", "train"])]),
    ('click.Choice(["generate", "train", "merge", "eval"])', [(1, ["eval", "generate", "merge", "train"])]),
    ('NEEDED = {"sft": 1, "dpo": 2}', [(1, ["dpo", "sft"])]),
    ('if kind in ("generate", "eval"): pass', [(1, ["eval", "generate"])]),
    ('ARMS = {"warmup": "a", "control": "b", "visrl": "c", "grpo": "d", "upper": "e"}', []),
    ('__all__ = ["train", "merge"]', []),
    ('if stage == "grpo": pass', []),
])
def test_the_copy_finder_finds_copies(source: str, copies: list[tuple[int, list[str]]]) -> None:
    assert vocabulary_copies(source) == copies


def test_no_module_lists_stage_names_but_the_table() -> None:
    found = {}
    for package in ("visrl", "visrl_app"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in ALLOWED and (copies := vocabulary_copies(path.read_text(encoding="utf-8"))):
                found[rel] = copies
    assert found == {}, f"stage names or job kinds listed outside visrl/stages.py: {found}"
