#!/usr/bin/env python
"""Print the resolved configuration: a YAML file plus dotted overrides, type-checked and validated.

    python tools/print_config.py configs/algo/hapo.yaml algo.clip.eps_high=0.28
    python tools/print_config.py configs/algo/dapo.yaml --docs      # every field with its documentation

Exit status 2 with a message naming the key when the config is invalid; knobs that have no effect in the chosen
composition are reported as warnings on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings

import yaml

from megatron_hapo.algos import REGISTRIES
from megatron_hapo.config import Config, ConfigError, ConfigWarning, field_docs, load_config, to_tree


def _documented_lines(obj: object, indent: int = 0, section: str = "") -> list[str]:
    """YAML lines of a config dataclass with each field's docstring as a comment above it (a plugin kind's
    declared fields beside the built-in ones, with their ``PluginField.doc``)."""
    lines, pad, docs = [], "  " * indent, field_docs(type(obj))
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    plugin_values = values.pop("plugin_fields", {})
    if plugin_values:
        declared = dict(REGISTRIES[section].get(values["kind"]).fields)
        docs |= {name: f"{declared[name].doc} (plugin field of kind {values['kind']!r})" for name in plugin_values}
    for name, value in (values | plugin_values).items():
        lines.append(f"{pad}# {docs.get(name, '')}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{name}:")
            lines.extend(_documented_lines(value, indent + 1, name))
        else:
            rendered = yaml.safe_dump({name: to_tree(value)}, default_flow_style=True, width=1000).strip()
            lines.append(f"{pad}{rendered[1:-1]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config file (e.g. configs/algo/hapo.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. algo.clip.eps_high=0.28")
    parser.add_argument("--docs", action="store_true", help="annotate every field with its documentation")
    args = parser.parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        try:
            config: Config = load_config(args.config, args.overrides)
        except ConfigError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    if args.docs:
        print("\n".join(_documented_lines(config)))
    else:
        print(yaml.safe_dump(to_tree(config), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
