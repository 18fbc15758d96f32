"""FP8 training through Transformer Engine: settings, validated before any GPU work starts.

``fp8`` selects the format (``e4m3`` everywhere, or ``hybrid``: e4m3 forward, e5m2 gradients); ``recipe`` the
scaling (``delayed`` / ``tensorwise``: Hopper and newer; ``blockwise``: Hopper only in TE 2.x; ``mxfp8``:
Blackwell). The first and last ``bf16_layers_*`` layers stay in bf16 (one each by default; none with
``delayed``, for which Megatron refuses them). Checks run on CPU too: dimension divisibility, recipe vs the
GPU's compute capability, the layer counts vs the pipeline stages; each error names the setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from megatron_hapo.models.hf_config import DecoderSpec

#: Minimum compute capability per recipe, and the GEMM dimension multiple it needs.
_RECIPES: dict[str, tuple[tuple[int, int], int]] = {
    "delayed": ((8, 9), 16),
    "tensorwise": ((8, 9), 16),
    "blockwise": ((9, 0), 128),
    "mxfp8": ((10, 0), 32),
}


@dataclass(frozen=True, kw_only=True)
class FP8Config:
    """FP8 settings of the Megatron model (``fp8=None``: bf16 training)."""

    fp8: Literal["e4m3", "hybrid"] | None = None
    """FP8 format, or None for no FP8."""
    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "tensorwise"
    """Scaling recipe."""
    bf16_layers_start: int | None = None
    """Leading transformer layers kept in bf16 (0: none; ``None``: 1, or 0 with ``delayed``, which cannot)."""
    bf16_layers_end: int | None = None
    """Trailing transformer layers kept in bf16 (0: none; ``None``: 1, or 0 with ``delayed``, which cannot)."""

    def bf16_layers(self) -> tuple[int, int]:
        """``(leading, trailing)`` bf16 layers with the defaults resolved for the recipe."""
        default = 0 if self.recipe == "delayed" else 1
        start, end = self.bf16_layers_start, self.bf16_layers_end
        return (default if start is None else start), (default if end is None else end)


def check_fp8(cfg: FP8Config, spec: DecoderSpec, *, pp: int = 1, capability: tuple[int, int] | None) -> None:
    """Raise ``ValueError`` naming the setting that cannot work; ``capability`` is the GPU's (None: no GPU)."""
    if cfg.fp8 is None:
        return
    if cfg.recipe not in _RECIPES:
        raise ValueError(f"fp8 recipe {cfg.recipe!r} is unknown; valid: {', '.join(_RECIPES)}")
    needed, multiple = _RECIPES[cfg.recipe]
    if capability is None:
        raise ValueError("fp8 needs Transformer Engine on a CUDA GPU; set fp8=null on CPU")
    if tuple(capability) < needed:
        raise ValueError(f"fp8 recipe {cfg.recipe} needs compute capability >= {needed}, this GPU has {capability}")
    if cfg.recipe == "blockwise" and capability[0] >= 10:
        raise ValueError("fp8 recipe blockwise runs on Hopper only; use mxfp8 on Blackwell")
    for name, value in (("hidden_size", spec.hidden_size), ("intermediate_size", spec.ffn_hidden_size)):
        if value % multiple:
            raise ValueError(f"{name}={value} must be a multiple of {multiple} for fp8 recipe {cfg.recipe}")
    start, end = cfg.bf16_layers()
    if start + end and cfg.recipe == "delayed":  # Megatron's TransformerConfig raises the same
        raise ValueError("fp8 recipe delayed cannot keep first / last layers in bf16; set bf16_layers_* to 0")
    per_stage = spec.num_layers // pp
    if max(start, end) > per_stage:
        raise ValueError(f"bf16_layers_start / end exceed the {per_stage} layers of a pipeline stage")


#: Every micro-batch row is padded to at least a multiple of this many tokens (without FP8 or tensor parallelism).
BASE_TOKEN_MULTIPLE = 16


def token_multiple(recipe: str | None, *, tp: int = 1, sequence_parallel: bool = False) -> int:
    """The multiple a micro-batch's tokens per row are padded to, for the layout's GEMMs.

    FP8 GEMMs (Transformer Engine's ``assert_dim_for_fp8_exec`` on each linear's *local* input) need the rows a
    rank computes on in multiples of the recipe's: 16 for delayed / tensorwise, 128 for blockwise, 32 for mxfp8.
    With sequence parallelism each of the ``tp`` ranks holds ``1 / tp`` of the tokens before its fused norm +
    linear gathers them, so the row must be a multiple of ``recipe multiple x tp`` (NeMo-RL pads packs the same
    way, ``nemo_rl/models/megatron/data.py``); without FP8 sequence parallelism still needs a multiple of ``tp``.
    ``recipe``: ``None`` without FP8."""
    per_rank = _RECIPES[recipe][1] if recipe is not None else 1
    split = tp if sequence_parallel and tp > 1 else 1
    return math.lcm(BASE_TOKEN_MULTIPLE, per_rank * split)


def fp8_transformer_settings(cfg: FP8Config) -> dict[str, Any]:
    """The ``TransformerConfig`` fields of ``cfg`` (empty without FP8)."""
    if cfg.fp8 is None:
        return {}
    start, end = cfg.bf16_layers()
    return {
        "fp8": cfg.fp8,
        "fp8_recipe": cfg.recipe,
        "first_last_layers_bf16": start + end > 0,
        "num_layers_at_start_in_bf16": start,
        "num_layers_at_end_in_bf16": end,
    }
