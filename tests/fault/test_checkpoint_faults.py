"""Corrupt, truncated, partial and missing checkpoints are refused naming the file, and the run falls back to the
newest intact checkpoint; nothing intact at all is an error, never a silent fresh start."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from megatron_hapo.trainer.checkpoint import TRAINER_STATE, latest_checkpoint
from megatron_hapo.trainer.manifest import MANIFEST, verify_manifest, write_manifest


def _checkpoint(root: Path, step: int) -> Path:
    path = root / f"step_{step:06d}"
    (path / "hf").mkdir(parents=True)
    (path / "__0_0.distcp").write_bytes(bytes(range(256)) * 64)
    (path / "metadata.json").write_text(json.dumps({"step": step}))
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))
    (path / "hf" / "config.json").write_text("{}")
    write_manifest(path)
    (root / "latest").write_text(path.name)
    return path


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("fault", "damage", "reason"),
    [
        ("flipped byte in a shard", lambda p: _flip_byte(p / "__0_0.distcp"), "__0_0.distcp: SHA-256 differs"),
        ("truncated shard", lambda p: (p / "__0_0.distcp").write_bytes(b"\0" * 10), "__0_0.distcp: 10 bytes"),
        ("missing trainer state", lambda p: (p / TRAINER_STATE).unlink(), f"{TRAINER_STATE}: missing"),
        ("missing manifest (partial write)", lambda p: (p / MANIFEST).unlink(), f"no {MANIFEST}"),
        ("garbled manifest", lambda p: (p / MANIFEST).write_text("{not json"), f"unreadable {MANIFEST}"),
        ("latest names a deleted checkpoint", shutil.rmtree, "missing"),
    ],
)
def test_damaged_latest_falls_back_to_the_previous_good_one(
    tmp_path: Path, faults, caplog, fault, damage, reason
) -> None:
    faults.inject(fault)
    good = _checkpoint(tmp_path, 1)
    bad = _checkpoint(tmp_path, 2)
    assert verify_manifest(bad) == [] and latest_checkpoint(tmp_path) == bad
    damage(bad)
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(tmp_path) == good
    assert reason in caplog.text and "resuming from step_000001" in caplog.text, caplog.text
    if verify_manifest(good):  # the fallback must be intact: nothing lost beyond the damaged step
        faults.lose(f"{good.name} while recovering from: {fault}")
    assert verify_manifest(good) == []
    faults.survive(fault)


def test_nothing_intact_is_an_error_not_a_fresh_start(tmp_path: Path, faults) -> None:
    fault = faults.inject("every checkpoint corrupted")
    for step in (1, 2):
        _flip_byte(_checkpoint(tmp_path, step) / "__0_0.distcp")
    with pytest.raises(RuntimeError, match="no intact checkpoint"):
        latest_checkpoint(tmp_path)
    faults.survive(fault)
    assert latest_checkpoint(tmp_path / "fresh") is None  # no checkpoints at all: a fresh run


def test_random_state_round_trips(tmp_path: Path) -> None:
    import random

    import numpy as np
    import torch

    from megatron_hapo.trainer.checkpoint import restore_rng_state, write_rng_state

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    write_rng_state(tmp_path)
    first = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(tmp_path)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == first
