"""The configuration files shipped inside the package (``megatron_hapo/configs/``; ``configs/`` in a checkout
is a link to it): algorithm presets, run configs and architecture-only model configs. Found through the package,
so they work in any install, editable or not."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

#: ``megatron_hapo/configs`` of the installed package.
CONFIG_ROOT = Path(str(resources.files("megatron_hapo") / "configs"))


def preset_path(name: str) -> Path:
    """The algorithm preset ``configs/algo/<name>.yaml`` (e.g. ``hapo``); raises naming the shipped ones."""
    path = CONFIG_ROOT / "algo" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no algorithm preset {name!r}; shipped: {', '.join(preset_names())}")
    return path


def preset_names() -> list[str]:
    """Every shipped algorithm preset, sorted (``dapo``, ``grpo``, ...)."""
    return sorted(path.stem for path in (CONFIG_ROOT / "algo").glob("*.yaml"))
