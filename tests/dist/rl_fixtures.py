"""Shared inputs of the entry-point tests: a tiny HF model with a word-level tokenizer and chat template, and a
DAPO-layout jsonl of addition prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "What", "is", "+", "?", "Answer:", *map(str, range(10))]


def _model_with_tokenizer(llama: Path, out: Path) -> Path:
    """A copy of the model ``llama`` with a word-level tokenizer over :data:`WORDS` and a chat template."""
    from megatron_hapo.models.word_tokenizer import write_word_tokenizer

    shutil.copytree(llama, out)
    return write_word_tokenizer(out, WORDS)


def _dapo_jsonl(path: Path, count: int) -> Path:
    rows = []
    for i in range(count):
        a, b = i % 5, (i * 3) % 5
        prompt = [{"role": "user", "content": f"What is {a} + {b} ?"}]
        rows.append(json.dumps({"prompt": prompt, "reward_model": {"ground_truth": str(a + b)}}))
    path.write_text("\n".join(rows) + "\n")
    return path
