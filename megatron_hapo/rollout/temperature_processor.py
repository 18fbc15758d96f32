"""HAPO's adaptive temperature (spec 2.2) inside vLLM, as a V1-interface logits processor.

vLLM calls :meth:`AdaptiveTemperatureProcessor.apply` at every sampling step with the float32, full-vocabulary
logits ``[num_requests, V]`` before penalties and before its own temperature / top-k / top-p (the processor is
not argmax-invariant, so vLLM runs it in ``Sampler.apply_logits_processors``). For each request that asked for
it (``SamplingParams.extra_args`` under :data:`EXTRA_ARGS_KEY`) the logits are divided by ``1 + tau * h_hat``,
computed by :func:`megatron_hapo.algos.adaptive_temperature` from the previous step's :class:`EntropyStats`.
vLLM then divides by the base temperature ``T``, so the token is drawn at ``T_t = T (1 + tau h_hat)``.

No host synchronisation per decode step: the per-request parameters live in device tensors, rebuilt (with
asynchronous copies) only when vLLM reports a batch change; :meth:`~AdaptiveTemperatureProcessor.apply` runs
device ops only and keeps each step's ``[M]`` temperatures on the device. :meth:`take_records` copies them to
the host once, after the generation.

Which token a record belongs to. vLLM samples a row for every scheduled request, also where it throws the token
away: a prompt prefilled in several chunks (chunked prefill: every chunk but the last), and, under async
scheduling, the step scheduled after a request's stop token before the stop was seen. Each record is therefore
tagged with the request's output position at that step, ``len(output_tok_ids)`` (vLLM appends one entry per
kept token, a ``-1`` placeholder under async scheduling, after sampling and before the next step), and a later
record at the same position replaces an earlier one. Positions past the last token (the async extra step) are
cut by the engine (``vllm_engine.trim_records``).

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


@dataclass(frozen=True, eq=False)
class _Request:
    key: int
    tau: float
    temperature: float
    stats: tuple[float, float, float, float]
    outputs: list[int]
    """vLLM's live list of the request's output token ids (its length is the next output position)."""


@dataclass(frozen=True, eq=False)
class _Batch:
    """The adaptive rows of the current batch, on the processor's device (rebuilt on batch changes only)."""

    rows: int
    """``M``, the number of adaptive rows."""
    limit: int
    """1 + the highest adaptive row index."""
    prefix: bool
    """The adaptive rows are exactly ``0 .. M-1`` (a view of the logits, no gather)."""
    keys: tuple[int, ...]
    outputs: tuple[list[int], ...]
    index: torch.Tensor
    """``[M]`` int64 row indices."""
    params: torch.Tensor
    """``[6, M]`` float32: tau, base temperature, pivot, rms, scale_pos, scale_neg."""
    ones: torch.Tensor
    """``[M]`` float32 ones (the unit base temperature of the factors)."""

    @property
    def stats(self) -> EntropyStats:
        """Per-row statistics, ``[M]`` fields."""
        return EntropyStats(*self.params[2:6])


def request_args(key: int, *, tau: float, temperature: float, stats: EntropyStats) -> dict:
    """The ``extra_args`` entry that turns adaptive sampling on for one request."""
    values = stats.as_floats()
    return {
        EXTRA_ARGS_KEY: {
            "key": key,
            "tau": tau,
            "temperature": temperature,
            "stats": [values[n] for n in ("pivot", "rms", "scale_pos", "scale_neg")],
        }
    }


class AdaptiveTemperatureProcessor(LogitsProcessor):
    """Per-token temperature from the decode step's entropy (HAPO), for the requests that ask for it."""

    def __init__(self, vllm_config: object, device: torch.device, is_pin_memory: bool) -> None:
        self.device = torch.device(device)
        self._pin = bool(is_pin_memory)
        self._rows: dict[int, _Request] = {}
        self._batch: _Batch | None = None
        self._steps: list[tuple[torch.Tensor, tuple[int, ...], list[int]]] = []
        """Per applied step: ``[M]`` device temperatures, the rows' request keys, their output positions."""
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
        for index, params, _prompt_ids, output_ids in batch_update.added:
            args = (params.extra_args or {}).get(EXTRA_ARGS_KEY) if params is not None else None
            if args is None:
                self._rows.pop(index, None)
                continue
            s0, s1, s2, s3 = (float(v) for v in args["stats"])  # four, as validate_params checked
            self._rows[index] = _Request(
                int(args["key"]), float(args["tau"]), float(args["temperature"]), (s0, s1, s2, s3), output_ids
            )
        for source, target, direction in batch_update.moved:
            moved, displaced = self._rows.pop(source, None), self._rows.pop(target, None)
            if moved is not None:
                self._rows[target] = moved
            if direction == MoveDirectionality.SWAP and displaced is not None:
                self._rows[source] = displaced
        self._batch = self._build_batch()

    def _build_batch(self) -> _Batch | None:
        """The device tensors of the adaptive rows (asynchronous host -> device copies from pinned memory)."""
        if not self._rows:
            return None
        rows = sorted(self._rows)
        requests = [self._rows[row] for row in rows]
        host = torch.tensor(
            [
                [r.tau for r in requests],
                [r.temperature for r in requests],
                *([r.stats[i] for r in requests] for i in range(4)),
            ],
            dtype=torch.float32,
            pin_memory=self._pin,
        )
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=self._pin)
        return _Batch(
            rows=len(rows),
            limit=rows[-1] + 1,
            prefix=rows[-1] == len(rows) - 1,
            keys=tuple(r.key for r in requests),
            outputs=tuple(r.outputs for r in requests),
            index=index.to(self.device, non_blocking=True),
            params=host.to(self.device, non_blocking=True),
            ones=torch.ones(len(rows), dtype=torch.float32, device=self.device),
        )

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Divide each adaptive row of ``[N, V]`` float32 logits by ``1 + tau h_hat`` (in place; device ops only)."""
        batch = self._batch
        if batch is None:
            return logits
        if batch.limit > logits.shape[0]:
            raise RuntimeError(
                f"adaptive temperature: row {batch.limit - 1} is adaptive but vLLM passed only "
                f"{logits.shape[0]} rows of logits (speculative decoding is not supported)"
            )
        tau, temperature = batch.params[0], batch.params[1]
        if batch.prefix:  # the usual case: the first M rows (all of them when every request is adaptive)
            view = logits[: batch.rows]
            factors = adaptive_temperature(view, batch.ones, batch.stats, tau=tau, check_finite=False)
            view.div_(factors[:, None])
        else:
            selected = logits.index_select(0, batch.index)
            factors = adaptive_temperature(selected, batch.ones, batch.stats, tau=tau, check_finite=False)
            logits.index_copy_(0, batch.index, selected.div_(factors[:, None]))
        self._steps.append((temperature * factors, batch.keys, [len(ids) for ids in batch.outputs]))
        return logits

    def discard_records(self) -> None:
        """Forget everything recorded so far (no device copy)."""
        self._steps = []

    def take_records(self) -> dict[int, list[float]]:
        """Request key -> the temperature of each output position ``0 .. last`` recorded, clearing the records.

        One device -> host copy. A later record at a position replaces an earlier one (see the module docstring);
        the list can hold positions past the request's last token (async scheduling), which the caller cuts.
        """
        steps, self._steps = self._steps, []
        if not steps:
            return {}
        values = torch.cat([temperatures for temperatures, _, _ in steps]).cpu().tolist()
        by_key: dict[int, dict[int, float]] = {}
        flat = iter(values)
        for _, keys, positions in steps:
            for key, position in zip(keys, positions, strict=True):
                by_key.setdefault(key, {})[position] = next(flat)
        records = {}
        for key, by_position in by_key.items():
            count = max(by_position) + 1
            if len(by_position) != count:
                missing = sorted(set(range(count)) - set(by_position))
                raise RuntimeError(f"adaptive temperature: request {key} has no temperature at positions {missing}")
            records[key] = [by_position[position] for position in range(count)]
        return records
