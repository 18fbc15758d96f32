"""The demos' tiny models and verifiable tasks (token ids, no tokenizer).

- The counting task (:func:`count_task`): a response is right when it holds at least ``MIN_HITS`` copies of the
  token ``TARGET`` before it ends (EOS); a random model on an 8-token vocabulary is right about a fifth of the
  time, so RL has a signal from the first step.
- The modular-sum task (:func:`modular_sum_task`, :mod:`megatron_hapo.rewards.synthetic`): the prompt is
  ``a + b =`` over ten digit tokens, right when the first response token is the digit of ``(a + b) mod 10``; a
  random model is almost never right, so a supervised warm-up comes first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_hapo.rewards.synthetic import (
    DIGIT_TOKENS,
    EQUALS_TOKEN,
    PLUS_TOKEN,
    first_token_equals,
    modular_sum_prompts,
)

#: The counting task: token 0 ends a response; a response is right with ``MIN_HITS`` copies of ``TARGET``.
COUNT_EOS, TARGET, MIN_HITS = 0, 3, 2


@dataclass
class Task:
    """A task's data: training prompts and answers, the evaluation set, the verifier and warm-up examples."""

    prompts: list[list[int]]
    answers: list[Any]
    eval_prompts: list[list[int]]
    eval_answers: list[Any]
    verdict: Callable[[Sequence[int], Any], tuple[float, bool]]
    """``verdict(response token ids, answer) -> (reward, correct)``, a module-level function (picklable for the
    verifier worker processes)."""
    warmup_examples: list[tuple[list[int], list[int]]]
    """``(prompt, reference answer tokens)`` for a supervised warm-up (empty: none)."""
    token_names: dict[int, str] = field(default_factory=dict)
    """How the rollout dumps show the task's tokens (others as ``<id>``)."""


@dataclass(frozen=True)
class TokenNames:
    """Decodes a demo task's token ids for the rollout dumps (the ``decode`` / ``batch_decode`` a tokenizer has)."""

    names: dict[int, str]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        del skip_special_tokens  # the demos have no special tokens to skip
        return " ".join(self.names.get(int(i), f"<{int(i)}>") for i in ids)

    def batch_decode(self, batch: Sequence[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids, skip_special_tokens) for ids in batch]


def write_tiny_llama(path: Path, *, vocab: int, hidden: int, eos: int, seed: int = 0) -> None:
    """A random 2-layer Llama (head_dim 64 at ``hidden`` 128, 32 at 64) as an HF checkpoint in ``path``."""
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()  # quiet: the demos print progress lines and tables
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=eos,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path, safe_serialization=True)


def write_count_guide(policy_dir: Path, path: Path, boost: float = 1.5) -> None:
    """A better frozen guide for mixed-policy DAPO on the counting task: the policy with ``TARGET``'s output row
    moved along the mean final hidden state, so that its logit rises by about ``boost`` on average."""
    import transformers  # noqa: PLC0415

    transformers.utils.logging.disable_progress_bar()
    model = transformers.LlamaForCausalLM.from_pretrained(policy_dir)
    with torch.no_grad():
        tokens = torch.randint(1, model.config.vocab_size, (64, 9), generator=torch.Generator().manual_seed(0))
        hidden = model.model(tokens).last_hidden_state.reshape(-1, model.config.hidden_size).mean(0)
        model.lm_head.weight[TARGET] += boost * hidden / hidden.square().sum()
    model.save_pretrained(path, safe_serialization=True)


def count_verdict(token_ids: Sequence[int], answer: Any) -> tuple[float, bool]:
    """+1 / -1 and the verdict: at least ``MIN_HITS`` copies of ``TARGET`` up to the end of the response."""
    del answer  # the target is the same for every prompt
    hits = sum(1 for token in token_ids if token == TARGET)
    return (1.0, True) if hits >= MIN_HITS else (-1.0, False)


def count_task(vocab: int, count: int = 256, seed: int = 0) -> Task:
    """The counting task: one-token prompts drawn from ``1 .. vocab - 1``."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [[int(t)] for t in torch.randint(1, vocab, (count,), generator=gen)]
    every = [[t] for t in range(1, vocab)]
    names = {COUNT_EOS: "</s>", TARGET: "*"}
    return Task(prompts, [None] * count, every, [None] * len(every), count_verdict, [], names)


def modular_sum_task(max_addend: int, eos: int, count: int = 256, seed: int = 0) -> Task:
    """The modular-sum task; the evaluation set is every distinct prompt, the warm-up answers are ``[digit, EOS]``."""
    prompts, answers = modular_sum_prompts(count, seed, max_addend=max_addend)
    pairs = [(a, b) for a in range(10) for b in range(max_addend + 1)]
    eval_prompts = [[DIGIT_TOKENS[a], PLUS_TOKEN, DIGIT_TOKENS[b], EQUALS_TOKEN] for a, b in pairs]
    eval_answers = [DIGIT_TOKENS[(a + b) % 10] for a, b in pairs]
    examples = [(p, [a, eos]) for p, a in zip(prompts, answers, strict=True)]
    names = {eos: "</s>", PLUS_TOKEN: "+", EQUALS_TOKEN: "="} | {t: str(d) for d, t in enumerate(DIGIT_TOKENS)}
    return Task(prompts, answers, eval_prompts, eval_answers, first_token_equals, examples, names)
