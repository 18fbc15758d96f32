"""A study file: model sizes x algorithms x seeds, the benchmarks and shared overrides; its cells' configs.

    name: tiny-arithmetic
    root: runs/studies/tiny-arithmetic            # where the cells' run directories go (default runs/studies/NAME)
    sizes:                                        # a run config per size, its overrides and its allocation
      h64: {config: ../examples/tiny-arithmetic.yaml, overrides: [model.path=runs/study-models/h64],
            nodes: 1, gpus_per_node: 2, gpu_gib: null}
    algorithms: {hapo: ../algo/hapo.yaml, dapo: ../algo/dapo.yaml}
    seeds: [1, 2]
    benchmarks: {aime: .../test_aime.jsonl}       # data.eval_sets of every cell
    overrides: [train.total_steps=10]             # every cell

A cell is one size, one algorithm and one seed: the size's run config with the algorithm preset's ``algo``
section and its ``data.math_verify`` (the verifier of the algorithm's published code; the size's
``algo.reward_shaping`` kept: the overlong buffer is a property of the response length, shared by every
algorithm), the study's then the size's overrides, ``train.seed``, the benchmarks, its run
directory ``ROOT/<size>-<algorithm>-s<seed>`` and ``output.wandb_group`` = the study's name. Paths to configs
and presets are relative to the study file; ``root`` and the paths inside the configs (models, data,
benchmarks) are read from the repository root, where the runs start.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_hapo.config import Config, build_dataclass, to_tree, validate
from megatron_hapo.config.loader import parse_override_text, read_yaml_tree

#: The repository: the runs start there, so relative paths in configs (and a study's root) are read from it.
REPO = Path(__file__).resolve().parents[2]
#: The keys of a study file and of one of its sizes.
STUDY_KEYS = ("name", "description", "root", "sizes", "algorithms", "seeds", "benchmarks", "overrides")
SIZE_KEYS = ("config", "overrides", "nodes", "gpus_per_node", "gpu_gib")


class StudyError(ValueError):
    """A study file that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Size:
    """One model size: its run config, overrides and allocation (``gpu_gib`` ``None``: CPU ranks, no memory fit)."""

    name: str
    config: Path
    overrides: tuple[str, ...] = ()
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_gib: float | None = 80.0


@dataclass(frozen=True)
class Study:
    """A parsed study file."""

    name: str
    path: Path
    root: Path
    sizes: dict[str, Size]
    algorithms: dict[str, Path]
    seeds: tuple[int, ...]
    benchmarks: dict[str, Any]
    overrides: tuple[str, ...]
    description: str = ""

    def cells(self) -> list[Cell]:
        """Every size x algorithm x seed, sizes first (in file order)."""
        return [
            Cell(self, size, algorithm, seed)
            for size in self.sizes.values()
            for algorithm in self.algorithms
            for seed in self.seeds
        ]


def _deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = (
            _deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        )
    return merged


def _set(tree: dict, text: str) -> None:
    keys, value = parse_override_text(text)  # typed when the cell's config is built (a text field: verbatim)
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


@dataclass(frozen=True)
class Cell:
    """One run of a study."""

    study: Study
    size: Size
    algorithm: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.size.name}-{self.algorithm}-s{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.study.root / self.name

    @property
    def gpus(self) -> int:
        return self.size.nodes * self.size.gpus_per_node

    def tree(self) -> dict[str, Any]:
        """The cell's whole config as a plain tree (see the module docstring)."""
        tree = copy.deepcopy(read_yaml_tree(self.size.config))
        algo = copy.deepcopy(read_yaml_tree(self.study.algorithms[self.algorithm]).get("algo", {}))
        shaping = tree.get("algo", {}).get("reward_shaping")
        tree["algo"] = _deep_merge(algo, {"reward_shaping": shaping}) if shaping else algo
        preset_data = read_yaml_tree(self.study.algorithms[self.algorithm]).get("data", {})
        # the verifier of the algorithm's published code (docs/ALGORITHMS.md 26), not the run config's base's
        tree.setdefault("data", {})["math_verify"] = bool(preset_data.get("math_verify", False))
        for text in (*self.study.overrides, *self.size.overrides):
            _set(tree, text)
        tree.setdefault("train", {})["seed"] = self.seed
        if self.study.benchmarks:
            tree.setdefault("data", {}).update(eval_sets=copy.deepcopy(self.study.benchmarks), eval_file=None)
        tree.setdefault("output", {}).update(dir=str(self.run_dir), wandb_group=self.study.name)
        return tree

    def config(self) -> Config:
        """The cell's typed, validated config."""
        config = build_dataclass(Config, self.tree())
        validate(config)
        return config

    def write_config(self) -> Path:
        """``RUN_DIR/cell.yaml``: the config the cell's run is launched with (resolved: no ``base``)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "cell.yaml"
        resolved = yaml.safe_dump(to_tree(self.config()), sort_keys=False)
        path.write_text(f"# study {self.study.name}, cell {self.name}: the whole resolved config\n" + resolved)
        return path


def _relative(path: Path, value: object, key: str) -> Path:
    if not isinstance(value, str):
        raise StudyError(f"{path}: {key} must be a path, got {value!r}")
    resolved = (path.parent / value).resolve()
    if not resolved.is_file():
        raise StudyError(f"{path}: {key}={value!r}: no such file ({resolved})")
    return resolved


def _size(path: Path, name: str, raw: object) -> Size:
    if not isinstance(raw, dict) or "config" not in raw:
        raise StudyError(f"{path}: sizes.{name} must be a mapping with a 'config' (a run config file)")
    unknown = set(raw) - set(SIZE_KEYS)
    if unknown:
        raise StudyError(f"{path}: sizes.{name}: unknown key(s) {sorted(unknown)}; valid: {', '.join(SIZE_KEYS)}")
    nodes, per_node = raw.get("nodes", 1), raw.get("gpus_per_node", 8)
    if not all(isinstance(v, int) and v >= 1 for v in (nodes, per_node)):
        raise StudyError(f"{path}: sizes.{name}: nodes and gpus_per_node must be whole numbers >= 1")
    return Size(
        name,
        _relative(path, raw["config"], f"sizes.{name}.config"),
        tuple(str(o) for o in raw.get("overrides", ())),
        nodes,
        per_node,
        raw.get("gpu_gib", 80.0),
    )


def load_study(path: str | Path) -> Study:
    """Read and check a study file (one line naming the file and the key on a problem: :class:`StudyError`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise StudyError(f"{path}: no such study file")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise StudyError(f"{path}: the top level must be a mapping")
    unknown = set(raw) - set(STUDY_KEYS)
    if unknown:
        raise StudyError(f"{path}: unknown key(s) {sorted(unknown)}; valid: {', '.join(STUDY_KEYS)}")
    for key in ("name", "sizes", "algorithms", "seeds"):
        if not raw.get(key):
            raise StudyError(f"{path}: '{key}' is missing or empty")
    seeds = raw["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
        raise StudyError(f"{path}: seeds must be a list of distinct whole numbers, got {seeds!r}")
    name = str(raw["name"])
    return Study(
        name=name,
        path=path,
        root=REPO / raw.get("root", f"runs/studies/{name}"),  # relative: to the repository, as the configs' paths
        sizes={n: _size(path, n, s) for n, s in raw["sizes"].items()},
        algorithms={n: _relative(path, p, f"algorithms.{n}") for n, p in raw["algorithms"].items()},
        seeds=tuple(seeds),
        benchmarks=dict(raw.get("benchmarks") or {}),
        overrides=tuple(str(o) for o in raw.get("overrides", ())),
        description=str(raw.get("description", "")),
    )
