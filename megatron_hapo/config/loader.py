"""YAML loading with dotted command-line overrides, strict keys and strict types.

``load_config("configs/algo/hapo.yaml", ["algo.clip.eps_high=0.28"])`` reads the file (and any files named by its
``base:`` key, merged first, paths relative to the file), applies the overrides (values parsed as YAML), builds
the typed dataclasses and validates them. An unknown key raises :class:`ConfigError` naming the key and the
closest valid one; a wrong type names the key, the expected type and the value.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from megatron_hapo.config.errors import ConfigError
from megatron_hapo.config.run import Config
from megatron_hapo.config.validation import no_effect_warnings, validate

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

_Dataclass = TypeVar("_Dataclass", bound="DataclassInstance")


#: Keys renamed since an earlier release: a config that still uses one gets the new name in one line.
RENAMED = {"output.eval_k": "output.eval.n"}
#: The field of a component section that holds its plugin kind's declared fields (never a key users write).
PLUGIN_FIELDS = "plugin_fields"


@dataclasses.dataclass(frozen=True)
class Override:
    """An override's value as typed (``text``) and as YAML reads it: a text field takes the text verbatim
    (``output.dir=/runs/exp #2`` keeps its ``#2``, which YAML reads as a comment), every other field the YAML
    value; ``null`` is ``None`` where the field allows it."""

    origin: str
    text: str

    def __repr__(self) -> str:  # shown in error messages as the value typed
        return repr(self.text.strip())

    def parsed(self) -> Any:
        """The YAML value (a mapping, a list, a number, ``None``); one line naming the override when invalid."""
        try:
            return yaml.safe_load(self.text) if self.text.strip() else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"override {self.origin!r}: cannot parse value {self.text!r}: {err}") from None

    def for_type(self, tp: Any) -> Any:
        """The value for a field annotated ``tp``."""
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        text = self.text.strip()
        options = args if origin in (typing.Union, types.UnionType) else (tp,)
        if text == "null" and type(None) in options:
            return None
        if str in options or (origin is typing.Literal and text in args):
            return text
        if getattr(tp, "SHORTHAND", None) and not text.startswith("{"):  # a path standing for {file: path}
            return text
        return self.parsed()


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"algo.clip.eps_high=0.28"`` -> ``(["algo", "clip", "eps_high"], 0.28)`` (value parsed as YAML; the
    loader keeps the text as typed for text fields: :class:`Override`)."""
    keys, value = parse_override_text(text)
    return keys, value.parsed()


def parse_override_text(text: str) -> tuple[list[str], Override]:
    """``"output.dir=/runs/exp #2"`` -> ``(["output", "dir"], Override(...))``: typed when the field is known."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form dotted.key=value (e.g. algo.clip.eps_high=0.28)")
    return key.strip().split("."), Override(text, raw)


def _set_dotted(tree: dict[str, Any], path: list[str], value: Any, origin: str) -> None:
    node = tree
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: '{'.'.join(path[: depth + 1])}' is a value, not a section")
        node = child
    node[path[-1]] = value


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file as a nested dict, resolving its ``base:`` files (merged first, in order)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base' files form a cycle: {' -> '.join(map(str, (*_seen, path)))}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(tree).__name__}")
    bases = tree.pop("base", [])
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, read_yaml_tree(path.parent / base, (*_seen, path)))
    return _deep_merge(merged, tree)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


#: Exponent floats that YAML 1.1 leaves as strings: ``1e-3``, ``5E+2``, ``-2e6``.
_YAML11_FLOAT = re.compile(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+")


def _coerce_container(value: Any, tp: Any, where: str) -> Any:
    """A list, mapping, fixed-length tuple or nested config dataclass (``tp``), each item coerced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of names, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    shorthand = getattr(tp, "SHORTHAND", None)  # a plain value standing for {SHORTHAND: value}
    if shorthand is not None and not isinstance(value, dict):
        value = {shorthand: value}
    return build_dataclass(tp, value, where)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (ints widen to floats; NaN and infinity are refused); raise
    ConfigError otherwise."""
    if isinstance(value, Override):
        value = value.for_type(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, dict, tuple) or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return _coerce_container(value, tp, where)
    widens = isinstance(value, int) and not isinstance(value, bool)
    exponent = isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip())  # YAML 1.1 keeps "1e-3" a string
    if tp is float and (widens or exponent):
        value = float(value)
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (parsed from its source and its bases')."""
    docs: dict[str, str] = {}
    for base in cls.__bases__:
        if dataclasses.is_dataclass(base):
            docs |= field_docs(base)
    return docs | _own_field_docs(cls)


def _own_field_docs(cls: type) -> dict[str, str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for stmt, nxt in itertools.pairwise(body):
        is_field = isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
        is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
        if is_field and is_doc:
            docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _declared_fields(cls: type, data: dict[str, Any], where: str) -> dict[str, Any]:
    """The fields that the chosen kind of component section ``where`` declares itself (a plugin kind's
    :class:`~megatron_hapo.algos.PluginField` by name); empty for built-in and unknown kinds (validation names
    an unknown kind)."""
    from megatron_hapo.algos import REGISTRIES  # noqa: PLC0415  (plugins have registered by now)

    registry = REGISTRIES.get(where.rsplit(".", 1)[-1])
    default = next(f.default for f in dataclasses.fields(cls) if f.name == "kind")
    kind = data.get("kind", default)
    kind = kind.for_type(str) if isinstance(kind, Override) else kind
    if registry is None or not isinstance(kind, str) or kind not in registry:
        return {}
    return dict(registry.get(kind).fields)


def build_dataclass(cls: type[_Dataclass], data: dict[str, Any], where: str = "") -> _Dataclass:
    """Instantiate config dataclass ``cls`` from a nested dict, rejecting unknown keys and wrong types. In a
    component section, the fields its (plugin) kind declares are taken as well, into ``plugin_fields``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    component = PLUGIN_FIELDS in [f.name for f in dataclasses.fields(cls)]
    declared = _declared_fields(cls, data, where) if component else {}
    names = [f.name for f in dataclasses.fields(cls) if f.name != PLUGIN_FIELDS] + list(declared)
    kwargs: dict[str, Any] = {PLUGIN_FIELDS: {}} if component else {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if dotted in RENAMED:
            raise ConfigError(f"config key '{dotted}' is now '{RENAMED[dotted]}'; rename it")
        if key in declared:
            kwargs[PLUGIN_FIELDS][key] = _coerce(value, declared[key].type, dotted)
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{where + '.' if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{dotted}'{hint} (valid keys here: {', '.join(names)})")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value.parsed() if isinstance(value, Override) else value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing {', '.join(repr(m) for m in missing)}")
    for name, spec in declared.items():
        kwargs[PLUGIN_FIELDS].setdefault(name, spec.default)
    return cls(**kwargs)


def import_config_plugins(tree: dict[str, Any]) -> None:
    """Import the ``algo.plugins`` of an untyped config tree (before it is typed: their kinds and fields must be
    known to type it); a plugin that fails is a :class:`ConfigError` naming it."""
    from megatron_hapo.plugins import PluginError, import_plugins  # noqa: PLC0415

    algo = tree.get("algo")
    plugins = algo.get("plugins") if isinstance(algo, dict) else None
    if plugins is None:
        return
    try:
        import_plugins(_coerce(plugins, list[str], "algo.plugins"))
    except PluginError as exc:
        raise ConfigError(str(exc)) from None


def to_tree(obj: Any) -> Any:
    """A config dataclass as plain nested dicts / lists (YAML-ready)."""
    if dataclasses.is_dataclass(obj):  # a plugin kind's fields beside the built-in ones, as they are set
        tree = {f.name: to_tree(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != PLUGIN_FIELDS}
        return tree | dict(getattr(obj, PLUGIN_FIELDS, {}))
    if isinstance(obj, tuple | list):
        return [to_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_tree(v) for k, v in obj.items()}
    return obj


def resolve_tree(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """The merged nested dict of a config file plus overrides (not yet typed)."""
    tree = read_yaml_tree(path) if path is not None else {}
    for text in overrides:
        keys, value = parse_override_text(text)
        _set_dotted(tree, keys, value, f"override {text!r}")
    return tree


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), *, warn: bool = True
) -> Config:
    """Load, override, type-check and validate a configuration.

    Args:
        path: a YAML file (``None``: defaults only).
        overrides: ``dotted.key=value`` strings applied after the file.
        warn: emit :class:`ConfigWarning` for knobs that have no effect in the chosen composition.

    Raises:
        ConfigError: unknown key, wrong type, out-of-range value or inconsistent combination.
    """
    tree = resolve_tree(path, overrides)
    import_config_plugins(tree)
    config = build_dataclass(Config, tree)
    validate(config)
    if warn:
        no_effect_warnings(config, emit=True)
    return config
