"""Each tab's components by name, and the views that fill them.

A tab registers its components in a :class:`Components` mapping (name -> gradio component), as
LLaMA-Factory's web UI manager does. A handler that fills several components returns a *view*: a
``NamedTuple`` whose field names are component names. The event's outputs list is built from
those names (:meth:`Components.outputs`), so a handler's values and its outputs list take their
order from one place and cannot drift apart. Gradio reads a view as the tuple it is; tests read
it by field name or unpack it. Inputs are picked by name the same way (:meth:`Components.pick`),
in the order of the handler's parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple


def fields(*parts: type | str) -> tuple[str, ...]:
    """The field names of ``parts``: views (their fields, in order) and single names."""
    names: list[str] = []
    for part in parts:
        names.extend([part] if isinstance(part, str) else part._fields)  # type: ignore[attr-defined]
    return tuple(names)


def joined(name: str, *parts: type | str) -> type:
    """A view whose fields are ``parts``' fields in order (e.g. a tab's page load: the watched
    job's panel, then the tab's own outputs). A name given twice is a ValueError."""
    return NamedTuple(name, [(field, Any) for field in fields(*parts)])  # type: ignore[misc]


class Components(dict[str, Any]):
    """One tab's components by name (a plain dict: ``components["history"]``)."""

    def add(self, **components: Any) -> None:
        """Register ``components``; a name already bound to another component is a KeyError
        (two parts of a tab must not claim one name)."""
        for name, component in components.items():
            if name in self and self[name] is not component:
                raise KeyError(f"component name {name!r} is taken by another component of this tab")
            self[name] = component

    def merge(self, other: Components) -> Components:
        """Add every component of ``other`` (a panel inside this tab); returns self."""
        self.add(**other)
        return self

    def pick(self, *names: str) -> list[Any]:
        """The components called ``names``, in that order (an event's inputs or outputs)."""
        missing = [name for name in names if name not in self]
        if missing:
            raise KeyError(f"no component named {', '.join(map(repr, missing))} in this tab "
                           f"(it has {', '.join(sorted(self))})")
        return [self[name] for name in names]

    def outputs(self, *parts: type | str) -> list[Any]:
        """The components a view fills, in its fields' order (see :func:`fields`)."""
        return self.pick(*fields(*parts))


@dataclass(frozen=True)
class Tab:
    """A built tab: its components by name, and what it does when a page opens.

    ``load`` is called with the components named ``load_inputs`` and fills those named
    ``load_outputs`` (the fields of the view it returns, or one name for a single value)."""

    components: Components
    load: Callable[..., Any]
    load_inputs: tuple[str, ...]
    load_outputs: tuple[str, ...]

    def wire_load(self, blocks: Any) -> None:
        blocks.load(self.load, self.components.pick(*self.load_inputs),
                    self.components.pick(*self.load_outputs), api_visibility="undocumented")
