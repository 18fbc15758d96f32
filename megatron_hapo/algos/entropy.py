"""Token entropy and HAPO's shared entropy normaliser (spec 2.1).

The normaliser maps each token's entropy H to ``h_hat``, a signed distance from a pivot (the 80th percentile
of log-entropy) in units of the RMS deviation, then rescales each side of the pivot to [0, 1] by its largest
deviation. Its four statistics travel as :class:`EntropyStats`: the trainer computes them over a batch, the
rollout engine applies them to the next step's decode logits.

Sign convention (ambiguity H1). The published HAPO code divides the negative side by ``neg_min < 0``, so
below-pivot tokens get a *positive* ``h_hat`` and ``h_hat`` lies in [0, 1] ("distance from the pivot"). The
paper describes ``h_hat`` in [-1, 1], negative for low-entropy tokens. Both are expressed by one formula,
``h_hat = h * scale_pos if h > 0 else h * scale_neg``; only the sign of ``scale_neg`` differs, so the stats
carry the convention and every consumer (loss, vLLM logits processor) applies them identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from megatron_hapo.algos._checks import as_mask, check_finite, check_no_nan, check_range

EntropySign = Literal["published", "paper"]
ENTROPY_SIGNS: tuple[str, ...] = ("published", "paper")

#: Floor applied to the entropy before the log and to the RMS, as in the published ``compute_entropy_h``.
ENTROPY_EPS = 1e-8


@dataclass(frozen=True)
class EntropyStats:
    """The statistics of spec 2.1, as 0-dim float32 tensors (on the device they were computed on).

    Attributes:
        pivot: the pivot quantile of log-entropy over valid tokens.
        rms: root mean square of (log-entropy - pivot) over valid tokens (not a standard deviation).
        scale_pos: ``1 / max(h)`` over valid tokens above the pivot.
        scale_neg: ``1 / min(h)`` (negative: published sign) or ``1 / |min(h)|`` (positive: paper sign) over
            valid tokens below the pivot.
    """

    pivot: torch.Tensor
    rms: torch.Tensor
    scale_pos: torch.Tensor
    scale_neg: torch.Tensor

    @classmethod
    def from_floats(cls, pivot: float, rms: float, scale_pos: float, scale_neg: float) -> EntropyStats:
        """Build stats from Python floats (e.g. read back from a checkpoint or a request's extra args)."""
        values = (pivot, rms, scale_pos, scale_neg)
        return cls(*(torch.tensor(float(v), dtype=torch.float32) for v in values))

    @classmethod
    def neutral(cls) -> EntropyStats:
        """Stats that map every token to ``h_hat = 0`` (used when a batch has no valid token)."""
        return cls.from_floats(0.0, 1.0, 0.0, 0.0)

    def as_floats(self) -> dict[str, float]:
        """The four statistics as Python floats (forces a device sync on GPU)."""
        return {name: float(getattr(self, name)) for name in ("pivot", "rms", "scale_pos", "scale_neg")}

    def to(self, device: torch.device | str) -> EntropyStats:
        """A copy of the stats on ``device``."""
        return EntropyStats(*(getattr(self, n).to(device) for n in ("pivot", "rms", "scale_pos", "scale_neg")))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary entropy (natural log) of ``softmax(logits)``, in float32.

    Computed as ``H = log Z - sum_v e_v z_v / Z`` with ``z = logits - max``, ``e = exp(z)``, ``Z = sum e``: one
    exponential and no ``[N, V]`` log-softmax (benchmarks/bench_algos.py). ``z`` is floored at -1e4, where
    ``exp`` is exactly 0 in float32, so ``-inf`` logits (banned tokens) contribute 0 instead of ``0 * -inf``.

    Args:
        logits: ``[N, V]`` any float dtype.

    Returns:
        ``[N]`` float32 entropies.
    """
    z = logits.float()
    z = (z - z.amax(dim=-1, keepdim=True)).clamp_min_(-1e4)
    e = z.exp()
    total = e.sum(dim=-1)
    return total.log() - torch.linalg.vecdot(e, z) / total


def nearest_rank_index(num_values: int, quantile: float) -> int:
    """0-based rank of the "nearest" quantile among ``num_values`` sorted values.

    Uses Python's ``round`` (half to even) on ``quantile * (num_values - 1)``, exactly as the published
    ``torch_quantile(..., interpolation="nearest")``; distributed callers use this to pick the same element.
    """
    if num_values <= 0:
        raise ValueError("nearest_rank_index needs at least one value")
    return round(float(quantile) * (num_values - 1))


def nearest_rank_quantile(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """The "nearest"-interpolation quantile of a 1-D tensor (an element of ``values``, not an interpolation).

    Args:
        values: ``[N]`` with ``N >= 1``.
        quantile: in [0, 1].

    Returns:
        0-dim tensor: the element of rank ``nearest_rank_index(N, quantile)`` in ascending order.
    """
    k = nearest_rank_index(values.numel(), quantile)
    return torch.kthvalue(values.reshape(-1), k + 1).values


def apply_entropy_stats(
    log_entropy: torch.Tensor, stats: EntropyStats, *, rms_eps: float = 0.0, clamp: bool = False
) -> torch.Tensor:
    """Normalise log-entropies with given statistics: ``h = (l - pivot) / (rms + rms_eps)``, then ``h_hat``.

    Args:
        log_entropy: ``[*]`` float32 log-entropies.
        stats: statistics from :func:`normalized_entropy` (or a distributed equivalent).
        rms_eps: added to the RMS (the published vLLM sampler uses 1e-6; the trainer uses 0).
        clamp: clamp ``h_hat`` to [-1, 1] (the published sampler does; tokens outside the batch the stats came
            from can fall beyond the extremes).

    Returns:
        ``[*]`` float32 ``h_hat``.
    """
    stats = stats.to(log_entropy.device)
    h = (log_entropy - stats.pivot) / (stats.rms + rms_eps)
    h_hat = torch.where(h > 0, h * stats.scale_pos, h * stats.scale_neg)
    return h_hat.clamp(-1.0, 1.0) if clamp else h_hat


def side_scales(
    max_positive: torch.Tensor, min_negative: torch.Tensor, sign: EntropySign
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale_pos, scale_neg)`` from the largest positive and most negative normalised deviation.

    Args:
        max_positive: 0-dim, max of ``h`` over valid tokens with ``h > 0`` (0 if none).
        min_negative: 0-dim, min of ``h`` over valid tokens with ``h < 0`` (0 if none).
        sign: ``"published"`` keeps ``scale_neg`` negative; ``"paper"`` makes it positive.
    """
    if sign not in ENTROPY_SIGNS:
        raise ValueError(f"unknown entropy sign convention {sign!r}; valid: {', '.join(ENTROPY_SIGNS)}")
    pos_max = max_positive.clamp_min(ENTROPY_EPS)
    neg_min = min_negative.clamp_max(-ENTROPY_EPS)
    scale_neg = 1.0 / neg_min if sign == "published" else -1.0 / neg_min
    return 1.0 / pos_max, scale_neg


def normalized_entropy(
    entropy: torch.Tensor,
    mask: torch.Tensor,
    *,
    pivot_quantile: float = 0.8,
    sign: EntropySign = "published",
) -> tuple[torch.Tensor, EntropyStats]:
    """HAPO's entropy normaliser over the valid tokens of a batch (spec 2.1, published ``compute_entropy_h``).

    Args:
        entropy: ``[B, L]`` token entropies (natural log), >= 0.
        mask: ``[B, L]`` valid-token mask (response tokens up to and including EOS).
        pivot_quantile: quantile of log-entropy used as pivot (0.8 in every HAPO recipe).
        sign: ``"published"`` (``h_hat`` in [0, 1], the code's behaviour, default) or ``"paper"``
            (``h_hat`` in [-1, 1], negative below the pivot).

    Returns:
        ``(h_hat [B, L] float32, EntropyStats)``. Masked positions carry the formula's value (possibly > 1) and
        must be masked by the caller. With no valid token, ``h_hat`` is all zeros and the stats are
        :meth:`EntropyStats.neutral` (the published code would fail on the empty quantile).
    """
    check_range("pivot_quantile", pivot_quantile, 0.0, 1.0)
    valid = as_mask(mask, entropy)
    check_no_nan("entropy", entropy)
    check_finite("entropy[mask]", entropy[valid])
    if not bool(valid.any()):
        return torch.zeros_like(entropy, dtype=torch.float32), EntropyStats.neutral().to(entropy.device)

    log_entropy = torch.log(entropy.float().clamp_min(ENTROPY_EPS))
    pivot = nearest_rank_quantile(log_entropy[valid], pivot_quantile)
    h = log_entropy - pivot
    num_valid = valid.sum()
    rms = (h.pow(2).masked_fill(~valid, 0.0).sum() / num_valid).clamp_min(ENTROPY_EPS).sqrt()
    h = h / rms
    max_positive = h.masked_fill(~(valid & (h > 0)), 0.0).max()
    min_negative = h.masked_fill(~(valid & (h < 0)), 0.0).min()
    scale_pos, scale_neg = side_scales(max_positive, min_negative, sign)
    stats = EntropyStats(pivot=pivot, rms=rms, scale_pos=scale_pos, scale_neg=scale_neg)
    return apply_entropy_stats(log_entropy, stats), stats
