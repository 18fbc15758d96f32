#!/usr/bin/env python
"""Write a tiny random Hugging Face model (Llama 3, Qwen2 or Qwen3 layout) with a word-level tokenizer and a
chat template: enough to try the conversion tools and the trainer offline on the arithmetic examples.

.venv/bin/python tools/make_tiny_model.py --family qwen2 --out /tmp/tiny-qwen2

The shape (hidden 128, 4 query heads of 32, 2 key/value heads, 2 layers; ``--hidden`` / ``--layers`` change
it, heads of 32 always) runs on the default rollout engine (vLLM's CPU attention takes head sizes 32 and up) at
tensor parallel 1 and 2. The tokenizer
(``megatron_hapo.models.word_tokenizer``) knows the words of the arithmetic prompts, one token each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

from megatron_hapo.models.word_tokenizer import ARITHMETIC_WORDS, write_word_tokenizer

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"head_dim": 32}),
}
#: The tokenizer's special ids (``word_tokenizer.SPECIAL``).
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def teach_arithmetic(model: torch.nn.Module, tokenizer: object, steps: int, batch: int = 32) -> float:
    """Supervised steps on ``train.jsonl`` of the shipped arithmetic set: the chat-templated prompt, then
    ``Answer: <digits> </s>`` (digits as separate words), loss on the response only. Returns the last loss."""
    from megatron_hapo.data import encode_prompts, read_prompts  # noqa: PLC0415
    from megatron_hapo.data.arithmetic import EXAMPLES  # noqa: PLC0415

    examples = read_prompts(EXAMPLES / "train.jsonl").examples
    prompts = encode_prompts(examples, tokenizer, max_prompt_length=64).token_ids
    answers = [tokenizer(f"Answer: {' '.join(e.answer)}")["input_ids"] + [TOKENS["eos_token_id"]] for e in examples]
    rows = [(p + a, [-100] * len(p) + a) for p, a in zip(prompts, answers, strict=True)]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [TOKENS["pad_token_id"]] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([t + [-100] * (width - len(t)) for _, t in rows])
    mask = (torch.arange(width)[None] < torch.tensor([len(i) for i, _ in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        pick = torch.randint(len(rows), (batch,), generator=generator)
        loss = model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return float(loss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="llama")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hidden", type=int, default=128, help="hidden size, a multiple of 64 (heads of 32; a study's sizes)"
    )
    parser.add_argument("--layers", type=int, default=2, help="decoder layers")
    parser.add_argument(
        "--teach-arithmetic",
        type=int,
        default=0,
        metavar="STEPS",
        help="then this many supervised steps on the shipped training problems (answers as DAPO's 'Answer: N'), so "
        "that RL starts from a model that is sometimes right; the test problems are never seen (default 0: random)",
    )
    args = parser.parse_args()
    if args.hidden < 64 or args.hidden % 64 or args.layers < 1:
        parser.error(f"--hidden {args.hidden} / --layers {args.layers}: a multiple of 64 and at least one layer")
    config_cls, model_cls, extra = FAMILIES[args.family]
    config = config_cls(
        vocab_size=256,  # the tokenizer's words, the rest unused
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=args.hidden // 64,
        intermediate_size=2 * args.hidden,
        max_position_embeddings=512,
        **TOKENS,
        **extra,
    )
    config.architectures = [model_cls.__name__]
    torch.manual_seed(args.seed)
    model = model_cls(config).float()
    model.generation_config = transformers.GenerationConfig(**TOKENS)
    write_word_tokenizer(args.out, ARITHMETIC_WORDS)
    if args.teach_arithmetic:
        loss = teach_arithmetic(model, transformers.AutoTokenizer.from_pretrained(args.out), args.teach_arithmetic)
        print(f"taught {args.teach_arithmetic} steps on the training problems: final loss {loss:.3f}")
    model.save_pretrained(args.out)
    count = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({args.family}, {count} parameters, a {len(ARITHMETIC_WORDS)}-word tokenizer)")


if __name__ == "__main__":
    main()
