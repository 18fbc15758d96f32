"""Datasets: prompt files (DAPO-Math-17k parquet, jsonl) and their chat-template encoding."""

from megatron_hapo.data.prompts import DataError, EncodedPrompts, PromptExample, PromptSet, encode_prompts, read_prompts

__all__ = ["DataError", "EncodedPrompts", "PromptExample", "PromptSet", "encode_prompts", "read_prompts"]
