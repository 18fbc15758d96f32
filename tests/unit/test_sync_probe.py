"""The weight-sync check's statistic, probe and default tolerance (verify_sync itself runs in tests/dist)."""

import math

import pytest
import torch

from megatron_hapo.config import Config
from megatron_hapo.rollout.weight_sync import PROBE_TOKENS, probe_error, sync_probe
from megatron_hapo.trainer.actor import FP32_SYNC_TOLERANCE, LOW_PRECISION_SYNC_TOLERANCE, sync_tolerance


def test_mean_multiplicative_error_tolerates_one_rounded_token_not_a_shifted_model():
    trainer = torch.linspace(-5, -0.1, 64)
    one_token = trainer.clone()
    one_token[7] += 0.3  # a single token a 16-bit kernel rounds far: the old max statistic (0.05) would refuse it
    error = probe_error(one_token, trainer)
    assert error["max_abs"] == pytest.approx(0.3, abs=1e-6)
    assert error["mult_error"] == pytest.approx((math.exp(0.3) - 1) / 64, rel=1e-5)
    assert error["mult_error"] < LOW_PRECISION_SYNC_TOLERANCE
    shifted = trainer + 0.5 * torch.randn(64, generator=torch.Generator().manual_seed(0))  # every token moved
    assert probe_error(shifted, trainer)["mult_error"] > LOW_PRECISION_SYNC_TOLERANCE
    assert probe_error(trainer, trainer) == {"mult_error": 0.0, "max_abs": 0.0}


def test_probe_is_a_multiple_of_16_tokens_cycled_from_the_prompts():
    probe = sync_probe([[5, 6, 7], [8, 9]])
    assert len(probe) == PROBE_TOKENS and PROBE_TOKENS % 16 == 0
    assert probe[:7] == [5, 6, 7, 8, 9, 5, 6]
    assert len(sync_probe([list(range(100))], length=32)) == 32
    with pytest.raises(ValueError, match="multiple of 16"):
        sync_probe([[1, 2]], length=31)
    with pytest.raises(ValueError, match="no prompt tokens"):
        sync_probe([[]])


def test_default_tolerance_follows_the_dtypes():
    config = Config()
    assert sync_tolerance(config) == FP32_SYNC_TOLERANCE  # float32 trainer, engine dtype auto
    config.model.dtype = "bfloat16"
    assert sync_tolerance(config) == LOW_PRECISION_SYNC_TOLERANCE
    config.model.dtype, config.engine.dtype = "float32", "bfloat16"
    assert sync_tolerance(config) == LOW_PRECISION_SYNC_TOLERANCE
    config.engine.sync_tolerance = 0.5
    assert sync_tolerance(config) == 0.5
