"""Validation of a resolved :class:`Config`, split per component, and warnings for knobs without effect.

Kinds are checked against the algorithm registries (the single source of truth for what exists); which fields
a kind reads comes from the same registry entries, so a changed field that the chosen kind ignores is reported.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

from megatron_hapo.algos import REGISTRIES
from megatron_hapo.config.algo import AlgoConfig
from megatron_hapo.config.errors import ConfigError, ConfigWarning
from megatron_hapo.config.run import Config

#: Sections whose kinds consume the normalised entropy h_hat (and so the ``algo.entropy`` settings).
H_HAT_CONSUMERS = ("sampling", "clip", "redistribution")


def _in_range(errors: list[str], key: str, value: float, low: float | None, high: float | None, **open_: bool) -> None:
    """Append an error unless ``low <(=) value <(=) high``; ``low_open`` / ``high_open`` make a bound strict."""
    below = low is not None and (value <= low if open_.get("low_open") else value < low)
    above = high is not None and (value >= high if open_.get("high_open") else value > high)
    if below or above:
        lo = "(" if open_.get("low_open") else "["
        hi = ")" if open_.get("high_open") else "]"
        bounds = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
        errors.append(f"{key}={value} is out of range: must be in {bounds}")


def _check_kinds(algo: AlgoConfig, errors: list[str]) -> None:
    for section, registry in REGISTRIES.items():
        kind = getattr(algo, section).kind
        if kind not in registry:
            errors.append(
                f"algo.{section}.kind={kind!r} is not a known kind; valid kinds: {', '.join(registry.kinds())}"
            )


def _check_algo_ranges(algo: AlgoConfig, errors: list[str]) -> None:
    s, e, a, c, g = algo.sampling, algo.entropy, algo.advantage, algo.clip, algo.guide_policy
    _in_range(errors, "algo.sampling.temperature", s.temperature, 0.0, None, low_open=True)
    _in_range(errors, "algo.sampling.top_p", s.top_p, 0.0, 1.0, low_open=True)
    if s.top_k != -1 and s.top_k < 1:
        errors.append(f"algo.sampling.top_k={s.top_k} must be -1 (disabled) or >= 1")
    _in_range(errors, "algo.sampling.tau", s.tau, 0.0, 1.0, high_open=True)
    _in_range(errors, "algo.entropy.pivot_quantile", e.pivot_quantile, 0.0, 1.0)
    _in_range(errors, "algo.reward_shaping.buffer_length", algo.reward_shaping.buffer_length, 0, None, low_open=True)
    _in_range(errors, "algo.reward_shaping.penalty_factor", algo.reward_shaping.penalty_factor, 0.0, None)
    _in_range(errors, "algo.advantage.eps", a.eps, 0.0, None, low_open=True)
    _in_range(errors, "algo.advantage.fallback_threshold", a.fallback_threshold, 0.0, None, low_open=True)
    _in_range(errors, "algo.advantage.entropy_weight", a.entropy_weight, 0.0, None)
    for prefix, low, high, dual in (
        ("algo.clip", c.eps_low, c.eps_high, c.dual_clip_c),
        ("algo.guide_policy", g.eps_low, g.eps_high, g.dual_clip_c),
    ):
        _in_range(errors, f"{prefix}.eps_low", low, 0.0, 1.0, low_open=True, high_open=True)
        _in_range(errors, f"{prefix}.eps_high", high, 0.0, None, low_open=True)
        if dual is not None:
            _in_range(errors, f"{prefix}.dual_clip_c", dual, 1.0, None, low_open=True)
    _in_range(errors, "algo.clip.alpha", c.alpha, 0.0, None)
    _in_range(errors, "algo.redistribution.beta", algo.redistribution.beta, 0.0, None)
    _in_range(errors, "algo.guide_policy.weight", g.weight, 0.0, None)
    _in_range(errors, "algo.rollout_correction.cap", algo.rollout_correction.cap, 1.0, None)
    _in_range(errors, "algo.group_filter.oversample", algo.group_filter.oversample, 1.0, None)


def _check_run(config: Config, errors: list[str]) -> None:
    r, o, t = config.rollout, config.optim, config.train
    _in_range(errors, "rollout.num_samples_per_prompt", r.num_samples_per_prompt, 1, None)
    _in_range(errors, "rollout.max_prompt_length", r.max_prompt_length, 1, None)
    _in_range(errors, "rollout.max_response_length", r.max_response_length, 1, None)
    _in_range(errors, "rollout.min_response_length", r.min_response_length, 0, r.max_response_length)
    _in_range(errors, "optim.lr", o.lr, 0.0, None, low_open=True)
    _in_range(errors, "optim.warmup_steps", o.warmup_steps, 0, None)
    _in_range(errors, "optim.weight_decay", o.weight_decay, 0.0, None)
    _in_range(errors, "optim.grad_clip", o.grad_clip, 0.0, None, low_open=True)
    for i, beta in enumerate(o.betas):
        _in_range(errors, f"optim.betas[{i}]", beta, 0.0, 1.0, high_open=True)
    for key in ("max_tokens_per_microbatch", "forward_max_tokens_per_microbatch"):
        if getattr(t, key) is not None:
            _in_range(errors, f"train.{key}", getattr(t, key), 16, None)
    for key in ("prompts_per_step", "mini_batch_prompts", "ppo_epochs", "total_steps"):
        _in_range(errors, f"train.{key}", getattr(t, key), 1, None)
    if t.mini_batch_prompts >= 1 and t.prompts_per_step % t.mini_batch_prompts:
        errors.append(
            f"train.mini_batch_prompts={t.mini_batch_prompts} must divide train.prompts_per_step={t.prompts_per_step}"
        )
    _in_range(errors, "train.max_consecutive_skips", t.max_consecutive_skips, 0, None)
    _check_layout_fields(config, errors)
    shaping = config.algo.reward_shaping
    if shaping.kind == "dapo_overlong" and shaping.buffer_length > r.max_response_length:
        errors.append(
            f"algo.reward_shaping.buffer_length={shaping.buffer_length} exceeds "
            f"rollout.max_response_length={r.max_response_length}"
        )


def _check_layout_fields(config: Config, errors: list[str]) -> None:
    """Ranges of the model / engine / output sections (divisibility against a cluster: ``tools/plan.py``)."""
    m, e, out = config.model, config.engine, config.output
    for key in ("tensor_parallel", "pipeline_parallel", "micro_batch_size"):
        _in_range(errors, f"model.{key}", getattr(m, key), 1, None)
    if m.virtual_pipeline is not None:
        _in_range(errors, "model.virtual_pipeline", m.virtual_pipeline, 2, None)
    for key in ("tensor_parallel", "max_num_seqs"):
        _in_range(errors, f"engine.{key}", getattr(e, key), 1, None)
    if e.cpu_kv_cache_gib is not None:
        _in_range(errors, "engine.cpu_kv_cache_gib", e.cpu_kv_cache_gib, 0.0, None, low_open=True)
    for key in ("gpu_memory_utilization", "guide_gpu_memory_utilization"):
        _in_range(errors, f"engine.{key}", getattr(e, key), 0.0, 1.0, low_open=True)
    if e.sync_tolerance is not None:
        _in_range(errors, "engine.sync_tolerance", e.sync_tolerance, 0.0, None, low_open=True)
    if e.kind == "hf" and e.tensor_parallel != 1:
        errors.append(
            f"engine.kind=hf keeps a whole model in each rank: set engine.tensor_parallel=1 (got {e.tensor_parallel})"
        )
    _in_range(errors, "output.log_interval", out.log_interval, 1, None)
    _in_range(errors, "parallel.timeout_minutes", config.parallel.timeout_minutes, 1, None)
    _in_range(errors, "output.save_rollouts_samples", out.save_rollouts_samples, 1, None)
    for key in ("eval_interval", "save_interval", "keep_last", "save_rollouts_every"):
        _in_range(errors, f"output.{key}", getattr(out, key), 0, None)
    _check_eval(config, errors)
    _in_range(errors, "output.reward_workers", out.reward_workers, 1, None)
    _in_range(errors, "output.max_reward_failure_share", out.max_reward_failure_share, 0.0, 1.0)
    _in_range(errors, "output.reward_timeout_s", out.reward_timeout_s, 0.0, None, low_open=True)


#: An evaluation set's name: it becomes a metric tag (``eval/<name>/avg@8``) and a key of the summary.
_SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
#: The named prompt templates of ``data.eval_sets.*.template`` (any other value must hold ``{problem}``).
NAMED_TEMPLATES = ("none", "dapo", "boxed")


def _check_eval(config: Config, errors: list[str]) -> None:
    """Evaluation sampling and the evaluation sets' names and templates."""
    ev = config.output.eval
    _in_range(errors, "output.eval.n", ev.n, 1, None)
    for i, k in enumerate(ev.k or ()):
        _in_range(errors, f"output.eval.k[{i}]", k, 1, ev.n)
    _in_range(errors, "output.eval.temperature", ev.temperature, 0.0, None)
    _in_range(errors, "output.eval.top_p", ev.top_p, 0.0, 1.0, low_open=True)
    if ev.max_tokens is not None:
        _in_range(errors, "output.eval.max_tokens", ev.max_tokens, 1, None)
    for name, spec in config.data.eval_sets.items():
        if not _SET_NAME.fullmatch(name) or name == "mean":
            errors.append(
                f"data.eval_sets.{name}: a set's name is letters, digits, '_', '.', '-' (and not 'mean', the "
                "average of the sets)"
            )
        if spec.template not in NAMED_TEMPLATES and "{problem}" not in spec.template:
            errors.append(
                f"data.eval_sets.{name}.template={spec.template!r}: one of {', '.join(NAMED_TEMPLATES)}, or a "
                "text holding {problem} where the prompt goes"
            )


def validate(config: Config) -> None:
    """Raise :class:`ConfigError` listing every problem of ``config`` (kinds, ranges, combinations)."""
    errors: list[str] = []
    checks: tuple[Callable[[], None], ...] = (
        lambda: _check_kinds(config.algo, errors),
        lambda: _check_algo_ranges(config.algo, errors),
        lambda: _check_run(config, errors),
    )
    for check in checks:
        check()
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _changed_fields(section: Any) -> list[str]:
    default = type(section)()
    return [f.name for f in dataclasses.fields(section) if getattr(section, f.name) != getattr(default, f.name)]


def no_effect_warnings(config: Config, *, emit: bool = False) -> list[str]:
    """Messages for fields changed from their default that the chosen composition never reads.

    Args:
        config: a validated config.
        emit: also issue each message as a :class:`ConfigWarning`.
    """
    algo, messages = config.algo, []
    for section, registry in REGISTRIES.items():
        cfg = getattr(algo, section)
        entry = registry.get(cfg.kind)
        for name in _changed_fields(cfg):
            if name != "kind" and name not in entry.knobs:
                readers = [k for k in registry.kinds() if name in registry.get(k).knobs]
                messages.append(
                    f"algo.{section}.{name}={getattr(cfg, name)!r} has no effect with algo.{section}.kind={cfg.kind!r}"
                    f" (read by kind: {', '.join(readers) or 'none'})"
                )
    h_hat_users = [s for s in H_HAT_CONSUMERS if REGISTRIES[s].get(getattr(algo, s).kind).needs_entropy]
    loss_users = [s for s in h_hat_users if s != "sampling"]
    for name in _changed_fields(algo.entropy):
        users = loss_users if name == "scope" else h_hat_users
        if not users:
            what = "the loss" if name == "scope" else "any component"
            messages.append(
                f"algo.entropy.{name}={getattr(algo.entropy, name)!r} has no effect: no h_hat consumer in "
                f"{what} (entropy_adaptive sampling / clip, hapo redistribution)"
            )
    if algo.group_filter.kind != "none" and config.rollout.num_samples_per_prompt == 1:
        messages.append(
            "algo.group_filter has no effect with rollout.num_samples_per_prompt=1 (groups of one are kept)"
        )
    if emit:
        for message in messages:
            warnings.warn(message, ConfigWarning, stacklevel=3)
    return messages
