"""Megatron-Core model providers and the HF <-> Megatron mapping (Llama 3, Qwen2/2.5, Qwen3; a tiny GPT)."""

from megatron_hapo.models.hf_config import DecoderSpec, decoder_spec, read_decoder_spec
from megatron_hapo.models.hf_io import HFCheckpoint
from megatron_hapo.models.loading import load_hf_weights
from megatron_hapo.models.provider import build_gpt
from megatron_hapo.models.tiny import TinyGPTShape, build_tiny_gpt

__all__ = [
    "DecoderSpec",
    "HFCheckpoint",
    "TinyGPTShape",
    "build_gpt",
    "build_tiny_gpt",
    "decoder_spec",
    "load_hf_weights",
    "read_decoder_spec",
]
