"""Rollout-vs-trainer mismatch metrics and truncated importance sampling, against hand-computed values."""

import math

import pytest
import torch

from megatron_hapo.algos import rollout_mismatch_metrics, token_policy_loss, truncated_importance_weights
from megatron_hapo.config import AlgoConfig


def test_mismatch_metrics_by_hand() -> None:
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    rollout = torch.tensor([[-1.5, -2.0, -0.25], [-2.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    d = [0.5, 0.0, -0.25, -1.0]  # trainer - rollout on the valid tokens
    m = rollout_mismatch_metrics(trainer, rollout, mask)
    assert m["mismatch_kl"].item() == pytest.approx(-sum(d) / 4)
    assert m["mismatch_k3"].item() == pytest.approx(sum(math.expm1(x) - x for x in d) / 4)
    assert m["mismatch_max_abs_log_ratio"].item() == pytest.approx(1.0)
    assert m["mismatch_max_ratio"].item() == pytest.approx(math.exp(0.5))
    assert m["mismatch_min_ratio"].item() == pytest.approx(math.exp(-1.0))
    empty = rollout_mismatch_metrics(trainer, rollout, torch.zeros_like(mask))
    assert all(v.item() == 0 for v in empty.values())


def test_tis_weights_are_truncated_ratios_without_gradient() -> None:
    old = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    rollout = torch.tensor([[-1.5, -3.0, 0.0]])
    weights = truncated_importance_weights(old, rollout, torch.tensor([[True, True, False]]), cap=2.0)
    assert torch.allclose(weights, torch.tensor([[math.exp(0.5), 2.0, 0.0]]))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, rollout, torch.ones(1, 3, dtype=torch.bool), cap=0.5)
    with pytest.raises(ValueError, match="NaN"):
        truncated_importance_weights(old, torch.full((1, 3), float("nan")), torch.ones(1, 3, dtype=torch.bool), cap=2.0)


def test_token_weights_scale_the_per_token_loss() -> None:
    torch.manual_seed(0)
    log_prob = torch.randn(2, 4, requires_grad=True)
    old, adv, mask = torch.randn(2, 4), torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool)
    weights = torch.rand(2, 4) * 2
    plain, _ = token_policy_loss(log_prob, old, adv, mask, algo=AlgoConfig())
    weighted, metrics = token_policy_loss(log_prob, old, adv, mask, algo=AlgoConfig(), token_weights=weights)
    assert torch.allclose(weighted, plain * weights)
    assert metrics["tis_weight_mean"].item() == pytest.approx(weights.mean().item())
