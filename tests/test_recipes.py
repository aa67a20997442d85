"""The shipped recipes (configs/ and configs/demo/) chain: every model, adapter and dataset a
stage reads is what an earlier stage wrote (or the declared base model / an imported dataset),
and every adapter is loaded on the very model it was trained on. The accelerate configs load with
accelerate's own loader. Output names come from the stages' own code (``result_base``,
``merged_base_dir``, ``run_key_for``), not from copies of their naming rules."""

from __future__ import annotations

import posixpath
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from visrl.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# (command, config file) in the order a user runs them; the README's sections follow this order.
REAL_RECIPE = [
    ("train", "train_sft.yaml"),
    ("merge", "merge_lora.yaml"),
    ("generate", "generate.yaml"),
    ("pairs", "generate.yaml"),
    ("serve", "serve_sft.yaml"),  # or vLLM under the same name: the large-run form of generate
    ("generate", "generate_remote.yaml"),
    ("pairs", "generate_remote.yaml"),
    ("train", "train_rl_stage1.yaml"),
    ("merge", "merge_rl_stage1.yaml"),
    ("train", "train_rl_stage2.yaml"),
    ("merge", "merge_rl_stage2.yaml"),
    ("eval", "eval.yaml"),
    ("infer", "infer.yaml"),
    ("serve", "serve.yaml"),
    ("train", "train_grpo.yaml"),  # optional branch from the SFT-merged model
]
REAL_BASES = {"Qwen/Qwen2.5-VL-7B-Instruct"}  # a Hub id: a folder of the user's HF cache
REAL_IMPORTS = {"viscot", "vqa", "viscot-bench"}  # `visrl import ... --dataset NAME`

DEMO_RECIPE = [
    ("train", "train_sft.yaml"),
    ("generate", "generate.yaml"),
    ("train", "train_rl_stage1.yaml"),
    ("train", "train_rl_stage2.yaml"),
    ("merge", "merge_lora.yaml"),
    ("eval", "eval.yaml"),
    ("serve", "serve.yaml"),
    ("train", "train_grpo.yaml"),
    ("train", "train_grpo_answer.yaml"),  # GRPO on the answer reward alone, from the demo model itself
]
DEMO_BASES = {"models/tiny-demo"}  # visrl.demo.DEMO_MODEL: the shipped model, copied in by `visrl demo`
DEMO_IMPORTS = {"demo"}  # the synthetic benchmark `visrl demo` builds
# scripts/train_demo_model.py's recipes (phases 1 and 2 of the shipped demo model), not stages
NOT_IN_CHAIN = {"demo/train_demo_model.yaml", "demo/train_demo_binding.yaml"}


def _norm(path: str | None) -> str | None:
    return posixpath.normpath(path) if path else None


@dataclass
class Chain:
    """What the stages run so far have written: models, adapters (-> their base), data."""

    models: set[str]
    datasets: set[str]
    adapters: dict[str, str] = field(default_factory=dict)
    pairs: set[str] = field(default_factory=set)  # datasets whose items have generated pairs
    rollouts: set[str] = field(default_factory=set)  # generate run keys
    served: set[str] = field(default_factory=set)  # model names a serve step answers to
    problems: list[str] = field(default_factory=list)

    def need_model(self, where: str, model: str, adapter: str | None) -> None:
        model, adapter = _norm(model), _norm(adapter)
        if model not in self.models:
            self.problems.append(f"{where}: model {model!r} is written by no earlier stage "
                                 f"(known models: {sorted(self.models)})")
        if adapter is None:
            return
        if adapter not in self.adapters:
            self.problems.append(f"{where}: adapter {adapter!r} is written by no earlier stage")
        elif self.adapters[adapter] != model:
            self.problems.append(f"{where}: adapter {adapter!r} was trained on {self.adapters[adapter]!r}, "
                                 f"but is loaded on {model!r}")

    def need_dataset(self, where: str, name: str) -> None:
        if name not in self.datasets:
            self.problems.append(f"{where}: dataset {name!r} is neither imported nor written")

    def need_pairs(self, where: str, dataset: str) -> None:
        if not (self.pairs if not dataset else dataset in self.pairs):
            self.problems.append(f"{where}: no earlier generate run makes pairs of {dataset or 'any dataset'!r}")


def _train(chain: Chain, where: str, path: Path) -> None:
    from visrl.train.config import load_train_config, merged_base_dir, result_base

    cfg = load_train_config(path)
    chain.need_model(where, cfg.model_name_or_path, cfg.adapter_name_or_path)
    if cfg.is_preference:
        chain.need_pairs(where, cfg.dataset)
    else:
        chain.need_dataset(where, cfg.dataset)
    if cfg.adapter_name_or_path:  # folded in first; run.py saves that merged base
        chain.models.add(_norm(merged_base_dir(cfg.output_dir).as_posix()))
    if cfg.finetuning_type == "lora":
        chain.adapters[_norm(cfg.output_dir)] = _norm(result_base(cfg))
    else:
        chain.models.add(_norm(cfg.output_dir))


def _merge(chain: Chain, where: str, path: Path) -> None:
    from visrl.train.merge import load_merge_config

    cfg = load_merge_config(path)  # what `visrl merge` and a merge job read
    chain.need_model(where, cfg.model_name_or_path, cfg.adapter_name_or_path)
    chain.models.add(_norm(cfg.export_dir))


def _generate(chain: Chain, where: str, path: Path, pairs_only: bool) -> None:
    from visrl.generate import GenerateConfig, run_key_for

    cfg = load_config(GenerateConfig, path)
    run_key = cfg.run_key or run_key_for(cfg)
    if pairs_only:  # `visrl pairs` re-filters the rollouts of that very run
        if run_key not in chain.rollouts:
            chain.problems.append(f"{where}: `visrl pairs` needs the rollouts of run {run_key}, "
                                  "which no earlier generate wrote")
        return
    if cfg.backend == "local":
        chain.need_model(where, cfg.model_name_or_path, cfg.adapter_name_or_path)
    elif cfg.remote_model not in chain.served:
        chain.problems.append(f"{where}: remote_model {cfg.remote_model!r} is served by no earlier step")
    chain.need_dataset(where, cfg.dataset)
    chain.rollouts.add(run_key)
    chain.pairs.add(cfg.dataset)


def _consume(chain: Chain, where: str, path: Path, command: str) -> None:
    from visrl.evaluate import EvalConfig
    from visrl.infer import InferConfig
    from visrl.serve import ServeConfig

    cls: Any = {"eval": EvalConfig, "infer": InferConfig, "serve": ServeConfig}[command]
    cfg = load_config(cls, path)
    if getattr(cfg, "backend", "local") == "local":
        chain.need_model(where, cfg.model_name_or_path, cfg.adapter_name_or_path)
    elif cfg.remote_model not in chain.served:
        chain.problems.append(f"{where}: remote_model {cfg.remote_model!r} is served by no earlier step")
    if command == "serve":
        chain.served.add(cfg.model_name)
    if command == "eval":
        chain.need_dataset(where, cfg.dataset)


def walk(folder: Path, recipe: list[tuple[str, str]], bases: set[str], imports: set[str]) -> list[str]:
    """Run ``recipe`` on paper; the problems found, in order (empty: the recipe chains)."""
    chain = Chain(models={_norm(b) for b in bases}, datasets=set(imports))
    for command, name in recipe:
        where = f"{folder.name}/{name} ({command})"
        if command == "train":
            _train(chain, where, folder / name)
        elif command == "merge":
            _merge(chain, where, folder / name)
        elif command in ("generate", "pairs"):
            _generate(chain, where, folder / name, pairs_only=command == "pairs")
        else:
            _consume(chain, where, folder / name, command)
    return chain.problems


@pytest.mark.parametrize("sub, recipe, bases, imports", [
    ("", REAL_RECIPE, REAL_BASES, REAL_IMPORTS),
    ("demo", DEMO_RECIPE, DEMO_BASES, DEMO_IMPORTS),
])
def test_shipped_recipe_chains(sub: str, recipe: list[tuple[str, str]], bases: set[str],
                               imports: set[str]) -> None:
    folder = CONFIGS / sub if sub else CONFIGS
    assert walk(folder, recipe, bases, imports) == []
    shipped = {p.name for p in folder.glob("*.yaml")} - {Path(n).name for n in NOT_IN_CHAIN if n.startswith(sub + "/")}
    assert shipped == {name for _, name in recipe}, "every shipped config has its place in the recipe"


def test_demo_base_is_the_model_visrl_demo_installs() -> None:
    from visrl.demo import DEMO_MODEL

    assert DEMO_BASES == {DEMO_MODEL}


@pytest.mark.parametrize("name, text, fragment", [
    # The defects of issue 11 as they were shipped: each must be caught by name.
    ("eval.yaml", "model_name_or_path: Qwen/Qwen2.5-VL-7B-Instruct\nadapter_name_or_path: "
     "models/qwen25vl-7b-rl-stage2\ndataset: viscot-bench\n",
     "trained on 'models/qwen25vl-7b-rl-stage1-merged', but is loaded on 'Qwen/Qwen2.5-VL-7B-Instruct'"),
    ("generate.yaml", "model_name_or_path: models/visrl-sft-7b\ndataset: vqa\n",
     "model 'models/visrl-sft-7b' is written by no earlier stage"),
    ("serve.yaml", "model_name_or_path: models/visrl-sft-7b\n", "'models/visrl-sft-7b'"),
    ("train_rl_stage2.yaml", "stage: visrl\nmodel_name_or_path: models/qwen25vl-7b-rl-stage1-merged\n"
     "output_dir: models/qwen25vl-7b-rl-stage2\ndataset: other\n", "no earlier generate run makes pairs of 'other'"),
])
def test_a_broken_link_is_named(tmp_path: Path, name: str, text: str, fragment: str) -> None:
    folder = tmp_path / "configs"
    shutil.copytree(CONFIGS, folder, ignore=shutil.ignore_patterns("demo", "accelerate"))
    (folder / name).write_text(text)
    problems = walk(folder, REAL_RECIPE, REAL_BASES, REAL_IMPORTS)
    assert any(name in p and fragment in p for p in problems), problems


def test_a_stage_run_out_of_order_is_caught() -> None:
    swapped = [step for step in REAL_RECIPE if step[1] != "merge_rl_stage1.yaml"]
    swapped.insert(swapped.index(("train", "train_rl_stage2.yaml")) + 1, ("merge", "merge_rl_stage1.yaml"))
    problems = walk(CONFIGS, swapped, REAL_BASES, REAL_IMPORTS)
    assert problems and "train_rl_stage2.yaml" in problems[0] and "rl-stage1-merged" in problems[0]


def test_the_readme_real_model_section_runs_the_chain_in_order() -> None:
    """The README's real-model commands, in the order written, chain too (imports included)."""
    import re

    readme = (CONFIGS.parent / "README.md").read_text()
    section = readme[readme.index("## Real model"):]
    section = section[:section.index("\n## ", 1)]
    steps = [(cmd, name) for cmd, name in re.findall(
        r"visrl (train|merge|generate|pairs|eval|infer|serve)\b.*?configs/([\w.]+\.yaml)", section)]
    imports = set(re.findall(r"visrl import .*--dataset ([\w-]+)", section))
    assert imports == REAL_IMPORTS
    assert walk(CONFIGS, steps, REAL_BASES, imports) == []
    assert {name for _, name in steps} == {name for _, name in REAL_RECIPE} - {"train_grpo.yaml"}


# ---------------------------------------------------------------------- the checkpoint's contract

CONSUMERS = ("eval", "generate", "pairs", "infer", "serve")  # stages that run a trained model as it is
# Consumer configs that must override the checkpoint's contract, and why (none today).
MUST_PIN: dict[str, str] = {}


def pinned_contract_keys(folder: Path, recipe: list[tuple[str, str]]) -> list[str]:
    """``file: key`` for every contract field a consumer config sets: the checkpoint owns those
    (visrl_model.json, written at training), and a key in the config would override it."""
    from dataclasses import fields as dc_fields

    from visrl.config import read_yaml
    from visrl.contract import TwoStepContract

    owned = {f.name for f in dc_fields(TwoStepContract)}
    found = []
    for name in sorted({name for command, name in recipe if command in CONSUMERS}):
        data = read_yaml(folder / name)
        found += [f"{name}: {key}" for key in sorted(owned & set(data)) if data[key] is not None]
    return [p for p in found if p.split(":")[0] not in MUST_PIN]


@pytest.mark.parametrize("sub, recipe", [("", REAL_RECIPE), ("demo", DEMO_RECIPE)])
def test_no_consumer_recipe_pins_the_checkpoints_contract(sub: str, recipe: list[tuple[str, str]]) -> None:
    assert pinned_contract_keys(CONFIGS / sub if sub else CONFIGS, recipe) == []


def test_a_pinned_contract_key_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "configs"
    shutil.copytree(CONFIGS, folder, ignore=shutil.ignore_patterns("demo", "accelerate"))
    with (folder / "eval.yaml").open("a") as f:
        f.write("crop_margin: 0.0\nbox_format: null\n")  # null follows the checkpoint: fine
    assert pinned_contract_keys(folder, REAL_RECIPE) == ["eval.yaml: crop_margin"]


# ---------------------------------------------------------------------- accelerate configs

ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_the_accelerate_configs_named_in_comments_are_shipped() -> None:
    import re

    root = CONFIGS.parent
    texts = [p.read_text() for p in [root / "README.md", *CONFIGS.rglob("*.yaml"), *root.glob("visrl/**/*.py")]]
    named = {m for text in texts for m in re.findall(r"configs/accelerate/[\w.-]+\.yaml", text)}
    assert named and all((root / name).is_file() for name in named), named
    assert {p.name for p in ACCELERATE} <= {Path(n).name for n in named}  # and each shipped one is documented


@pytest.mark.parametrize("path", ACCELERATE, ids=[p.name for p in ACCELERATE])
def test_accelerate_config_loads_with_accelerates_loader(path: Path) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(path))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MULTI_GPU)
    assert cfg.num_processes >= 2 and cfg.mixed_precision == "bf16"
    # `accelerate launch` copies every deepspeed_config key onto its own argument of that name:
    # a misspelt key would be silently ignored there, so each must be a real launch argument.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "visrl", "train", "x.yaml"])
    unknown = [key for key in cfg.deepspeed_config if not hasattr(args, key)]
    assert unknown == []
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert cfg.deepspeed_config["zero_stage"] == 2
        # Left to the Trainer ("auto"): a value here that differs from the training config fails.
        assert "gradient_accumulation_steps" not in cfg.deepspeed_config
