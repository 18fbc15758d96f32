"""Study files: their cells' configs (the algorithm swapped, the size's overlong buffer kept) and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from megatron_hapo.studies.spec import StudyError, load_study

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, **study: object) -> Path:
    base = {
        "name": "s",
        "root": str(tmp_path / "root"),
        "sizes": {"7b": {"config": str(REPO / "configs/runs/qwen2.5-math-7b-hapo.yaml"), "nodes": 4}},
        "algorithms": {"hapo": str(REPO / "configs/algo/hapo.yaml"), "dapo": str(REPO / "configs/algo/dapo.yaml")},
        "seeds": [1, 2],
        "benchmarks": {"aime24": "data/aime-2024.parquet"},
        "overrides": ["train.total_steps=3"],
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({**base, **study}, sort_keys=False))
    return path


def test_cells_swap_the_algorithm_and_keep_the_sizes_overlong_buffer(tmp_path: Path) -> None:
    study = load_study(_write(tmp_path))
    cells = study.cells()
    assert [c.name for c in cells] == ["7b-hapo-s1", "7b-hapo-s2", "7b-dapo-s1", "7b-dapo-s2"]
    hapo, dapo = cells[0].config(), cells[2].config()
    assert hapo.algo.sampling.kind == "entropy_adaptive" and dapo.algo.sampling.kind == "fixed"
    assert dapo.algo.group_filter.kind == "all_equal" and hapo.algo.redistribution.kind == "hapo"
    assert hapo.algo.reward_shaping == dapo.algo.reward_shaping  # the run config's, for both algorithms
    assert hapo.data.math_verify and not dapo.data.math_verify  # each preset's published verifier
    assert (dapo.train.seed, dapo.train.total_steps, dapo.model.tensor_parallel) == (1, 3, 4)
    assert dapo.output.dir == str(tmp_path / "root" / "7b-dapo-s1") and dapo.output.wandb_group == "s"
    assert set(dapo.data.eval_sets) == {"aime24"} and dapo.data.eval_file is None
    assert cells[0].gpus == 32


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sizez": {}}, r"unknown key\(s\) \['sizez'\]"),
        ({"seeds": [1, 1]}, "seeds must be a list of distinct whole numbers"),
        ({"algorithms": {"x": "nowhere.yaml"}}, r"algorithms.x='nowhere.yaml': no such file"),
        ({"sizes": {"a": {"config": str(REPO / "configs/algo/hapo.yaml"), "gpus": 8}}}, r"sizes.a: unknown key"),
        ({"sizes": {"a": {"nodes": 2}}}, "sizes.a must be a mapping with a 'config'"),
        ({"name": ""}, "'name' is missing or empty"),
    ],
)
def test_a_bad_study_file_is_one_line_naming_the_key(tmp_path: Path, change: dict, message: str) -> None:
    with pytest.raises(StudyError, match=message):
        load_study(_write(tmp_path, **change))


def test_the_shipped_studies_load_and_their_cells_validate() -> None:
    paper = load_study(REPO / "configs/studies/hapo-paper.yaml")
    assert len(paper.cells()) == 36 and set(paper.algorithms) == {"hapo", "dapo"}
    assert all(
        cell.config().data.eval_sets.keys() == {"aime24", "aime25", "amc23", "math500"} for cell in paper.cells()
    )
    tiny = load_study(REPO / "configs/studies/tiny-arithmetic.yaml")
    assert len(tiny.cells()) == 12 and {c.size.gpu_gib for c in tiny.cells()} == {None}
