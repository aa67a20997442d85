"""The app's wiring: outputs by name, never by position; vocabularies and lookups from the library.

:func:`positional_wiring` reads the source of every ``visrl_app`` module that wires gradio events
and reports three patterns, each a way for a handler's values and its outputs list to drift apart:

- an input or output list indexed by a number: ``outputs[3]``, ``monitor["outputs"][3]``,
  ``filters[-6:]`` where ``filters`` is a handler's ``*args`` or a list an event takes;
- a handler returning (or yielding) a tuple of four or more values, or one that splices another
  result in (``return (*job_view(...), *controls(job))``);
- a view (a ``NamedTuple`` of :mod:`visrl_app.components`) built from four or more positional values.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from test_app import seed_pairs

import visrl_app

APP = Path(visrl_app.__file__).resolve().parent
# gradio event listeners (and ``.then``/``.load``) that take (fn, inputs, outputs)
EVENTS = {"click", "change", "input", "submit", "release", "select", "tick", "load", "then", "success",
          "upload", "clear", "focus", "blur", "key_up", "stream", "edit", "like"}
LIST_KEYS = {"inputs", "outputs", "load_inputs", "load_outputs"}  # names of component lists
MAX_VALUES = 3  # a handler may return this many values as a plain tuple


def _is_event(node: ast.AST) -> bool:
    """``x.click(fn, inputs, outputs)``-shaped: an event listener given its outputs."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in EVENTS):
        return False
    kwargs = {k.arg for k in node.keywords}
    return len(node.args) >= 3 or "outputs" in kwargs or (len(node.args) >= 2 and None in kwargs)


def _number(node: ast.AST | None) -> bool:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) is int


def _by_number(index: ast.AST) -> bool:
    """``[3]``, ``[-6:]``, ``[:-1]``, ``[1:4]``: an index or slice made of integer literals only."""
    if isinstance(index, ast.Slice):
        bounds = [b for b in (index.lower, index.upper, index.step) if b is not None]
        return bool(bounds) and all(_number(b) for b in bounds)
    return _number(index)


def _names_in(node: ast.AST | None) -> set[str]:
    """Names of a list an event takes: ``outputs``, ``[state, *edits, *filters]``."""
    if isinstance(node, ast.Name):
        return {node.id}
    if isinstance(node, (ast.List, ast.Tuple)):
        return {e.value.id for e in node.elts if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name)}
    return set()


def _is_list_key(node: ast.AST) -> bool:
    """``outputs``, ``tab.outputs``, ``monitor["outputs"]``."""
    if isinstance(node, ast.Name):
        return node.id in LIST_KEYS
    if isinstance(node, ast.Attribute):
        return node.attr in LIST_KEYS
    return (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)
            and node.slice.value in LIST_KEYS)


def _long_tuple(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Tuple) and (
        len(node.elts) > MAX_VALUES or (len(node.elts) > 1 and any(isinstance(e, ast.Starred) for e in node.elts)))


def view_names(trees: list[ast.Module]) -> set[str]:
    """Classes deriving from ``NamedTuple`` and names bound to ``joined(...)``."""
    names = set()
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", None)) == "NamedTuple" for b in node.bases):
                names.add(node.name)
            if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                    and getattr(node.value.func, "id", None) == "joined"):
                names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


class _Checker(ast.NodeVisitor):
    def __init__(self, component_lists: set[str], views: set[str]) -> None:
        self.component_lists, self.views = component_lists, views
        self.varargs: list[set[str]] = [set()]
        self.found: list[tuple[int, str]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.varargs.append(self.varargs[-1] | ({node.args.vararg.arg} if node.args.vararg else set()))
        self.generic_visit(node)
        self.varargs.pop()

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_Subscript(self, node: ast.Subscript) -> None:
        target = node.value
        if _by_number(node.slice) and (
                _is_list_key(target)
                or (isinstance(target, ast.Name)
                    and (target.id in self.varargs[-1] or target.id in self.component_lists))):
            self.found.append((node.lineno, f"inputs or outputs by position: {ast.unparse(node)}"))
        self.generic_visit(node)

    def _returned(self, value: ast.AST | None, line: int) -> None:
        if _long_tuple(value):
            self.found.append((line, f"a positional tuple of outputs: {ast.unparse(value)[:60]}"))

    def visit_Return(self, node: ast.Return) -> None:
        self._returned(node.value, node.lineno)
        self.generic_visit(node)

    def visit_Yield(self, node: ast.Yield) -> None:
        self._returned(node.value, node.lineno)
        self.generic_visit(node)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._returned(node.body, node.lineno)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        name = getattr(node.func, "id", getattr(node.func, "attr", None))
        spliced = len(node.args) == 1 and isinstance(node.args[0], ast.Starred)
        if name in self.views and len(node.args) > MAX_VALUES and not spliced:
            self.found.append((node.lineno, f"a view built by position: {name}(...)"))
        self.generic_visit(node)


def positional_wiring(sources: dict[str, str]) -> list[str]:
    """``path:line: what`` for each positional wiring in ``sources`` (path -> module text) that
    wire events; modules without event listeners are not read."""
    trees = {path: ast.parse(text) for path, text in sources.items()}
    views = view_names(list(trees.values()))
    found = []
    for path, tree in trees.items():
        events = [node for node in ast.walk(tree) if _is_event(node)]
        if not events:
            continue
        lists: set[str] = set()
        for call in events:
            kw = {k.arg: k.value for k in call.keywords}
            for node in (*call.args[1:3], kw.get("inputs"), kw.get("outputs")):
                lists |= _names_in(node)
        checker = _Checker(lists, views)
        checker.visit(tree)
        found += [f"{path}:{line}: {what}" for line, what in sorted(checker.found)]
    return found


def app_sources() -> dict[str, str]:
    return {path.name: path.read_text(encoding="utf-8") for path in sorted(APP.glob("*.py"))}


def test_no_app_handler_wires_outputs_by_position() -> None:
    assert positional_wiring(app_sources()) == []


PLANTED = '''
import functools
from typing import NamedTuple

class PairView(NamedTuple):
    a: int
    b: int
    c: int
    d: int

def run(ctx, state, *filters):
    *flt, sort = filters[-6:]                     # flagged (a handler's *args)
    own = filters[:-6]                            # flagged
    return handler(ctx, state, *own)

def view(ctx, job):
    return (status(job), bar(job), log, rows)     # flagged (4 values)

def panel(ctx, job):
    return (*view(ctx, job), *controls(job))      # flagged (spliced)

def stream():
    yield None, None, "", "", "error"             # flagged

def build(monitor, tab, outputs):
    history = monitor["outputs"][3]               # flagged
    first = tab.outputs[0]                        # flagged
    button.click(fn, [state, *edits], outputs)
    edits[1].change(fn, None, [x])                # flagged (a list an event takes)
    other.input(lambda: (1, 2, 3, 4), None, outputs)   # flagged
    return PairView(1, 2, 3, 4)                   # flagged

def fine(ctx, rows, evt, *values):
    name = files[0]
    row = evt.index[0]
    kept = history[-HISTORY_LIMIT:]
    label = text[:40]
    cell = rows[row][0]
    values_seen = len(values)
    view = PairView(*values)
    named = PairView(a=1, b=2, c=3, d=4)
    pair = choices[-1][1]
    return name, row, kept
'''

NOT_WIRED = '''
def pair_images(ctx, pair, *rest):
    return shown, crops[0], crops[1], scale, rest[0]
'''


def test_the_checker_finds_planted_positional_wiring_and_nothing_else() -> None:
    found = positional_wiring({"planted.py": PLANTED, "helpers.py": NOT_WIRED})
    planted = [number for number, line in enumerate(PLANTED.splitlines(), 1) if "# flagged" in line]
    assert len(planted) == 10 and [int(entry.split(":")[1]) for entry in found] == planted, found
    assert found[0] == f"planted.py:{planted[0]}: inputs or outputs by position: filters[-6:]"
    assert found[-1] == f"planted.py:{planted[-1]}: a view built by position: PairView(...)"


def test_the_checker_reads_the_app_it_guards() -> None:
    """It reads the tab modules (they wire events) and knows their views: a rename that hid them
    from the checker would make the first test pass vacuously."""
    sources = app_sources()
    wired = {path for path, text in sources.items() if any(_is_event(n) for n in ast.walk(ast.parse(text)))}
    assert {"components.py", "chat_tab.py", "evaluate_tab.py", "generate_tab.py", "job_panel.py", "pairs_tab.py",
            "pairs_export.py", "train_tab.py"} <= wired
    views = view_names([ast.parse(text) for text in sources.values()])
    assert {"PairView", "BulkView", "JobView", "PanelView", "LatestJob", "ChatView", "Comparison",
            "GenerateLoad", "TrainLoad", "EvalLoad", "GenerateForm", "Filters"} <= views


# ---------------------------------------------------------------------- the tabs' named sets

@pytest.fixture
def ctx(tmp_path: Path) -> Any:
    from visrl_app.context import AppContext

    return AppContext.open(seed_pairs(tmp_path / "ws"))


def test_each_tab_loads_a_view_named_after_its_components(ctx: Any) -> None:
    """Each tab's page load returns a view whose fields are the components it fills, by name."""
    import gradio as gr

    from visrl_app.chat_tab import create_chat_tab
    from visrl_app.evaluate_tab import create_evaluate_tab
    from visrl_app.generate_tab import create_generate_tab
    from visrl_app.pairs_tab import create_pairs_tab
    from visrl_app.train_tab import create_train_tab

    with gr.Blocks():
        tabs = {create: create(ctx) for create in (create_pairs_tab, create_generate_tab, create_train_tab,
                                                   create_evaluate_tab, create_chat_tab)}
    pairs, generate, train, evaluate, chat = tabs.values()
    assert pairs.load_outputs == ("annotator", "chosen_crop", "rejected_crop", "info", "chosen_answer",
                                  "rejected_answer", "progress", "ticket", "history", "state")
    assert pairs.load_inputs == ("state", "status", "dataset", "min_margin", "max_margin", "search", "sort")
    panel = ("job_state", "status", "progress", "log", "history", "loss", "start", "stop", "kill")
    assert train.load_outputs == (*panel, "stage", "recipe", "code")
    assert generate.load_outputs == (*panel, "model", "limit", "ready")
    assert evaluate.load_outputs == (*panel, "table", "metric", "baseline", "plot", "note", "model", "ready")
    assert chat.load_outputs == ("model",)
    assert train.components["history"].elem_id == "train-history"
    assert [c.elem_id for c in evaluate.components.pick("start", "table", "plot")] == [
        "eval-start", "eval-table", "eval-plot"]
    view = train.load(*[component.value for component in train.components.pick(*train.load_inputs)])
    assert view._fields == train.load_outputs and view.job_state is None
    inputs = generate.components.pick(*generate.load_inputs)
    view = generate.load(*[component.value for component in inputs])
    assert view._fields == generate.load_outputs and view.ready.startswith("⚠️")  # no model in this workspace


def test_components_refuse_a_name_taken_by_another_component() -> None:
    from visrl_app.components import Components, fields, joined

    first, second = object(), object()
    parts = Components(history=first)
    parts.add(history=first)  # the same component again: fine
    with pytest.raises(KeyError, match="'history' is taken"):
        parts.add(history=second)
    with pytest.raises(KeyError, match="no component named 'log'"):
        parts.pick("history", "log")
    assert fields(joined("Both", "job_state", joined("Inner", "a", "b"), "c")) == ("job_state", "a", "b", "c")


# ---------------------------------------------------------------------- one source per name

def test_generate_tab_offers_the_library_judges(ctx: Any) -> None:
    """The Crop judge list is visrl.judges' (it lacked ``policy``); a policy judge gets its model
    folder from the form, with no server or key."""
    import gradio as gr

    from visrl.judges import ANSWER_JUDGES, CROP_JUDGES
    from visrl_app import generate_tab

    with gr.Blocks():
        tab = generate_tab.create_generate_tab(ctx)
    choices = {name: [value for _, value in tab.components[name].choices] for name in ("answer_judge", "crop_judge")}
    assert choices == {"answer_judge": list(ANSWER_JUDGES), "crop_judge": list(CROP_JUDGES)}
    assert "policy" in choices["crop_judge"]
    (ctx.root / "models" / "base").mkdir(parents=True)
    (ctx.root / "models" / "base" / "config.json").write_text("{}")
    config = generate_tab.compose_config(ctx, "models/base", "shapes", "train", 2, 1, 1.0, "exact", "policy",
                                         "http://ignored/v1", "models/judge", "IGNORED")
    assert (config["crop_judge"], config["judge_model"]) == ("policy", "models/judge")
    assert "judge_base_url" not in config and "judge_api_key_env" not in config


def test_export_panel_offers_the_library_statuses(ctx: Any) -> None:
    import gradio as gr

    from visrl.review import STATUSES
    from visrl_app.pairs_export import create_export_panel

    with gr.Blocks() as blocks:
        create_export_panel(ctx, gr.Dropdown(["any"], value="any"))
    [statuses] = [b for b in blocks.blocks.values() if isinstance(b, gr.CheckboxGroup)]
    assert [value for _, value in statuses.choices] == ["accepted", "pending", "rejected"] == sorted(STATUSES)


def test_an_adapter_resolves_to_the_base_loading_uses(ctx: Any) -> None:
    """The adapter's own record names its base first (visrl.models.split_adapter), over peft's
    field and over a store row; a base inside the workspace is given relative to it."""
    import json

    from visrl.contract import CONTRACT_FILE
    from visrl_app.context import resolve_model

    for name in ("merged", "raw"):
        (ctx.root / "models" / name).mkdir(parents=True)
        (ctx.root / "models" / name / "config.json").write_text("{}")
    lora = ctx.root / "models" / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/raw"}))
    assert resolve_model(ctx, "models/lora") == ("models/raw", "models/lora")  # peft's field alone
    (lora / CONTRACT_FILE).write_text(json.dumps({"base": {"name": str(ctx.root / "models" / "merged")}}))
    ctx.store.add_checkpoint("models/lora", "models/raw", "sft")
    assert resolve_model(ctx, "models/lora") == ("models/merged", "models/lora")
    assert resolve_model(ctx, "models/merged") == ("models/merged", None)
    (lora / CONTRACT_FILE).write_text(json.dumps({"base": {"name": "org/hub-model"}}))
    assert resolve_model(ctx, "models/lora") == ("org/hub-model", "models/lora")  # a Hub id stays an id
