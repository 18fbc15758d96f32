"""A word-level Hugging Face tokenizer with a chat template, for tiny models: every word of a small vocabulary is
one token, so arithmetic prompts and answers tokenize to a handful of ids (``tools/make_tiny_model.py``, tests).

Saved with ``PreTrainedTokenizerFast.save_pretrained``: ``tokenizer.json``, ``tokenizer_config.json`` and the
chat template, loadable by ``AutoTokenizer`` and by vLLM like any HF tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

#: Special tokens first (ids 0-4), in this order.
SPECIAL = ("<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>")
#: The words of arithmetic prompts in DAPO's and the ``\\boxed{}`` formats, and the digits.
ARITHMETIC_WORDS = (
    *SPECIAL,
    *("What", "is", "+", "?", "Answer:"),
    *map(str, range(10)),
    *("-", "*", "=", "Solve", "the", "following", "math", "problem", "step", "by", "The", "answer"),
    *("Put", "final", "in", "\\boxed{", "}", "."),
)
#: A template that renders each message as ``<|role|> content`` and ends with ``<|assistant|>`` when asked.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def write_word_tokenizer(out: Path, words: Sequence[str] = ARITHMETIC_WORDS) -> Path:
    """Save a whitespace-split word-level tokenizer over ``words`` (id = position; the first five must be
    :data:`SPECIAL`) with :data:`CHAT_TEMPLATE` into ``out``; unknown words become ``<unk>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    if tuple(words[: len(SPECIAL)]) != SPECIAL or len(set(words)) != len(words):
        raise ValueError(f"words must start with {SPECIAL} and hold each word once")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    ).save_pretrained(out)
    return out
