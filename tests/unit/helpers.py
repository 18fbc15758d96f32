"""Small helpers shared by the unit tests (importable because pytest puts this folder on sys.path)."""

import torch
from hypothesis import settings

#: Property-test budget: small enough for the 2-core CI machine, no per-example deadline.
SETTINGS = settings(max_examples=40, deadline=None)
F64 = torch.float64


def t64(values) -> torch.Tensor:
    """A float64 tensor of ``values``."""
    return torch.tensor(values, dtype=F64)


def ones_mask(*shape: int) -> torch.Tensor:
    """An all-valid bool mask of ``shape``."""
    return torch.ones(*shape, dtype=torch.bool)
