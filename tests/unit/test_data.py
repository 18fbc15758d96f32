"""Prompt files: DAPO-Math-17k parquet layout and jsonl, bad rows named or skipped, chat templates, length limit."""

import json
from pathlib import Path

import pytest

from megatron_hapo.data import DataError, encode_prompts, read_prompts

DAPO_ROW = {
    "data_source": "math_dapo",
    "prompt": [{"role": "user", "content": "What is 1 + 1?"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "2", "style": "rule-lighteval/MATH_v2"},
    "extra_info": {"index": "a"},
}


def test_dapo_parquet_layout(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [DAPO_ROW, {**DAPO_ROW, "reward_model": {"ground_truth": "34", "style": "x"}}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    prompts = read_prompts(tmp_path / "dapo.parquet")
    assert [e.answer for e in prompts.examples] == ["2", "34"]
    assert prompts.examples[0].messages == (("user", "What is 1 + 1?"),) and not prompts.skipped


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_named_or_skipped(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "2 + 2?", "answer": 4}),
        "{not json",
        json.dumps({"prompt": "no answer"}),
        json.dumps({"prompt": [], "answer": "1"}),
        json.dumps({"prompt": "3 + 3?", "answer": "6"}),
    ]
    path = _jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(DataError, match=r"p\.jsonl: line 2: invalid JSON"):
        read_prompts(path, answer_key="answer")
    prompts = read_prompts(path, answer_key="answer", bad_rows="skip")
    assert [e.answer for e in prompts.examples] == ["4", "6"] and [e.row for e in prompts.examples] == [1, 5]
    assert [row for row, _ in prompts.skipped] == [2, 3, 4]
    assert "missing key 'answer'" in prompts.skipped[1][1]
    with pytest.raises(DataError, match="no usable prompt rows"):
        read_prompts(_jsonl(tmp_path / "bad.jsonl", ["{}"]), bad_rows="skip")
    with pytest.raises(DataError, match="unsupported prompt file type"):
        read_prompts(_jsonl(tmp_path / "p.csv", ["a"]))
    with pytest.raises(DataError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.jsonl")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<|user|>", "<|assistant|>", "What", "is", "1", "+", "?", "2"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", chat_template=template)


def test_chat_template_and_length_limit(tmp_path: Path) -> None:
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            json.dumps({"prompt": "What is 1 + 1 ?", "answer": "2"}),
            json.dumps({"prompt": "1 + 1 + 1 + 1 + 1 + 1 ?", "answer": "6"}),
        ],
    )
    encoded = encode_prompts(read_prompts(path, answer_key="answer").examples, _tokenizer(), max_prompt_length=10)
    assert encoded.dropped_too_long == 1 and [e.answer for e in encoded.examples] == ["2"]
    assert encoded.token_ids == [[1, 3, 4, 5, 6, 5, 7, 2]]  # <|user|> What is 1 + 1 ? <|assistant|>
