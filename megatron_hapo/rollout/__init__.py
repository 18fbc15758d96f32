"""Rollout: the engine protocol, the colocated vLLM engine (imported on demand) and the weight sync."""

from megatron_hapo.rollout.engine import FinishReason, Response, RolloutEngine, SamplingSettings, temperature_metrics

__all__ = ["FinishReason", "Response", "RolloutEngine", "SamplingSettings", "temperature_metrics"]
