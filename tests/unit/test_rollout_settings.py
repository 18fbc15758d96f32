"""Rollout sampling settings from the algorithm config, their validation, and the temperature metrics."""

import pytest
import torch

from megatron_hapo.config import AlgoConfig
from megatron_hapo.rollout import Response, SamplingSettings, temperature_metrics


def test_settings_follow_the_sampling_config() -> None:
    algo = AlgoConfig()
    fixed = SamplingSettings.for_training(algo.sampling, max_tokens=64, seed=5)
    assert fixed.adaptive_tau is None and fixed.temperature == 1.0 and fixed.seed == 5
    algo.sampling.kind, algo.sampling.tau, algo.sampling.top_p = "entropy_adaptive", 0.1, 0.7
    adaptive = SamplingSettings.for_training(algo.sampling, max_tokens=64)
    assert adaptive.adaptive_tau == 0.1 and adaptive.top_p == 0.7


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"max_tokens": 4, "temperature": -1.0},
        {"max_tokens": 4, "top_p": 0.0},
        {"max_tokens": 4, "adaptive_tau": 1.0},
    ],
)
def test_bad_settings_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingSettings(**bad)


def test_temperature_metrics() -> None:
    def response(temps: list[float] | None) -> Response:
        tensor = None if temps is None else torch.tensor(temps)
        return Response(0, [1] * (len(temps or [])), torch.zeros(len(temps or [])), "stop", tensor)

    assert temperature_metrics([response(None)]) == {}
    metrics = temperature_metrics([response([0.9, 1.0]), response([1.1]), response(None)])
    assert metrics["temperature_min"] == pytest.approx(0.9) and metrics["temperature_max"] == pytest.approx(1.1)
    assert metrics["temperature_mean"] == pytest.approx(1.0)
    assert 0.9 < metrics["temperature_p10"] < metrics["temperature_p90"] < 1.1
