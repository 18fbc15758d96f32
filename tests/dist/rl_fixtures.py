"""Shared inputs of the entry-point tests: a tiny HF model with a word-level tokenizer and chat template, and a
DAPO-layout jsonl of addition prompts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "What", "is", "+", "?", "Answer:", *map(str, range(10))]


def _model_with_tokenizer(llama: Path, out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shutil.copytree(llama, out)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=template
    ).save_pretrained(out)
    return out


def _dapo_jsonl(path: Path, count: int) -> Path:
    rows = []
    for i in range(count):
        a, b = i % 5, (i * 3) % 5
        prompt = [{"role": "user", "content": f"What is {a} + {b} ?"}]
        rows.append(json.dumps({"prompt": prompt, "reward_model": {"ground_truth": str(a + b)}}))
    path.write_text("\n".join(rows) + "\n")
    return path
