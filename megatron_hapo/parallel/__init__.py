"""The only layer that knows about process groups: every function takes its group explicitly."""

from megatron_hapo.parallel.stats import (
    distributed_entropy_stats,
    distributed_kth_smallest,
    distributed_normalized_entropy,
)
from megatron_hapo.parallel.token_mean import global_denominator, microbatch_loss
from megatron_hapo.parallel.vocab_parallel import vocab_parallel_logprob_entropy

__all__ = [
    "distributed_entropy_stats",
    "distributed_kth_smallest",
    "distributed_normalized_entropy",
    "global_denominator",
    "microbatch_loss",
    "vocab_parallel_logprob_entropy",
]
