"""HAPO's adaptive temperature sampling (spec 2.2): per-token temperature from the decode step's entropy.

Applied by the rollout engine to the full-vocabulary float32 logits of each decode step, after penalties and
before temperature / top-k / top-p, with the :class:`EntropyStats` of the previous training step.
"""

from __future__ import annotations

import torch

from megatron_hapo.algos._checks import check_finite as _check_finite
from megatron_hapo.algos._checks import check_range
from megatron_hapo.algos.entropy import EntropyStats, apply_entropy_stats, entropy_from_logits

#: Entropy floor and RMS epsilon of the published vLLM sampler (differs from the trainer's 1e-8 / 0).
SAMPLER_EPS = 1e-6


def adaptive_temperature(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    stats: EntropyStats | None,
    *,
    tau: float | torch.Tensor,
    check_finite: bool = True,
) -> torch.Tensor:
    """Per-row temperatures ``T_t = T * (1 + tau * h_hat)`` (published vLLM ``Sampler.sample`` patch).

    ``h_hat = clamp(apply(stats, ln(max(H, 1e-6))), -1, 1)`` with ``H`` the full-vocabulary entropy of the
    unscaled logits and ``rms + 1e-6`` in the denominator. With the published sign convention ``h_hat >= 0``
    (temperatures only rise); with the paper's, low-entropy rows cool down.

    Without host synchronisation when every argument is a tensor on the logits' device and ``check_finite`` is
    off (a Python float ``temperature`` becomes a host -> device copy there; a float ``tau`` is range-checked on
    the host): the form a decode step uses (``rollout/temperature_processor.py``).

    Args:
        logits: ``[N, V]`` full-vocabulary logits (any float dtype; computed in float32). ``-inf`` is allowed.
        temperature: the base temperature, a float or ``[N]`` (rows with ``T = 0`` stay greedy at 0).
        stats: the previous step's statistics, 0-dim (one set for every row) or ``[N]`` fields (one set per row);
            ``None`` (first step, validation) gives the plain temperature.
        tau: strength, ``T_t`` in ``[T (1 - tau), T (1 + tau)]`` (0.05 in the HAPO recipes); a float, or ``[N]``
            per row (a tensor is not range-checked: its caller validates it).
        check_finite: raise on NaN / +Inf logits or an all ``-inf`` row (``ValueError`` on CPU, an asynchronous
            device assert on CUDA). Off: such rows give non-finite temperatures, for the caller to check later.

    Returns:
        ``[N]`` float32 temperatures.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if not isinstance(tau, torch.Tensor):
        check_range("tau", tau, 0.0, 1.0)
    base = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(logits.shape[0])
    if stats is None:
        return base.clone()
    log_entropy = torch.log(entropy_from_logits(logits).clamp_min(SAMPLER_EPS))
    h_hat = apply_entropy_stats(log_entropy, stats, rms_eps=SAMPLER_EPS, clamp=True)
    temperatures = base * (1.0 + tau * h_hat)
    if check_finite:
        # One check on [N] instead of a NaN scan of [N, V] per decode step: NaN / +Inf logits and all -inf rows
        # all end up as non-finite temperatures.
        _check_finite("adaptive temperatures (the logits hold NaN / +Inf, or a row is all -inf)", temperatures)
    return temperatures
