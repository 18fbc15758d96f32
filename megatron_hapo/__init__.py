"""megatron_hapo: token-aware reinforcement learning of LLMs on Megatron-Core."""

__version__ = "0.1.0"
