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


def test_taught_model_says_answer_lines(tmp_path: Path, repo_root: Path) -> None:
    """`--teach-arithmetic`: after supervised steps on the training problems the model ends its greedy responses
    the way DAPO's rule reads them (an `Answer:` line, then EOS), which a random model never does."""
    import torch
    import transformers

    def make(out: Path, *extra: str) -> transformers.PreTrainedModel:
        args = [sys.executable, "tools/make_tiny_model.py", "--hidden", "64", "--out", str(out), *extra]
        result = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr[-2000:]
        return transformers.AutoModelForCausalLM.from_pretrained(out)

    random_model, taught = make(tmp_path / "random"), make(tmp_path / "taught", "--teach-arithmetic", "60")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "taught")
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 5 ?"}], add_generation_prompt=True, return_dict=True
    )
    prompt = torch.tensor([list(chat["input_ids"])])
    said = {}
    for name, model in (("random", random_model), ("taught", taught)):
        out = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, prompt.shape[1] :]
        said[name] = tokenizer.convert_ids_to_tokens(out.tolist())
    assert said["taught"][0] == "Answer:" and "</s>" in said["taught"], said
    assert said["random"][0] != "Answer:", said
