"""An advantage kind from outside the package: RLOO (REINFORCE leave-one-out, Ahmadian et al. 2024).

Each response's baseline is the mean reward of the *other* responses of its prompt:
``A_i = R_i - mean_{j != i} R_j = G / (G - 1) (R_i - mean_G R)``; a group of one gets 0. With ``std_norm`` (a
built-in field of ``algo.advantage``) it is divided by the group's standard deviation plus ``loo_eps``, a field
this plugin declares itself.

    python -m megatron_hapo.train configs/algo/grpo.yaml algo.plugins=[examples/plugins/rloo.py] \\
        algo.advantage.kind=rloo algo.advantage.loo_eps=1e-4 ...

What the kind gets and returns (docs/EXTENDING.md): ``inputs.rewards [B]``, ``inputs.group_ids [B]``,
``inputs.mask [B, L]``; it returns ``[B, L]`` token advantages, zero outside the mask. Advantages are computed
on whole groups before the batch is divided among data-parallel ranks, so they are exact at any layout.
"""

from __future__ import annotations

import torch

from megatron_hapo.algos import ADVANTAGE, PluginField
from megatron_hapo.algos.components import AdvantageInputs


@ADVANTAGE.register(
    "rloo",
    uses=("std_norm", "loo_eps"),
    fields={"loo_eps": PluginField(float, 1e-6, "added to the group's standard deviation (std_norm)")},
)
def rloo(inputs: AdvantageInputs, *, std_norm: bool, loo_eps: float) -> torch.Tensor:
    """``[B, L]`` leave-one-out advantages of ``[B]`` rewards, broadcast over each response's tokens."""
    rewards = inputs.rewards.double()
    _, index = torch.unique(torch.as_tensor([hash(g) for g in _ids(inputs.group_ids)]), return_inverse=True)
    groups = int(index.max()) + 1
    count = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, torch.ones_like(rewards))
    total = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, rewards)
    size = count[index]
    others = (total[index] - rewards) / (size - 1).clamp_min(1)
    advantages = torch.where(size > 1, rewards - others, torch.zeros_like(rewards))
    if std_norm:
        mean = total / count
        spread = torch.zeros(groups, dtype=rewards.dtype).index_add_(0, index, (rewards - mean[index]) ** 2)
        std = (spread / (count - 1).clamp_min(1)).sqrt()
        advantages = advantages / (std[index] + loo_eps)
    return advantages.to(inputs.rewards.dtype)[:, None] * inputs.mask.to(inputs.rewards.dtype)


def _ids(group_ids: object) -> list:
    return group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)  # type: ignore[attr-defined]
