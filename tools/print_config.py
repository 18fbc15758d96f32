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

from megatron_hapo.config import Config, ConfigError, ConfigWarning, field_docs, load_config, to_tree


def _documented_lines(obj: object, indent: int = 0) -> list[str]:
    """YAML lines of a config dataclass with each field's docstring as a comment above it."""
    lines, pad, docs = [], "  " * indent, field_docs(type(obj))
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        lines.append(f"{pad}# {docs.get(f.name, '')}")
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{f.name}:")
            lines.extend(_documented_lines(value, indent + 1))
        else:
            rendered = yaml.safe_dump({f.name: to_tree(value)}, default_flow_style=True, width=1000).strip()
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
