"""HAPO's adaptive temperature (spec 2.2) inside vLLM, as a V1-interface logits processor.

vLLM calls :meth:`AdaptiveTemperatureProcessor.apply` at every sampling step with the float32, full-vocabulary
logits ``[num_requests, V]`` after penalties and before its own temperature / top-k / top-p (the processor is
not argmax-invariant, so vLLM runs it first). For each request that asked for it (``SamplingParams.extra_args``
under :data:`EXTRA_ARGS_KEY`) the logits are divided by ``1 + tau * h_hat``, computed by
:func:`megatron_hapo.algos.adaptive_temperature` from the previous step's :class:`EntropyStats`. vLLM then
divides by the base temperature ``T``, so the token is drawn at ``T_t = T (1 + tau h_hat)``. The applied
temperatures are recorded per request key and read back by the engine (the engine runs in-process).

Model Runner V2 (vLLM >= 0.33 on GPUs) has a different processor interface and refuses V1 classes: the engine
pins the V1 runner (``VLLM_USE_V2_MODEL_RUNNER=0``) when it installs this processor (docs/ROLLOUT.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from megatron_hapo.algos import EntropyStats, adaptive_temperature

#: ``SamplingParams.extra_args`` key: ``{"key": int, "tau": float, "temperature": float, "stats": [4 floats]}``.
EXTRA_ARGS_KEY = "megatron_hapo_adaptive"

#: Every processor built in this process, in order (vLLM builds one per engine; the engine takes the newest).
INSTANCES: list[AdaptiveTemperatureProcessor] = []


@dataclass(frozen=True)
class _Request:
    key: int
    tau: float
    temperature: float
    stats: tuple[float, float, float, float]


def request_args(key: int, *, tau: float, temperature: float, stats: EntropyStats) -> dict:
    """The ``extra_args`` entry that turns adaptive sampling on for one request."""
    values = stats.as_floats()
    return {EXTRA_ARGS_KEY: {"key": key, "tau": tau, "temperature": temperature,
                             "stats": [values[n] for n in ("pivot", "rms", "scale_pos", "scale_neg")]}}  # fmt: skip


class AdaptiveTemperatureProcessor(LogitsProcessor):
    """Per-token temperature from the decode step's entropy (HAPO), for the requests that ask for it."""

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, _Request] = {}
        self.records: dict[int, list[float]] = {}
        """Request key -> the temperature of each sampled token, in order."""
        INSTANCES.append(self)

    @classmethod
    def validate_params(cls, params: object) -> None:
        """Reject malformed adaptive-sampling arguments when the request is added."""
        args = (getattr(params, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
        if args is None:
            return
        if not 0 <= float(args["tau"]) < 1 or len(args["stats"]) != 4 or float(args["temperature"]) <= 0:
            raise ValueError(f"{EXTRA_ARGS_KEY}: need 0 <= tau < 1, temperature > 0 and 4 stats, got {args}")

    def is_argmax_invariant(self) -> bool:
        """Not invariant: vLLM must apply it before its temperature and top-k / top-p."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        """Track which batch row holds which adaptive request (vLLM's order: removed, added, moved)."""
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, _prompt_ids, _output_ids in batch_update.added:
            args = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            if args is None:
                self._rows.pop(index, None)
                continue
            request = _Request(int(args["key"]), float(args["tau"]), float(args["temperature"]),
                               tuple(float(v) for v in args["stats"]))  # fmt: skip
            self._rows[index] = request
        for source, target, direction in batch_update.moved:
            moved, displaced = self._rows.pop(source, None), self._rows.pop(target, None)
            if moved is not None:
                self._rows[target] = moved
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self._rows[source] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Divide each adaptive row of ``[N, V]`` float32 logits by ``1 + tau h_hat`` (in place)."""
        by_setting: dict[tuple, list[tuple[int, _Request]]] = {}
        for index, request in sorted(self._rows.items()):
            if index < logits.shape[0]:
                by_setting.setdefault((request.tau, request.stats), []).append((index, request))
        for (tau, stats), members in by_setting.items():
            rows = [index for index, _ in members]
            if rows == list(range(len(rows))):  # the usual case: every request adaptive, a view of the first rows
                view = logits[: len(rows)]
                factors = adaptive_temperature(view, 1.0, EntropyStats.from_floats(*stats), tau=tau)
                view.div_(factors[:, None])
            else:
                index = torch.tensor(rows, device=logits.device)
                factors = adaptive_temperature(logits[index], 1.0, EntropyStats.from_floats(*stats), tau=tau)
                logits[index] = logits[index] / factors[:, None]
            for (_, request), factor in zip(members, factors.tolist(), strict=True):
                self.records.setdefault(request.key, []).append(request.temperature * factor)
        return logits

    def take_records(self) -> dict[int, list[float]]:
        """The recorded temperatures so far, clearing them."""
        records, self.records = self.records, {}
        return records
