"""Megatron schedule settings known to give wrong results, refused before a step runs."""

from __future__ import annotations

from typing import Any


def check_pipeline_schedule(model_config: Any) -> None:
    """Reject the Megatron schedule settings known to give wrong gradients (a Megatron ``TransformerConfig``).

    With two pipeline stages and virtual stages, the batched P2P path (``batch_p2p_comm=True``, the default)
    posts the sends and receives of both directions to the same peer in one batch; they were seen to pair up
    crosswise (megatron-core 0.19.2 over gloo: loss off by 58 %, gradients by 330 %; see docs/LOG.md).
    """
    vpp = getattr(model_config, "virtual_pipeline_model_parallel_size", None)
    if model_config.pipeline_model_parallel_size == 2 and vpp and vpp > 1 and model_config.batch_p2p_comm:
        raise ValueError(
            "pipeline_model_parallel_size=2 with virtual pipeline stages and batch_p2p_comm=True gives wrong "
            "gradients (both directions' P2P ops go to one peer in one batch): set batch_p2p_comm=False"
        )
