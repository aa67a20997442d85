"""Every test gets its own VisRL home and workspace (llm-style autouse fixture): no test touches
real data, nothing is downloaded."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Model commands run in-process under CliRunner choose torch threads (visrl.runtime); on the
# shared CI CPU one thread is the fast choice, and it keeps test timings steady.
os.environ.setdefault("VISRL_NUM_THREADS", "1")

from visrl.contract import TwoStepContract  # noqa: E402  (after the environment above)
from visrl.two_step import TwoStep  # noqa: E402


@pytest.fixture(autouse=True)
def visrl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "visrl-home"
    monkeypatch.setenv("VISRL_HOME", str(home))
    monkeypatch.setenv("VISRL_WORKSPACE", str(tmp_path / "workspace"))
    return home


@pytest.fixture
def workspace(tmp_path: Path):
    from visrl.workspace import Workspace

    return Workspace.open(tmp_path / "workspace")


@pytest.fixture
def store(workspace):
    from visrl.store import Store

    return Store(workspace)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium for the browser tests (one per module)."""
    from playwright.sync_api import sync_playwright
    from test_app_browser import CHROMIUM, CHROMIUM_ARGS  # its import checks that chromium is there

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The "test" preset tiny model, loaded once per test module (serve and abuse tests)."""
    import torch

    from visrl.models import load_model
    from visrl.tiny import build_tiny_model

    torch.set_num_threads(1)
    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny", preset="test"), device="cpu")


def load_script(relative: str, name: str) -> Any:
    """A script of this repository that is not a package module (``bench/learning.py``,
    ``scripts/train_demo_model.py``) imported as module ``name``."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / relative)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class ScriptedTwoStep(TwoStep):
    """A real two-step policy whose model is a script (as llm's ``MockModel`` is a ``Model``): a
    test subclass overrides :meth:`reply` alone, and the prompts, box parsing, random boxes, crops
    and images are the production code's (``self.contract``'s).

    A conversation (image_first layout) is one user turn for the box step (and the direct
    baseline), three for the answer step: user (full image, question), assistant (box text),
    user (crop, answer prompt). The helpers below read those parts.
    """

    def __init__(self, contract: TwoStepContract | None = None) -> None:
        if contract is not None:  # else the class's contract (TwoStep's default unless a subclass sets one)
            self.contract = contract

    def generate(self, conversations: list, sampling: Any, progress: bool = False) -> list[list[str]]:
        return [self.reply(conversation, sampling) for conversation in conversations]

    def reply(self, conversation: list, sampling: Any) -> list[str]:
        """The ``sampling.n`` texts the scripted model writes for one conversation."""
        raise NotImplementedError

    @staticmethod
    def is_box_step(conversation: list) -> bool:
        return len(conversation) == 1  # the direct baseline is one turn too

    @staticmethod
    def full_image(conversation: list) -> Any:
        return conversation[0]["content"][0]["image"]

    @staticmethod
    def question_text(conversation: list) -> str:
        return conversation[0]["content"][1]["text"]

    @staticmethod
    def box_text(conversation: list) -> str:
        """The answer step's step-1 box text (the assistant turn)."""
        return conversation[1]["content"][0]["text"]

    @staticmethod
    def crop_image(conversation: list) -> Any:
        """The answer step's crop, as the contract cut and prepared it."""
        return conversation[2]["content"][0]["image"]
