"""One small registry per algorithm component: kind name -> function, plus the config fields that kind reads.

The declared ``uses`` serve two purposes: the composition passes exactly those fields to the function (never
the whole config), and config validation warns when a field the chosen kind does not read was changed. A field
that the kind's behaviour depends on but that is read outside its function (the surrogate's dual clip, the
rollout's top-p, the trainer's generation rounds) is declared in ``read_by`` with the module that reads it; a
``uses`` field the function does not take is an error, never dropped (``tests/unit/test_compose.py`` checks
every registered kind, and that each ``read_by`` module reads its field).
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
        uses: names of the component-config fields the kind's function takes (passed by :meth:`Registry.params`).
        needs_entropy: the kind consumes token entropies (or ``h_hat`` derived from them).
        read_by: component-config fields the kind depends on that are read outside its function, each with the
            module that reads it.
        whole_sequences: the kind needs every token of a sequence on one rank (a sequence-level ratio or a
            per-sequence mean), so context parallelism, which splits sequences, cannot compute it.
    """

    kind: str
    fn: Callable[..., Any]
    uses: tuple[str, ...]
    needs_entropy: bool
    read_by: tuple[tuple[str, str], ...] = ()
    whole_sequences: bool = False

    @property
    def knobs(self) -> tuple[str, ...]:
        """Every component-config field this kind reads, in its function or elsewhere."""
        return self.uses + tuple(name for name, _ in self.read_by)


class Registry:
    """Kinds of one component (e.g. ``advantage``). Unknown or duplicate kinds raise ``ValueError``."""

    def __init__(self, component: str) -> None:
        self.component = component
        self._entries: dict[str, Entry] = {}

    def register(
        self,
        kind: str,
        *,
        uses: tuple[str, ...] = (),
        needs_entropy: bool = False,
        read_by: dict[str, str] | None = None,
        whole_sequences: bool = False,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` under ``kind``; ``ValueError`` when ``fn`` does not take a ``uses`` field."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if kind in self._entries:
                raise ValueError(f"{self.component} kind {kind!r} is already registered")
            accepted = inspect.signature(fn).parameters
            if dropped := [name for name in uses if name not in accepted]:
                raise ValueError(
                    f"{self.component} kind {kind!r} declares uses={dropped} that its function does "
                    "not take: pass them to it, or declare them in read_by with their reader"
                )
            self._entries[kind] = Entry(
                kind=kind,
                fn=fn,
                uses=tuple(uses),
                needs_entropy=needs_entropy,
                read_by=tuple((read_by or {}).items()),
                whole_sequences=whole_sequences,
            )
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
        """The fields of ``component_config`` that ``kind``'s function takes, as keyword arguments."""
        return {name: getattr(component_config, name) for name in self.get(kind).uses}

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries
