"""The session's Slurm cluster (two nodes on this machine); tests skip where it cannot be set up."""

import signal
import sys
from collections.abc import Iterator

import pytest
from cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    try:
        cluster = SlurmCluster.start(tmp_path_factory.mktemp("slurm"))
    except SlurmUnavailable as exc:
        pytest.skip(str(exc))
    # a SIGTERM to pytest (a CI time-out) unwinds through the teardown instead of leaving the daemons running
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    try:
        yield cluster
    finally:
        cluster.stop()
        signal.signal(signal.SIGTERM, previous)
