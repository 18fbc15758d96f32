"""Tests of the component registries and their composition (megatron_hapo.algos.compose, spec 1.1 and 2.6).

The config is a duck-typed ``types.SimpleNamespace`` tree mirroring the AlgoConfig fields, so this layer is tested
without the config package.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from helpers import F64

from megatron_hapo.algos import (
    ADVANTAGE,
    AGGREGATION,
    AGGREGATION_MODES,
    CLIP,
    GROUP_FILTER,
    GUIDE_POLICY,
    RATIO,
    RATIO_LEVELS,
    REDISTRIBUTION,
    REGISTRIES,
    REWARD_SHAPING,
    ROLLOUT_CORRECTION,
    SAMPLING,
    AdvantageInputs,
    GuideBatch,
    Registry,
    aggregate_loss,
    clipped_surrogate,
    compute_advantages,
    grpo_advantages,
    grpo_s_advantages,
    gtpo_advantages,
    gtpo_token_rewards,
    hapo_advantages,
    keep_groups,
    needs_entropy,
    normalized_entropy,
    policy_loss,
    shape_rewards,
    token_policy_loss,
)

PLAIN = {
    "sampling": {"kind": "fixed", "temperature": 1.0, "top_p": 1.0, "top_k": -1, "tau": 0.05},
    "entropy": {"pivot_quantile": 0.8, "sign": "published", "scope": "microbatch"},
    "reward_shaping": {"kind": "none", "buffer_length": 4096, "penalty_factor": 1.0},
    "group_filter": {"kind": "none", "metric": "acc", "max_generation_rounds": 10},
    "advantage": {
        "kind": "grpo",
        "std_norm": True,
        "eps": 1e-6,
        "fallback_threshold": 5.0,
        "fallback_includes_padding": True,
        "reward_weight": 1.0,
        "entropy_weight": 0.1,
        "gtpo_norm": "joint",
    },
    "clip": {"kind": "fixed", "eps_low": 0.2, "eps_high": 0.2, "alpha": 1.0, "dual_clip_c": None},
    "redistribution": {"kind": "none", "beta": 1.0},
    "ratio": {"kind": "token"},
    "aggregation": {"kind": "token-mean"},
    "guide_policy": {
        "kind": "none",
        "weight": 1.0,
        "route_zero_reward_groups": True,
        "model_path": None,
        "eps_low": 0.2,
        "eps_high": 0.28,
        "dual_clip_c": None,
    },
    "rollout_correction": {"kind": "none", "cap": 2.0},
}


def make_algo(**overrides: dict) -> SimpleNamespace:
    """Plain-GRPO config with the given per-section field overrides."""
    sections = {name: SimpleNamespace(**{**fields, **overrides.get(name, {})}) for name, fields in PLAIN.items()}
    return SimpleNamespace(**sections)


HAPO = {
    "advantage": {"kind": "hapo_token"},
    "clip": {"kind": "entropy_adaptive", "eps_low": 0.2, "eps_high": 0.2, "alpha": 1.0, "dual_clip_c": 10.0},
    "redistribution": {"kind": "hapo", "beta": 1.0},
    "aggregation": {"kind": "token-mean"},
}


def _batch(seed: int = 0, batch: int = 6, length: int = 5):
    """Three groups of two responses (rewards +-1 and shaped values), every response >= 1 valid token."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=F64) * 3
    log_prob = old + 0.25 * torch.randn(batch, length, generator=gen, dtype=F64)
    lengths = torch.tensor([5, 2, 3, 1, 4, 5])[:batch]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    rewards = torch.tensor([1.0, -1.0, 0.5, -1.0, 1.0, 0.75], dtype=F64)[:batch]
    groups = ["p0", "p0", "p1", "p1", "p2", "p2"][:batch]
    entropy = torch.rand(batch, length, generator=gen, dtype=F64) * 3 + 0.01
    return old, log_prob, mask, rewards, groups, entropy


# ---------------------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------------------
def test_registry_unknown_kind_lists_valid_kinds():
    reg = Registry("demo")
    reg.register("alpha")(lambda: 1)
    reg.register("beta")(lambda: 2)
    with pytest.raises(ValueError, match=r"unknown demo kind 'gamma'.*alpha, beta"):
        reg.get("gamma")
    assert reg.kinds() == ("alpha", "beta")
    assert "alpha" in reg and "gamma" not in reg


def test_registry_duplicate_registration_raises_and_keeps_first():
    reg = Registry("demo")
    first = reg.register("alpha")(lambda: 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(lambda: 2)
    assert reg.get("alpha").fn is first


def test_registry_passes_declared_fields_and_refuses_ones_its_function_drops():
    reg = Registry("demo")

    @reg.register("k", uses=("x",), needs_entropy=True, read_by={"y": "somewhere"})
    def fn(data, *, x):
        return data + x

    cfg = SimpleNamespace(x=3, y=4, z=5)
    assert reg.params("k", cfg) == {"x": 3}  # y is read elsewhere, z is not declared
    assert reg.get("k").needs_entropy and reg.get("k").knobs == ("x", "y")
    with pytest.raises(ValueError, match=r"declares uses=\['y'\] that its function does not take"):
        reg.register("dropped", uses=("x", "y"))(fn)


def test_every_registered_knob_is_consumed():
    """Each ``uses`` field is a parameter of its kind's function (registration refuses it otherwise), and each
    ``read_by`` module really reads the field (``.field`` in its source)."""
    import importlib
    import inspect as inspect_module

    from megatron_hapo.config.validation import REGISTRIES

    checked = 0
    for registry in REGISTRIES.values():
        for kind in registry.kinds():
            entry = registry.get(kind)
            assert set(entry.uses) <= set(inspect_module.signature(entry.fn).parameters), (registry.component, kind)
            for name, module in entry.read_by:
                source = inspect_module.getsource(importlib.import_module(module))
                assert f".{name}" in source, f"{registry.component}.{name} ({kind}) is not read in {module}"
                checked += 1
    assert checked >= 8  # clip dual_clip_c x 2, sampling top_p / top_k x 2, group rounds, guide weight / route / path


def test_real_registries_kinds():
    assert ADVANTAGE.kinds() == ("grpo", "hapo_token", "gtpo", "grpo_s")
    assert CLIP.kinds() == ("fixed", "entropy_adaptive")
    assert REDISTRIBUTION.kinds() == ("none", "hapo")
    assert RATIO.kinds() == RATIO_LEVELS
    assert AGGREGATION.kinds() == AGGREGATION_MODES
    assert set(SAMPLING.kinds()) == {"fixed", "entropy_adaptive"}
    assert set(REWARD_SHAPING.kinds()) == {"none", "dapo_overlong"}
    assert set(GROUP_FILTER.kinds()) == {"none", "all_equal"}
    assert set(GUIDE_POLICY.kinds()) == {"none", "mixed"}
    assert set(ROLLOUT_CORRECTION.kinds()) == {"none", "tis"}
    assert set(REGISTRIES) == set(PLAIN) - {"entropy"}
    with pytest.raises(ValueError, match="already registered"):
        ADVANTAGE.register("grpo")(lambda inputs: inputs)
    assert ADVANTAGE.kinds() == ("grpo", "hapo_token", "gtpo", "grpo_s")


@pytest.mark.parametrize(
    ("section", "valid"),
    [
        ("advantage", "hapo_token"),
        ("clip", "entropy_adaptive"),
        ("redistribution", "hapo"),
        ("ratio", "token"),
        ("aggregation", "token-mean"),
        ("guide_policy", "mixed"),
    ],
)
def test_unknown_kind_in_config_raises_listing_valid_kinds(section, valid):
    old, log_prob, mask, rewards, groups, _ = _batch()
    algo = make_algo(**{section: {"kind": "bogus"}})
    with pytest.raises(ValueError, match=f"bogus.*{valid}"):
        if section == "advantage":
            compute_advantages(algo, AdvantageInputs(rewards, groups, mask))
        else:
            policy_loss(log_prob, old, rewards, mask, algo=algo)


def test_needs_entropy():
    assert not needs_entropy(make_algo())
    assert needs_entropy(make_algo(clip={"kind": "entropy_adaptive"}))
    assert needs_entropy(make_algo(redistribution={"kind": "hapo"}))
    assert needs_entropy(make_algo(**HAPO))


# ---------------------------------------------------------------------------------------------------------------
# The key test: plain GRPO composition == a plain reference written from the spec formula
# ---------------------------------------------------------------------------------------------------------------
def plain_grpo_loss(log_prob, old_log_prob, rewards, groups, mask):
    """DeepSeekMath GRPO loss (spec 1.1): (R - mean) / (std + eps) with Bessel std, token ratio, symmetric clip
    0.2, seq-mean-token-mean. No KL."""
    batch, length = mask.shape
    total = 0.0
    for i in range(batch):
        members = [rewards[k].item() for k in range(batch) if groups[k] == groups[i]]
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        adv = (rewards[i].item() - mean) / (std + 1e-6)
        terms = []
        for t in range(length):
            if mask[i, t]:
                ratio = torch.exp(log_prob[i, t] - old_log_prob[i, t])
                terms.append(-torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.2) * adv))
        total = total + sum(terms) / len(terms)
    return total / batch


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plain_grpo_composition_equals_plain_reference(seed):
    old, log_prob, mask, rewards, groups, _ = _batch(seed)
    algo = make_algo(aggregation={"kind": "seq-mean-token-mean"})
    advantages = compute_advantages(algo, AdvantageInputs(rewards=rewards, group_ids=groups, mask=mask))
    lp_composed = log_prob.clone().requires_grad_()
    loss, metrics = policy_loss(lp_composed, old, advantages, mask, algo=algo)
    loss.backward()
    lp_ref = log_prob.clone().requires_grad_()
    ref = plain_grpo_loss(lp_ref, old, rewards, groups, mask)
    ref.backward()
    assert torch.allclose(loss, ref)
    assert torch.allclose(lp_composed.grad, lp_ref.grad)
    assert metrics["loss"].item() == loss.item()
    assert metrics["clip_frac"].item() > 0  # the batch exercises the clip


def test_plain_grpo_composition_is_exact_in_float64():
    old, log_prob, mask, rewards, groups, _ = _batch(0)
    algo = make_algo(aggregation={"kind": "seq-mean-token-mean"})
    advantages = compute_advantages(algo, AdvantageInputs(rewards=rewards, group_ids=groups, mask=mask))
    loss, _ = policy_loss(log_prob, old, advantages, mask, algo=algo)
    ref = plain_grpo_loss(log_prob, old, rewards, groups, mask)
    assert torch.allclose(loss, ref, rtol=1e-12, atol=1e-15)


def test_grpo_advantages_broadcast_over_valid_tokens_only():
    _, _, mask, rewards, groups, _ = _batch()
    advantages = compute_advantages(make_algo(), AdvantageInputs(rewards, groups, mask))
    expected = grpo_advantages(rewards, groups)[:, None] * mask
    assert torch.equal(advantages, expected)


def test_global_denominator_through_policy_loss():
    old, log_prob, mask, rewards, groups, _ = _batch()
    algo = make_algo()
    advantages = compute_advantages(algo, AdvantageInputs(rewards, groups, mask))
    full, _ = policy_loss(log_prob, old, advantages, mask, algo=algo)
    total = mask.sum()
    parts = [
        policy_loss(log_prob[s], old[s], advantages[s], mask[s], algo=algo, global_denominator=total)[0]
        for s in (slice(0, 4), slice(4, 6))
    ]
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# HAPO composition == loop reference of spec 2.3 + 2.6 on the published semantics
# ---------------------------------------------------------------------------------------------------------------
def reference_hapo_advantages(rewards, mask, groups):
    """Spec 2.3, published: token-weighted mean / population std; GRPO fallback if any |A| >= 5 over the
    group's [G, L] tensor including padding positions (value (0 - mu) / (sigma + eps))."""
    batch, length = mask.shape
    lengths = [int(mask[i].sum()) for i in range(batch)]
    out = []
    for i in range(batch):
        members = [k for k in range(batch) if groups[k] == groups[i]]
        tokens = [rewards[k].item() for k in members for _ in range(lengths[k])]
        mu = sum(tokens) / len(tokens)
        sigma = math.sqrt(sum((x - mu) ** 2 for x in tokens) / len(tokens))
        entries = [
            ((rewards[k].item() if t < lengths[k] else 0.0) - mu) / (sigma + 1e-6)
            for k in members
            for t in range(length)
        ]
        if any(abs(v) >= 5.0 for v in entries):
            values = [rewards[k].item() for k in members]
            mean = sum(values) / len(values)
            std = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
            out.append((rewards[i].item() - mean) / (std + 1e-6))
        else:
            out.append((rewards[i].item() - mu) / (sigma + 1e-6))
    return out


def reference_hapo_loss(log_prob, old_log_prob, advantages, entropy, mask, sign="published", c=10.0):
    """Spec 2.6: h_hat over this (micro-)batch's valid tokens (spec 2.1), ada clip, then ada advantage with the
    adapted bounds, clipped loss with per-token bounds, dual clip c for A < 0, token-mean."""
    batch, length = mask.shape
    cells = [(i, t) for i in range(batch) for t in range(length) if mask[i, t]]
    log_h = {(i, t): math.log(max(float(entropy[i, t].float()), 1e-8)) for (i, t) in cells}
    ordered = sorted(log_h.values())
    pivot = ordered[round(0.8 * (len(ordered) - 1))]
    rms = math.sqrt(max(sum((v - pivot) ** 2 for v in ordered) / len(ordered), 1e-8))
    h = {cell: (v - pivot) / rms for cell, v in log_h.items()}
    pos_max = max([v for v in h.values() if v > 0] + [1e-8])
    neg_min = min([v for v in h.values() if v < 0] + [-1e-8])
    scale_neg = 1.0 / neg_min if sign == "published" else 1.0 / abs(neg_min)
    total = 0.0
    for cell in cells:
        h_hat = h[cell] / pos_max if h[cell] > 0 else h[cell] * scale_neg
        eps_low = 0.2 * (1 - h_hat) if h_hat <= 0 else 0.2
        eps_high = 0.2 * (1 + h_hat) if h_hat > 0 else 0.2
        ratio = torch.exp(log_prob[cell] - old_log_prob[cell])
        a = advantages[cell[0]]
        inside = 1 - eps_low / 2 < ratio.item() < 1 + eps_high / 2
        scaled = a * (1 + h_hat)
        # high entropy: amplify once the ratio left the neutral zone; low entropy: scale while inside it
        a_hat = (a if inside else scaled) if h_hat > 0 else (scaled if inside else a)
        loss = torch.maximum(-a_hat * ratio, -a_hat * torch.clamp(ratio, 1 - eps_low, 1 + eps_high))
        if a_hat < 0:
            loss = torch.minimum(loss, torch.tensor(-a_hat * c, dtype=F64))
        total = total + loss
    return total / len(cells)


@pytest.mark.parametrize("sign", ["published", "paper"])
@pytest.mark.parametrize("seed", [0, 1])
def test_hapo_composition_equals_loop_reference(sign, seed):
    old, log_prob, mask, rewards, groups, entropy = _batch(seed)
    log_prob[1, 0] = old[1, 0] + 2.5  # ratio 12.2 on a negative-advantage response: dual clip (c = 10)
    log_prob[0, 1] = old[0, 1] + 0.5  # ratio 1.65 on a positive one: beyond any upper bound
    algo = make_algo(**HAPO, entropy={"pivot_quantile": 0.8, "sign": sign, "scope": "microbatch"})

    advantages = compute_advantages(algo, AdvantageInputs(rewards, groups, mask))
    ref_adv = reference_hapo_advantages(rewards, mask, groups)
    torch.testing.assert_close(advantages, torch.tensor(ref_adv, dtype=F64)[:, None] * mask, atol=1e-10, rtol=1e-10)

    lp_composed = log_prob.clone().requires_grad_()
    loss, metrics = policy_loss(lp_composed, old, advantages, mask, algo=algo, entropy=entropy)
    loss.backward()
    lp_ref = log_prob.clone().requires_grad_()
    ref = reference_hapo_loss(lp_ref, old, ref_adv, entropy, mask, sign=sign)
    ref.backward()
    # h_hat and the adapted bounds are float32 in the implementation: agreement to ~1e-6, not bitwise
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-7)
    assert torch.allclose(lp_composed.grad, lp_ref.grad, rtol=1e-5, atol=1e-7)
    assert metrics["dual_clip_frac"].item() > 0
    assert metrics["eps_high_mean"].item() > 0.2  # high bounds widened
    if sign == "published":
        assert metrics["eps_low_mean"].item() == pytest.approx(0.2)  # code reality: eps_low never moves
    else:
        assert metrics["eps_low_mean"].item() > 0.2


def test_hapo_differs_from_plain_token_mean_dapo():
    old, log_prob, mask, rewards, groups, entropy = _batch()
    algo = make_algo(**HAPO)
    advantages = compute_advantages(algo, AdvantageInputs(rewards, groups, mask))
    hapo, _ = policy_loss(log_prob, old, advantages, mask, algo=algo, entropy=entropy)
    plain, _ = policy_loss(log_prob, old, advantages, mask, algo=make_algo(clip={"dual_clip_c": 10.0}))
    assert not torch.allclose(hapo, plain)


def test_precomputed_h_hat_is_used_instead_of_entropy():
    old, log_prob, mask, rewards, groups, entropy = _batch()
    algo = make_algo(**HAPO)
    advantages = compute_advantages(algo, AdvantageInputs(rewards, groups, mask))
    h_hat, _ = normalized_entropy(entropy, mask, pivot_quantile=0.8)
    from_entropy, _ = token_policy_loss(log_prob, old, advantages, mask, algo=algo, entropy=entropy)
    from_h_hat, _ = token_policy_loss(log_prob, old, advantages, mask, algo=algo, h_hat=h_hat)
    assert torch.equal(from_entropy, from_h_hat)
    # a different (e.g. step-scope) h_hat changes the loss: the argument is really used
    other, _ = token_policy_loss(log_prob, old, advantages, mask, algo=algo, h_hat=torch.ones_like(h_hat))
    assert not torch.equal(other, from_entropy)


def test_hapo_loss_without_entropy_raises():
    old, log_prob, mask, rewards, _, _ = _batch()
    with pytest.raises(ValueError, match="entropy"):
        token_policy_loss(log_prob, old, rewards, mask, algo=make_algo(**HAPO))


def test_hapo_token_fallback_includes_padding_flag():
    # the H5 example: all-correct group differing by an overlong penalty, both responses 2 of 4 tokens long
    rewards = torch.tensor([1.0, 0.9], dtype=F64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0]]).bool()
    inputs = AdvantageInputs(rewards, [0, 0], mask)
    with_pad = compute_advantages(make_algo(advantage={"kind": "hapo_token"}), inputs)
    valid_only = compute_advantages(
        make_algo(advantage={"kind": "hapo_token", "fallback_includes_padding": False}), inputs
    )
    lengths = mask.sum(-1)
    torch.testing.assert_close(with_pad, hapo_advantages(rewards, lengths, [0, 0], padded_length=4)[:, None] * mask)
    torch.testing.assert_close(valid_only, hapo_advantages(rewards, lengths, [0, 0])[:, None] * mask)
    assert not torch.allclose(with_pad, valid_only)


# ---------------------------------------------------------------------------------------------------------------
# Other components through the composition
# ---------------------------------------------------------------------------------------------------------------
def test_gtpo_and_grpo_s_through_compute_advantages():
    _, _, mask, rewards, groups, entropy = _batch()
    correct = rewards > 0
    inputs = AdvantageInputs(rewards, groups, mask, correct=correct, entropy=entropy)
    for norm in ("joint", "per_polarity"):
        got = compute_advantages(make_algo(advantage={"kind": "gtpo", "gtpo_norm": norm}), inputs)
        token_rewards = gtpo_token_rewards(rewards, correct, entropy, mask, groups)
        assert torch.equal(got, gtpo_advantages(token_rewards, correct, mask, groups, norm=norm))
    got = compute_advantages(make_algo(advantage={"kind": "grpo_s"}), inputs)
    expected = grpo_s_advantages(rewards, correct, entropy, mask, groups)[:, None] * mask
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="entropies"):
        compute_advantages(make_algo(advantage={"kind": "gtpo"}), AdvantageInputs(rewards, groups, mask))


def test_sequence_ratio_composition():
    old, log_prob, mask, rewards, groups, _ = _batch()
    algo = make_algo(ratio={"kind": "sequence_mean"}, clip={"eps_high": 0.28})
    advantages = grpo_advantages(rewards, groups)
    got, _ = token_policy_loss(log_prob, old, advantages, mask, algo=algo)
    # every valid token of a response carries the same loss: its sequence ratio (mean of token ratios) clipped
    for i in range(mask.shape[0]):
        ratios = torch.exp(log_prob[i] - old[i])[mask[i]]
        w = ratios.mean().item()
        a = advantages[i].item()
        expected = max(-a * w, -a * min(max(w, 0.8), 1.28))
        torch.testing.assert_close(got[i][mask[i]], torch.full_like(ratios, expected), atol=1e-6, rtol=1e-6)


def test_shape_rewards_and_keep_groups():
    rewards, lengths = torch.tensor([1.0, -1.0, 1.0]), torch.tensor([10, 18, 30])
    assert torch.equal(shape_rewards(make_algo(), rewards, lengths, max_length=20), rewards)
    algo = make_algo(reward_shaping={"kind": "dapo_overlong", "buffer_length": 4, "penalty_factor": 1.0})
    # max 20, buffer 4: 10 -> 0, 18 -> -(18 - 16) / 4 = -0.5, 30 -> -1 (clamped)
    torch.testing.assert_close(shape_rewards(algo, rewards, lengths, max_length=20), torch.tensor([1.0, -1.5, 0.0]))
    metric = torch.tensor([1.0, 1.0, 0.0, 1.0])
    assert keep_groups(make_algo(), metric, [0, 0, 1, 1]).tolist() == [True] * 4
    filtered = keep_groups(make_algo(group_filter={"kind": "all_equal"}), metric, [0, 0, 1, 1])
    assert filtered.tolist() == [False, False, True, True]


def test_sampling_registry_kinds():
    logits = torch.randn(3, 7)
    fixed = SAMPLING.get("fixed").fn(logits, None, **SAMPLING.params("fixed", make_algo().sampling))
    torch.testing.assert_close(fixed, torch.ones(3))
    adaptive_cfg = make_algo(sampling={"kind": "entropy_adaptive"}).sampling
    no_stats = SAMPLING.get("entropy_adaptive").fn(logits, None, **SAMPLING.params("entropy_adaptive", adaptive_cfg))
    torch.testing.assert_close(no_stats, torch.ones(3))  # first step: no stats yet -> plain temperature


def test_guide_policy_term_is_added_with_its_weight():
    old, log_prob, mask, rewards, groups, _ = _batch()
    gen = torch.Generator().manual_seed(5)
    guide_lp = -torch.rand(4, 5, generator=gen, dtype=F64) * 2
    guide_cur = guide_lp + 0.3 * torch.randn(4, 5, generator=gen, dtype=F64)
    guide_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).bool()
    guide_adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=F64)
    batch = GuideBatch(log_prob=guide_cur, guide_log_prob=guide_lp, advantages=guide_adv, mask=guide_mask)
    advantages = grpo_advantages(rewards, groups)

    on_policy, _ = policy_loss(log_prob, old, advantages, mask, algo=make_algo())
    algo = make_algo(guide_policy={"kind": "mixed", "weight": 0.5, "eps_low": 0.2, "eps_high": 0.28})
    mixed, metrics = policy_loss(log_prob, old, advantages, mask, algo=algo, guide_batch=batch)
    guide_per_token, _ = clipped_surrogate(
        guide_cur, guide_lp, guide_adv, eps_low=0.2, eps_high=0.28, dual_clip_c=None, mask=guide_mask
    )
    guide_loss = aggregate_loss(guide_per_token, guide_mask, "token-mean")
    torch.testing.assert_close(mixed, on_policy + 0.5 * guide_loss)
    torch.testing.assert_close(metrics["guide_loss"], guide_loss)
    assert "guide_clip_frac" in metrics and "guide_approx_kl" in metrics
    # kind mixed but nothing routed this step: the on-policy loss alone
    alone, alone_metrics = policy_loss(log_prob, old, advantages, mask, algo=algo, guide_batch=None)
    torch.testing.assert_close(alone, on_policy)
    assert "guide_loss" not in alone_metrics
    # kind none ignores a guide batch
    ignored, _ = policy_loss(log_prob, old, advantages, mask, algo=make_algo(), guide_batch=batch)
    torch.testing.assert_close(ignored, on_policy)
