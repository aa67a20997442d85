"""``visrl review``: the desk's actions from the command line (click's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.test_review import make_pairs
from visrl import review
from visrl.cli import _register, cli, main
from visrl.store import Store
from visrl.workspace import Workspace

COMMANDS = ("list", "show", "accept", "reject", "reset", "swap", "undo", "edit-box", "edit-answer", "bulk",
            "undo-bulk", "progress")


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    _register()


@pytest.fixture
def ws(tmp_path: Path) -> str:
    root = tmp_path / "w"
    make_pairs(Store(Workspace.open(root)))
    return str(root)


def run(*args: str, code: int = 0, stdin: str | None = None) -> Any:
    result = CliRunner().invoke(cli, list(args), input=stdin, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.mark.parametrize("command", COMMANDS)
def test_every_review_command_has_help(command: str) -> None:
    result = run("review", command, "--help")
    assert "--workspace" in result.output
    assert len(cli.commands["review"].commands[command].help.split()) >= 4


def test_list_show_and_actions_are_audited_under_the_user(ws: str) -> None:
    listed = run("review", "list", "-w", ws).output.split("\n")
    assert [int(line.split()[0]) for line in listed if line.strip()] == [6, 3, 2, 4, 5, 1]
    assert run("review", "list", "--search", "colour", "--json", "-w", ws).output.count('"id"') == 2
    assert run("review", "accept", "2", "--user", "ana", "-w", ws).output.startswith("pair 2 v2 accepted")
    run("review", "swap", "3", "--version", "1", "-u", "ana", "-w", ws)
    run("review", "edit-box", "1", "chosen", "5", "6", "50", "70", "-u", "bo", "-w", ws)
    run("review", "edit-answer", "1", "rejected", "purple", "-u", "bo", "-w", ws)
    shown = json.loads(run("review", "show", "1", "-w", ws).output)
    assert (shown["chosen_box"], shown["rejected_answer"]) == ("[5.0, 6.0, 50.0, 70.0]", "purple")
    assert [(h["reviewer"], h["action"]) for h in shown["history"]] == [
        ("bo", "edit_chosen_box"), ("bo", "edit_rejected_answer")]
    run("review", "undo", "1", "-u", "bo", "-w", ws)
    assert review.get_pair(Store.open(ws), 1)["rejected_answer"] == "blue"
    out = json.loads(run("review", "progress", "--json", "-w", ws).output)
    assert out == {"pairs": {"pending": 5, "accepted": 1, "rejected": 0},
                   "reviewers": {"ana": {"accepted": 1}}}  # standing decisions: edits decide nothing


def test_bulk_confirms_the_count_and_undoes_as_one(ws: str) -> None:
    aborted = run("review", "bulk", "reject", "-d", "shapes", "-u", "ana", "-w", ws, code=1, stdin="n\n")
    assert "reject 4 pairs?" in aborted.output
    assert review.status_counts(Store.open(ws))["rejected"] == 0
    out = run("review", "bulk", "reject", "-d", "shapes", "-u", "ana", "-w", ws, stdin="y\n").output
    assert "reject: 4 pairs, batch bulk-" in out
    assert run("review", "bulk", "reject", "-d", "shapes", "-w", ws).output.startswith("no pair matching")
    run("review", "undo-bulk", "-u", "ana", "-w", ws)
    assert review.status_counts(Store.open(ws)) == {"pending": 6, "accepted": 0, "rejected": 0}
    run("review", "bulk", "accept", "--search", "colour", "--expect", "2", "-u", "ana", "-w", ws)
    assert review.status_counts(Store.open(ws))["accepted"] == 2


@pytest.mark.parametrize("args, message", [
    (["accept", "2", "--version", "7"], "Error: pair 2 was changed by someone else (you have version 7"),
    (["accept", "99"], "Error: no pair with id 99"),
    (["undo", "1"], "Error: pair 1 has nothing to undo"),
    (["edit-box", "1", "chosen", "0", "0", "500", "10"], "Error: box [0.0, 0.0, 500.0, 10.0] is empty or leaves"),
    (["bulk", "accept", "--expect", "3"], "Error: nothing changed: the filters match 6 pairs to accept now, but 3 "
                                          "were expected; the set of matching pairs is not the one counted"),
    (["undo-bulk", "-u", "zed"], "Error: zed has no bulk action left to undo"),
    (["list", "-d", "nope"], "Error: no dataset named 'nope'"),
    (["accept", "1", "-u", " "], "Error: reviewer name '' must be 1-64 printable characters"),
])
def test_errors_are_one_line(ws: str, args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["review", *args, "-w", ws])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
