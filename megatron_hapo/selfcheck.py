"""Algorithm self-check: every preset learns a toy verifiable task through the real ``algos`` code path.

The quickstart's first stage, seconds per preset on a laptop. The "model" is a context-free
policy, a table of logits ``[max_len, vocab]``; a response is sampled token by token (EOS = token 0 ends it) with
the configured sampling kind (HAPO's adaptive temperature fed the previous step's EntropyStats), scored by a
verifier (correct when the response holds at least ``min_hits`` copies of the target token), then every step
runs the ``algos`` functions the trainer's step runs (not its Megatron path, which ``megatron_selfcheck`` and
``rl_demo`` exercise): reward shaping -> group filter -> advantages -> old log-probs,
entropies and EntropyStats -> mini-batch policy-loss updates (AdamW, gradient clipping). ``mixed`` guide-policy
presets route zero-reward groups to a frozen guide table.

    python -m megatron_hapo.selfcheck                      # all presets in configs/algo
    python -m megatron_hapo.selfcheck configs/algo/hapo.yaml --steps 60 algo.entropy.sign=paper

Exit status 0 when every preset raised its accuracy by at least ``--min-gain``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_hapo.algos import (
    REWARD_SHAPING,
    SAMPLING,
    AdvantageInputs,
    EntropyStats,
    GuideBatch,
    compute_advantages,
    entropy_from_logits,
    grpo_advantages,
    keep_groups,
    normalized_entropy,
    policy_loss,
    shape_rewards,
    zero_reward_groups,
)
from megatron_hapo.config import Config, build_dataclass, no_effect_warnings, resolve_tree, validate

EOS, TARGET = 0, 3
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / "algo"


@dataclass
class ToyTask:
    """The verifiable toy task. A response is correct when it holds ``min_hits`` copies of ``TARGET``."""

    vocab: int = 8
    max_len: int = 8
    min_hits: int = 2
    prompts: int = 8
    group_size: int = 8


@dataclass
class Rollout:
    """One rollout batch. ``tokens``, ``mask``, ``old_log_prob``, ``entropy``: ``[N, L]``; the rest ``[N]``."""

    tokens: torch.Tensor
    mask: torch.Tensor
    old_log_prob: torch.Tensor
    entropy: torch.Tensor
    group_ids: torch.Tensor
    correct: torch.Tensor
    temperatures: torch.Tensor


def sample(
    table: torch.Tensor, config: Config, stats: EntropyStats | None, group_ids: torch.Tensor, gen: torch.Generator
) -> Rollout:
    """Sample one response per entry of ``group_ids`` from the logits table with the configured sampling kind."""
    sampling = config.algo.sampling
    num, length = group_ids.numel(), table.shape[0]
    tokens = torch.zeros(num, length, dtype=torch.long)
    mask = torch.zeros(num, length, dtype=torch.bool)
    alive = torch.ones(num, dtype=torch.bool)
    temps = []
    with torch.no_grad():
        for t in range(length):
            logits = table[t].expand(num, -1)
            temp = SAMPLING.get(sampling.kind).fn(logits, stats, **SAMPLING.params(sampling.kind, sampling))
            temps.append(temp[alive])
            probs = torch.softmax(logits / temp.unsqueeze(-1), dim=-1)
            tokens[:, t] = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
            mask[:, t] = alive
            alive = alive & (tokens[:, t] != EOS)
        old_log_prob, entropy = score(table, tokens)
    hits = ((tokens == TARGET) & mask).sum(-1)
    return Rollout(tokens, mask, old_log_prob, entropy, group_ids, hits >= ToyTask.min_hits, torch.cat(temps))


def score(table: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``tokens [N, L]`` and full-vocabulary entropies at T = 1 (the trainer's recomputation)."""
    logits = table.unsqueeze(0).expand(tokens.shape[0], -1, -1)
    log_prob = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = entropy_from_logits(logits.reshape(-1, logits.shape[-1])).reshape(tokens.shape)
    return log_prob, entropy


def guide_samples(guide: torch.Tensor, config: Config, roll: Rollout, gen: torch.Generator) -> Rollout | None:
    """Responses of the frozen guide for the zero-reward groups of ``roll`` (None when nothing is routed)."""
    cfg = config.algo.guide_policy
    if cfg.kind == "none" or not cfg.route_zero_reward_groups:
        return None
    routed = zero_reward_groups(roll.correct, roll.group_ids)
    return sample(guide, config, None, roll.group_ids[routed], gen) if bool(routed.any()) else None


def guide_batch(table: torch.Tensor, samples: Rollout | None) -> GuideBatch | None:
    """Score the guide's responses with the current policy (called per update: the policy changes)."""
    if samples is None:
        return None
    advantages = grpo_advantages(samples.correct.float() * 2 - 1, samples.group_ids)
    log_prob, _ = score(table, samples.tokens)
    return GuideBatch(log_prob=log_prob, guide_log_prob=samples.old_log_prob, advantages=advantages, mask=samples.mask)


def train_preset(config: Config, steps: int, seed: int = 0) -> dict[str, float]:
    """Run ``steps`` RL steps of the toy task under ``config``; return accuracy and sampling metrics."""
    task, gen = ToyTask(), torch.Generator().manual_seed(seed)
    table = torch.nn.Parameter(torch.randn(task.max_len, task.vocab, generator=gen) * 0.1)
    guide = table.detach().clone()
    guide[:, TARGET] += 1.5  # a better, frozen policy
    optim = torch.optim.AdamW([table], lr=0.05, weight_decay=0.0)
    group_ids = torch.arange(task.prompts).repeat_interleave(task.group_size)
    stats, accuracy, temps = None, [], []
    for _ in range(steps):
        roll = sample(table, config, stats, group_ids, gen)
        accuracy.append(float(roll.correct.float().mean()))
        temps.append(roll.temperatures)
        rewards = shape_rewards(
            config.algo, roll.correct.float() * 2 - 1, roll.mask.sum(-1), max_length=config.rollout.max_response_length
        )
        keep = keep_groups(config.algo, roll.correct.float(), roll.group_ids)
        _, stats = normalized_entropy(
            roll.entropy, roll.mask, pivot_quantile=config.algo.entropy.pivot_quantile, sign=config.algo.entropy.sign
        )
        guided = guide_samples(guide, config, roll, gen)
        if not bool(keep.any()):
            continue
        inputs = AdvantageInputs(
            rewards[keep], roll.group_ids[keep], roll.mask[keep], roll.correct[keep], roll.entropy[keep]
        )
        advantages = compute_advantages(config.algo, inputs)
        tokens, old_log_prob, mask = roll.tokens[keep], roll.old_log_prob[keep], roll.mask[keep]
        for rows in torch.arange(tokens.shape[0]).chunk(2):
            log_prob, entropy = score(table, tokens[rows])
            loss, _ = policy_loss(
                log_prob,
                old_log_prob[rows],
                advantages[rows],
                mask[rows],
                algo=config.algo,
                entropy=entropy,
                guide_batch=guide_batch(table, guided),
            )
            optim.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(table, 1.0)
            optim.step()
    all_temps = torch.cat(temps)
    return {
        "acc_first": sum(accuracy[:5]) / 5,
        "acc_last": sum(accuracy[-5:]) / 5,
        "temp_min": float(all_temps.min()),
        "temp_max": float(all_temps.max()),
    }


def toy_config(path: Path, overrides: list[str]) -> Config:
    """The preset resized to the toy task: responses of ``ToyTask.max_len`` tokens, overlong buffer of half that."""
    task = ToyTask()
    toy = [f"rollout.max_response_length={task.max_len}", f"rollout.num_samples_per_prompt={task.group_size}"]
    config = build_dataclass(Config, resolve_tree(path, [*toy, *overrides]))
    shaping = config.algo.reward_shaping
    if "buffer_length" in REWARD_SHAPING.get(shaping.kind).knobs:
        shaping.buffer_length = min(shaping.buffer_length, task.max_len // 2)
    validate(config)
    no_effect_warnings(config, emit=True)
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", help="preset files (default: every configs/algo/*.yaml)")
    parser.add_argument("--steps", type=int, default=40, help="RL steps per preset")
    parser.add_argument("--min-gain", type=float, default=0.2, help="required accuracy gain (last 5 - first 5 steps)")
    parser.add_argument("--seed", type=int, default=0)
    args, overrides = parser.parse_known_args(argv)
    paths = [Path(p) for p in args.configs if "=" not in p] or sorted(PRESET_DIR.glob("*.yaml"))
    overrides += [p for p in args.configs if "=" in p]
    torch.manual_seed(args.seed)
    failures = 0
    print(f"{'preset':<14}{'acc first':>10}{'acc last':>10}{'T min':>8}{'T max':>8}  verdict")
    for path in paths:
        config = toy_config(path, overrides)
        result = train_preset(config, args.steps, args.seed)
        ok = result["acc_last"] - result["acc_first"] >= args.min_gain
        failures += not ok
        print(
            f"{path.stem:<14}{result['acc_first']:>10.3f}{result['acc_last']:>10.3f}"
            f"{result['temp_min']:>8.3f}{result['temp_max']:>8.3f}  {'learns' if ok else 'FAILED'}"
        )
    print("self-check passed" if not failures else f"self-check FAILED for {failures} preset(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
