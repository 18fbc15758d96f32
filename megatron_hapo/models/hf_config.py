"""Read a Hugging Face ``config.json`` into the decoder description megatron_hapo builds models from.

Supported families: Llama 3.x (GQA, ``llama3`` RoPE scaling, tied or untied embeddings), Qwen2 / Qwen2.5 (QKV
bias) and Qwen3 (QK-norm). Anything else is refused with the field that makes it unsupported, so a checkpoint
is never converted into a model that computes something else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "qwen2", "qwen3"]

#: ``architectures[0]`` of config.json -> family.
ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}

#: The only llama3 RoPE scaling Megatron-Core 0.19 implements (its factors are fixed but ``factor``).
_MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True, kw_only=True)
class DecoderSpec:
    """A dense decoder-only transformer, as the HF config describes it."""

    family: Family
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: float | None
    """llama3 RoPE scaling factor; ``None``: no scaling."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool

    def padded_vocab_size(self, tp: int, divisible_by: int = 128) -> int:
        """Megatron's padded vocabulary: a multiple of ``divisible_by * tp`` (padded rows are masked out)."""
        multiple = divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, *, tp: int, pp: int = 1, vpp: int | None = None) -> None:
        """Raise ``ValueError`` naming the field that a TP / PP layout does not divide."""
        checks = [
            ("num_attention_heads", self.num_attention_heads, tp, "tensor-parallel size"),
            ("num_key_value_heads", self.num_query_groups, tp, "tensor-parallel size"),
            ("intermediate_size", self.ffn_hidden_size, tp, "tensor-parallel size"),
            ("num_hidden_layers", self.num_layers, pp * (vpp or 1), "pipeline stages x virtual stages"),
        ]
        for name, value, divisor, what in checks:
            if value % divisor:
                raise ValueError(f"{name}={value} is not divisible by the {what} ({divisor})")


def _rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE settings: transformers >= 5 writes ``rope_parameters``; older configs ``rope_theta`` + ``rope_scaling``."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return params


def _rope_scaling(config: dict[str, Any]) -> float | None:
    scaling = _rope_parameters(config)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (only 'llama3')")
    for key, expected in _MEGATRON_LLAMA3_ROPE.items():
        if float(scaling.get(key, expected)) != expected:
            raise ValueError(
                f"rope_scaling.{key}={scaling[key]} is not supported (Megatron-Core fixes it at {expected})"
            )
    return float(scaling["factor"])


def decoder_spec(config: dict[str, Any]) -> DecoderSpec:
    """The :class:`DecoderSpec` of an HF config dict; ``ValueError`` names any unsupported field."""
    arch = (config.get("architectures") or ["<missing>"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architectures[0]={arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU models only)")
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if config.get(flag):
            raise ValueError(f"{flag}=true is not supported for {arch}")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return DecoderSpec(
        family=family,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(config["intermediate_size"]),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(_rope_parameters(config)["rope_theta"]),
        rope_scaling_factor=_rope_scaling(config),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
    )


def read_decoder_spec(model_dir: str | Path) -> DecoderSpec:
    """:func:`decoder_spec` of ``model_dir/config.json``."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a Hugging Face model directory")
    return decoder_spec(json.loads(path.read_text()))
