"""A tiny Megatron-Core GPT (local layer spec) for CPU checks, tests and the CPU quickstart.

Built for the current ``parallel_state`` layout (TP, PP, virtual PP), one chunk per virtual pipeline stage, as
Megatron's schedules take a model; optionally wrapped in Megatron DDP with ``finalize_model_grads``. The MLP is
not gated (GeLU), so every tensor-parallel weight is a plain split along its ``partition_dim``. The CPU-only
kernel fusions (gradient-accumulation fusion, fused softmax / bias-dropout) are off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_hapo.models.attention import with_packed_attention, with_packed_rotary
from megatron_hapo.models.provider import build_chunks, sequence_parallel_block_spec, variable_shapes
from megatron_hapo.parallel.runtime import model_parallel_layout


@dataclass(frozen=True, kw_only=True)
class TinyGPTShape:
    """Dimensions of the tiny GPT."""

    vocab_size: int = 128
    """Vocabulary size (divisible by the TP size)."""
    seq_length: int = 16
    """Maximum sequence length (RoPE table size)."""
    num_layers: int = 4
    """Transformer layers (divisible by PP x VPP)."""
    hidden_size: int = 64
    """Model width."""
    num_attention_heads: int = 4
    """Query heads (GQA with ``num_query_groups``)."""
    num_query_groups: int = 2
    """Key/value heads (divisible by the TP size)."""
    ffn_hidden_size: int = 128
    """MLP width."""


def build_tiny_gpt(
    shape: TinyGPTShape = TinyGPTShape(),
    *,
    dtype: torch.dtype = torch.float32,
    ddp: bool = True,
    calculate_per_token_loss: bool = False,
    batch_p2p_comm: bool = True,
    seed: int | None = None,
    sequence_parallel: bool = False,
) -> list[torch.nn.Module]:
    """The model chunks of this rank for the initialised model-parallel layout (on this rank's device).

    Args:
        shape: dimensions.
        dtype: parameter and pipeline dtype (float64 for exactness checks).
        ddp: wrap each chunk in Megatron ``DistributedDataParallel`` and set ``finalize_model_grads``.
        calculate_per_token_loss: Megatron's switch of the same name (see ``parallel.policy_loss``).
        batch_p2p_comm: Megatron's batched pipeline P2P (must be False for PP2 with virtual stages).
        seed: reseed the CPU generator before building (same initial weights for a given layout).
        sequence_parallel: Megatron sequence parallelism (at TP > 1), with norms flagged for it as in
            :func:`megatron_hapo.models.provider.build_gpt`.

    Returns:
        One module per virtual pipeline stage (one without VPP); each has a ``layer_offset`` attribute, the
        global index of its first transformer layer.
    """
    from megatron.core.models.gpt import GPTModel  # noqa: PLC0415  (megatron imported only when building)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: PLC0415
    from megatron.core.transformer import TransformerConfig  # noqa: PLC0415

    if seed is not None:
        torch.manual_seed(seed)
    layout = model_parallel_layout()
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        batch_p2p_comm=batch_p2p_comm,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        calculate_per_token_loss=calculate_per_token_loss,
        variable_seq_lengths=variable_shapes(layout.pp, layout.vpp),
        moe_token_dispatcher_type="alltoall",
        sequence_parallel=sequence_parallel and layout.tp > 1,
    )

    layer_spec = with_packed_attention(get_gpt_layer_local_spec())

    def make_model(stage: int | None, first: bool, last: bool) -> torch.nn.Module:
        model = GPTModel(
            config=config,
            transformer_layer_spec=sequence_parallel_block_spec(config, layer_spec, stage),
            vocab_size=shape.vocab_size,
            max_sequence_length=shape.seq_length,
            position_embedding_type="rope",
            share_embeddings_and_output_weights=False,
            pre_process=first,
            post_process=last,
            vp_stage=stage,
        )
        return with_packed_rotary(model)

    return build_chunks(config, make_model, dtype=dtype, ddp=ddp)
