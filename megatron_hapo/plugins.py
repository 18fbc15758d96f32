"""Users' modules, imported by name: ``algo.plugins`` (new algorithm kinds) and reward functions by reference.

A plugin is a dotted module name (importable from the working directory or the environment) or a path to a
``.py`` file. Importing it runs its top level, where it registers kinds on the component registries
(``@ADVANTAGE.register(...)`` from :mod:`megatron_hapo.algos`), like the built-in ones. ``algo.plugins`` are
imported before the config is typed and validated, in the launching process and again in every rank (ranks are
separate processes), so that their kinds and fields are known everywhere the built-in ones are. This module
imports nothing heavy (the verifier workers use it).

Only modules the user names are imported: nothing in a data file or a checkpoint is ever run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any


class PluginError(ValueError):
    """A plugin that cannot be imported or registers what it may not (one line, names the plugin)."""


def import_module(name: str) -> Any:
    """Import ``name``: a dotted module name, or a path to a ``.py`` file (imported once per process, under a
    name made from its resolved path)."""
    if not name.endswith(".py"):
        return importlib.import_module(name)
    path = Path(name).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{name}: no such file")
    module_name = f"megatron_hapo_plugin_{path.stem}_{zlib.crc32(str(path).encode()):08x}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None  # a .py file that exists
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def import_plugins(names: Iterable[str], key: str = "algo.plugins") -> None:
    """Import each plugin of ``names`` (once per process); :class:`PluginError` naming ``key`` and the plugin
    when one fails (a missing module, an error at its top level, a kind registered twice)."""
    for name in names:
        try:
            import_module(name)
        except Exception as exc:
            raise PluginError(f"{key}: {name!r} failed to import: {type(exc).__name__}: {exc}") from exc


def load_function(reference: str, key: str) -> Callable[..., Any]:
    """The function ``reference`` names (``module:function`` / ``path/to/file.py:function``); :class:`PluginError`
    naming ``key`` when the module fails to import or has no such function."""
    module_name, sep, attribute = reference.rpartition(":")
    if not sep or not module_name or not attribute:
        raise PluginError(f"{key}={reference!r}: name a function as 'package.module:function' or 'file.py:function'")
    try:
        module = import_module(module_name)
    except Exception as exc:
        raise PluginError(f"{key}={reference!r}: importing {module_name} failed: {exc!r}") from exc
    function = getattr(module, attribute, None)
    if not callable(function):
        raise PluginError(f"{key}={reference!r}: {module_name} has no function {attribute!r}")
    return function
