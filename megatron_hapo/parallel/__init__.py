"""The only layer that knows about process groups: every function takes its group explicitly."""

from megatron_hapo.parallel.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = ["vocab_parallel_logprob_entropy"]
