"""Megatron-Core model providers (a tiny GPT for CPU checks now; HF families in issue 5)."""

from megatron_hapo.models.tiny import TinyGPTShape, build_tiny_gpt

__all__ = ["TinyGPTShape", "build_tiny_gpt"]
