"""Checkpoints are data, not code: crafted `.metadata`, byte items and `common.pt` are refused by every load path
before anything from them runs (no side effect), with one line naming the file and the class."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_hapo.models.safe_checkpoint import UnsafeCheckpointError, require_data_only

REPO = Path(__file__).resolve().parents[2]


class _Payload:
    """Pickles as a call of ``os.system``: what an attacker's checkpoint would hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real converted checkpoint of a tiny model (tools/make_tiny_model.py, tools/convert_hf_to_mcore.py)."""
    root = tmp_path_factory.mktemp("safe")
    for args in (
        ["tools/make_tiny_model.py", "--hidden", "64", "--out", str(root / "hf")],
        ["tools/convert_hf_to_mcore.py", "--hf-dir", str(root / "hf"), "--out", str(root / "mcore")],
    ):
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
    return root / "mcore"


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    crafted = tmp_path / "crafted"
    shutil.copytree(checkpoint, crafted)
    return crafted


def test_a_real_checkpoint_is_plain_data(checkpoint: Path) -> None:
    require_data_only(checkpoint)


def test_crafted_metadata_is_refused_by_every_entry_point(checkpoint: Path, tmp_path: Path, repo_root: Path) -> None:
    crafted, marker = _copy(checkpoint, tmp_path), tmp_path / "pwned"
    (crafted / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata: refers to posix\.system"):
        require_data_only(crafted)
    from megatron_hapo.models.mcore_reader import McoreReader

    with pytest.raises(UnsafeCheckpointError):  # the conversion library's own reader, in process
        McoreReader(crafted)
    commands = {
        "convert": ["tools/convert_mcore_to_hf.py", "--ckpt", str(crafted), "--out", str(tmp_path / "out")],
        "verify": ["tools/verify_conversion.py", "--hf-dir", str(checkpoint.parent / "hf"), "--ckpt", str(crafted)],
        "evaluate": ["-m", "megatron_hapo.evaluate", str(crafted), "--set", "a=/nowhere.jsonl"],
        "train": [
            "-m",
            "megatron_hapo.train",
            "configs/algo/hapo.yaml",
            f"model.path={checkpoint.parent / 'hf'}",
            f"model.init_from={crafted}",
            "data.train_file=megatron_hapo/examples/arithmetic/train.jsonl",
            f"output.dir={tmp_path / 'run'}",
        ],
    }
    for name, args in commands.items():
        done = subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=300)
        assert done.returncode != 0 and "Traceback" not in done.stderr, (name, done.stderr[-3000:])
        last = done.stderr.strip().splitlines()[-1]
        assert ".metadata: refers to posix.system" in last and "refused" in last, (name, last)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_crafted_byte_item_and_common_pt_are_refused(checkpoint: Path, tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    crafted, marker = _copy(checkpoint, tmp_path), tmp_path / "pwned"
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    (crafted / "evil.distcp").write_bytes(payload.getvalue())
    metadata = pickle.loads((crafted / ".metadata").read_bytes())  # the real one: trusted here
    item = next(fqn for fqn, m in metadata.state_dict_metadata.items() if isinstance(m, BytesStorageMetadata))
    index = next(i for i in metadata.storage_data if i.fqn == item)
    metadata.storage_data[index] = _StorageInfo("evil.distcp", 0, len(payload.getvalue()))
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.distcp \(item .*\): not plain tensors"):
        require_data_only(crafted)

    metadata.storage_data[index] = _StorageInfo("../../outside.distcp", 0, 10)  # a path out of the checkpoint
    (crafted / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UnsafeCheckpointError, match="outside the checkpoint"):
        require_data_only(crafted)

    clean = _copy(checkpoint, tmp_path / "c")
    (clean / "common.pt").write_bytes(payload.getvalue())
    with pytest.raises(UnsafeCheckpointError, match=r"common\.pt: not plain tensors"):
        require_data_only(clean)
    assert not marker.exists()
