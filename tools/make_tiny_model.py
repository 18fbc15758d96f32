#!/usr/bin/env python
"""Write a tiny random Hugging Face model (Llama 3, Qwen2 or Qwen3 layout) to try the conversion tools offline.

.venv/bin/python tools/make_tiny_model.py --family qwen2 --out /tmp/tiny-qwen2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config_cls, model_cls, extra = FAMILIES[args.family]
    config = config_cls(
        vocab_size=250,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        max_position_embeddings=256,
        **extra,
    )
    config.architectures = [model_cls.__name__]
    torch.manual_seed(args.seed)
    model_cls(config).float().save_pretrained(args.out)
    print(f"wrote {args.out} ({args.family}, {sum(p.numel() for p in model_cls(config).parameters())} parameters)")


if __name__ == "__main__":
    main()
