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
class PluginField:
    """A config field that a kind registered outside the package declares for itself (``register(fields=)``):
    set as ``algo.<component>.<name>`` like a built-in field, type-checked, shown by ``print_config`` and kept in
    the run's ``config.json``."""

    type: type
    """``bool``, ``int``, ``float`` or ``str``."""
    default: Any
    """The value when the config does not set it."""
    doc: str = ""
    """One line for ``print_config``."""


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
        fields: config fields the kind declares itself (a plugin's), by name.
    """

    kind: str
    fn: Callable[..., Any]
    uses: tuple[str, ...]
    needs_entropy: bool
    read_by: tuple[tuple[str, str], ...] = ()
    whole_sequences: bool = False
    fields: tuple[tuple[str, PluginField], ...] = ()

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
        fields: dict[str, PluginField] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator registering ``fn`` under ``kind``; ``ValueError`` when ``fn`` does not take a ``uses`` field,
        or a declared field is not one of ``uses`` or has a default of another type."""

        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if kind in self._entries:
                raise ValueError(f"{self.component} kind {kind!r} is already registered")
            for name, spec in (fields or {}).items():
                if name not in uses or spec.type not in (bool, int, float, str) or type(spec.default) is not spec.type:
                    raise ValueError(
                        f"{self.component} kind {kind!r}: field {name!r} must be in uses and have a bool, int, float "
                        f"or str type with a default of that type (got {spec.type.__name__} = {spec.default!r})"
                    )
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
                fields=tuple((fields or {}).items()),
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
        """The fields of ``component_config`` that ``kind``'s function takes, as keyword arguments (a plugin's
        declared fields from the config's ``plugin_fields``, else their defaults)."""
        entry = self.get(kind)
        declared = dict(entry.fields)
        values = getattr(component_config, "plugin_fields", {})
        return {
            name: values.get(name, declared[name].default) if name in declared else getattr(component_config, name)
            for name in entry.uses
        }

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries
