"""No import cycles among visrl's modules, read from the source (ast), nothing imported.

Every ``import`` counts, at module level or inside a function: a function-level import that closes
a cycle is a cycle postponed, not removed (``judges`` built the policy judge of ``crop_judge``,
which imported ``judges``'s types). Two kinds of import do not count:

- those under ``if TYPE_CHECKING:`` (never run);
- a package's function-level imports of its own submodules: ``visrl.cli`` adds its commands and
  ``visrl.formats.import_file`` picks an importer that way, after the package has loaded. The
  submodule importing its package is the ordinary direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "visrl"

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, in_function: bool = False) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import node, inside a function) for every import under ``tree``, TYPE_CHECKING blocks left out."""
    return _imports_of(list(ast.iter_child_nodes(tree)), in_function)


def _imports_of(nodes: list[ast.AST], in_function: bool) -> list[tuple[ast.Import | ast.ImportFrom, bool]]:
    found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node):
            found += _imports_of(node.orelse, in_function)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append((node, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        found += _imports(node, inner)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the visrl modules it imports (see the module doc for what counts)."""
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        targets: set[str] = set()
        for node, in_function in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                named = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from visrl.formats import trl` imports the submodule; `import X` of a name, the module
                named = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            for target in named:
                while target and target not in paths:  # `import visrl.a.b` names visrl.a.b
                    target = target.rpartition(".")[0]
                own_child = is_package and in_function and target.startswith(f"{name}.")
                if target and target != name and not own_child:
                    targets.add(target)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_graph_sees_imports_at_every_level() -> None:
    graph = import_graph()
    assert "visrl.crop_judge" in graph["visrl.judges"]  # inside make_judges
    assert "visrl.remote" in graph["visrl.reasoning"]  # inside the module __getattr__
    assert "visrl.cli.data" not in graph["visrl.cli"]  # a package adding its own commands
    assert "visrl.cli" in graph["visrl.cli.data"]


def test_type_checking_imports_do_not_count() -> None:
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n"
              "def f():\n    import c\n")
    found = [(node.names[0].name, inside) for node, inside in _imports(ast.parse(source))]
    assert found[1:] == [("b", False), ("c", True)]


def test_cycles_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_visrl_has_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(cycle) for cycle in found)
