"""`tools/make_tiny_model.py` writes a model a newcomer can train at once: a tokenizer with a chat template that
knows the arithmetic prompts, and a head size the default rollout engine (vLLM on CPU) accepts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_hapo.models.word_tokenizer import SPECIAL, write_word_tokenizer


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_model_has_a_tokenizer_and_an_engine_head_size(family: str, tmp_path: Path, repo_root: Path) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / family
    result = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--family", family, "--out", str(out)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    assert head_dim >= 32 and head_dim % 16 == 0, config  # vLLM's CPU attention: 32, 64, 80, ...
    tokenizer = AutoTokenizer.from_pretrained(out)
    chat = [{"role": "user", "content": "What is 3 + 4 ? Answer:"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and max(ids) < config["vocab_size"], ids
    assert tokenizer.convert_ids_to_tokens(ids) == [
        "<|user|>",
        "What",
        "is",
        "3",
        "+",
        "4",
        "?",
        "Answer:",
        "<|assistant|>",
    ]
    assert tokenizer.eos_token_id == config["eos_token_id"] == 2


def test_word_tokenizer_refuses_a_vocabulary_without_its_special_tokens(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must start with"):
        write_word_tokenizer(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="each word once"):
        write_word_tokenizer(tmp_path, [*SPECIAL, "a", "a"])
