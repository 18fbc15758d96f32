"""One small registry per algorithm component: kind name -> function, plus the config fields that kind reads.

The declared ``uses`` serve two purposes: the composition passes exactly those fields to the function (never
the whole config), and config validation warns when a field the chosen kind does not read was changed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Entry:
    """A registered kind.

    Attributes:
        kind: the name used in configs.
        fn: the implementation.
        uses: names of the component-config fields the kind reads.
        needs_entropy: the kind consumes token entropies (or ``h_hat`` derived from them).
    """

    kind: str
    fn: Callable[..., Any]
    uses: tuple[str, ...]
    needs_entropy: bool


class Registry:
    """Kinds of one component (e.g. ``advantage``). Unknown or duplicate kinds raise ``ValueError``."""

    def __init__(self, component: str) -> None:
        self.component = component
        self._entries: dict[str, Entry] = {}

    def register(
        self, kind: str, *, uses: tuple[str, ...] = (), needs_entropy: bool = False
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` under ``kind``."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if kind in self._entries:
                raise ValueError(f"{self.component} kind {kind!r} is already registered")
            self._entries[kind] = Entry(kind=kind, fn=fn, uses=tuple(uses), needs_entropy=needs_entropy)
            return fn

        return decorator

    def get(self, kind: str) -> Entry:
        """The entry for ``kind``; ``ValueError`` listing the valid kinds if unknown."""
        try:
            return self._entries[kind]
        except KeyError:
            raise ValueError(
                f"unknown {self.component} kind {kind!r}; valid kinds: {', '.join(self.kinds())}"
            ) from None

    def kinds(self) -> tuple[str, ...]:
        """Registered kinds, in registration order."""
        return tuple(self._entries)

    def params(self, kind: str, component_config: Any) -> dict[str, Any]:
        """The fields of ``component_config`` that ``kind`` reads and its function takes, as keyword arguments."""
        entry = self.get(kind)
        accepted = inspect.signature(entry.fn).parameters
        return {name: getattr(component_config, name) for name in entry.uses if name in accepted}

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries
