"""Hugging Face transformers as the rollout engine: vLLM's sampling semantics without vLLM (``engine.kind=hf``).

Each rank holds a whole copy of the model on its own device (:func:`megatron_hapo.parallel.runtime.rank_device`):
no engine tensor parallelism, no process group. It serves where vLLM is not installed (a CUDA machine with only
torch + transformers) and is an independent check of the vLLM engine's log-probs and adaptive temperatures.

Why a decode loop of its own rather than ``model.generate`` with a logits processor: ``generate`` draws every row
of a batch from the one global torch RNG (``torch.multinomial``), so per-request seeds (request ``i`` samples
with ``seed + i``) cannot be honoured, a request's tokens would depend on what else shares its batch, and the
trainer's global RNG would advance; its warpers also divide by the temperature *before* custom processors
(HAPO's factor must come first, on the unscaled logits) and return processed scores, not the raw log-probs. The
loop here is short: a left-padded prefill, then one token per step through the model's own KV cache
(``past_key_values`` with a 2-D attention mask and mask-derived position ids), finished rows dropped from the
batch and the cache.

Each decode step follows vLLM's V1 sampler with ``logprobs_mode=raw_logprobs``:

1. the full-vocabulary logits in float32; the log-prob recorded for the sampled token is their ``log_softmax``
   (temperature 1, before any processing);
2. temperature below 1e-5 (vLLM's threshold): greedy argmax;
3. otherwise, with adaptive sampling, the logits are divided by ``adaptive_temperature(logits, 1.0, stats, tau)``
   exactly as :class:`~megatron_hapo.rollout.temperature_processor.AdaptiveTemperatureProcessor` does, recording
   ``T * factor``; then divided by ``T``, masked by top-k then top-p (vLLM's rules), and the token is drawn by the
   exponential race ``argmax(p / q)``, ``q ~ Exp(1)`` from the request's own ``torch.Generator`` on the device;
4. the response stops on an EOS id of the model's generation config or a stop token, which is kept (``stop``),
   else at ``max_tokens`` or ``max_model_len`` (``length``); before ``min_tokens`` tokens those ids are masked
   (after the raw log-probs, before the temperature: vLLM's min-tokens processor).

A request's tokens therefore depend on its prompt, its seed and the weights, not on its batch (up to last-bit
differences of batched matmuls, as in vLLM). The random stream is not vLLM's (vLLM's CPU sampler uses a fused
Gumbel kernel): seeded samples of the two engines agree in distribution, not token for token; greedy decoding,
log-probs and temperatures agree to float precision. Unseeded calls draw their request seeds from the engine's
own generator (``seed``), never from torch's global RNG.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from megatron_hapo.algos import EntropyStats, adaptive_temperature
from megatron_hapo.parallel.runtime import rank_device
from megatron_hapo.rollout.engine import FinishReason, Response, SamplingSettings

if TYPE_CHECKING:
    from transformers import Cache

#: vLLM treats temperatures below this as greedy.
SAMPLING_EPS = 1e-5

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


@dataclass(frozen=True, kw_only=True)
class HFEngineConfig:
    """Settings of the transformers rollout engine."""

    max_model_len: int = 4096
    """Longest prompt + response in tokens (longer prompts are errors; responses stop there with ``length``)."""
    max_num_seqs: int = 64
    """Sequences decoded together (the batch size)."""
    max_batch_tokens: int | None = None
    """Also cap the batch so that ``batch x (longest prompt + max_tokens)`` stays within this (KV-cache memory);
    ``None``: only ``max_num_seqs``."""
    dtype: str = "auto"
    """``auto`` (the checkpoint's), ``float32``, ``bfloat16`` or ``float16``."""
    seed: int = 0
    """Seeds the per-request seeds of unseeded calls (``SamplingSettings.seed=None``)."""
    attn_implementation: str | None = None
    """transformers' attention (``sdpa``, ``eager``, ...); ``None``: its default."""
    offload_when_asleep: bool = True
    """On CUDA, ``sleep`` moves the weights to CPU memory and ``wake_up`` brings them back."""


@dataclass
class _Request:
    prompt: list[int]
    generator: torch.Generator | None
    budget: int
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    finish: FinishReason = "length"


class HFEngine:
    """A transformers causal LM in this rank, implementing :class:`~megatron_hapo.rollout.engine.RolloutEngine`."""

    def __init__(self, model_dir: str | Path, config: HFEngineConfig | None = None) -> None:
        import transformers  # noqa: PLC0415

        self.config = config = config or HFEngineConfig()
        if config.dtype != "auto" and config.dtype not in _DTYPES:
            raise ValueError(f"HFEngine dtype must be auto or one of {sorted(_DTYPES)}, got {config.dtype!r}")
        if config.max_model_len < 2 or config.max_num_seqs < 1:
            raise ValueError(f"need max_model_len >= 2 and max_num_seqs >= 1, got {config}")
        self.device = rank_device()
        kwargs: dict = {"dtype": "auto" if config.dtype == "auto" else _DTYPES[config.dtype]}
        if config.attn_implementation is not None:
            kwargs["attn_implementation"] = config.attn_implementation
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # loading must not move the trainer's RNG streams
            model: torch.nn.Module = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.stop_ids = _eos_ids(model)
        self._seeds = torch.Generator().manual_seed(config.seed)
        self.asleep = False

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingSettings, stats: EntropyStats | None
    ) -> list[Response]:
        """``n`` responses per prompt, grouped by prompt (see :class:`~megatron_hapo.rollout.engine.RolloutEngine`)."""
        self._check_awake()
        greedy = sampling.temperature < SAMPLING_EPS
        adaptive = sampling.adaptive_tau is not None and stats is not None and sampling.temperature > 0 and not greedy
        stop = self.stop_ids | frozenset(sampling.stop_token_ids)
        requests = [
            self._request(i, prompt, sampling, greedy) for i, prompt in enumerate(p for p in prompts for _ in range(n))
        ]
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].prompt))  # less padding per batch
        start = 0
        while start < len(order):
            size = self._batch_size(len(requests[order[start]].prompt), sampling.max_tokens)
            batch = [requests[i] for i in order[start : start + size]]
            self._decode(batch, sampling, stats if adaptive else None, stop)
            start += size
        return [
            Response(
                prompt_index=i // n,
                token_ids=r.tokens,
                finish_reason=r.finish,
                log_probs=torch.tensor(r.log_probs, dtype=torch.float32),
                temperatures=torch.tensor(r.temperatures, dtype=torch.float32) if adaptive else None,
            )
            for i, r in enumerate(requests)
        ]

    def _request(self, index: int, prompt: Sequence[int], sampling: SamplingSettings, greedy: bool) -> _Request:
        prompt = [int(t) for t in prompt]
        if not prompt or len(prompt) > self.config.max_model_len:
            raise ValueError(
                f"request {index}: prompt of {len(prompt)} tokens; need 1 to max_model_len={self.config.max_model_len}"
            )
        generator = None
        if not greedy:
            seed = (
                sampling.seed + index
                if sampling.seed is not None
                else int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            )
            generator = torch.Generator(device=self.device).manual_seed(seed)
        budget = min(sampling.max_tokens, max(1, self.config.max_model_len - len(prompt)))
        return _Request(prompt, generator, budget)

    def _batch_size(self, longest_prompt: int, max_tokens: int) -> int:
        if self.config.max_batch_tokens is None:
            return self.config.max_num_seqs
        per_sequence = min(longest_prompt + max_tokens, self.config.max_model_len)
        return max(1, min(self.config.max_num_seqs, self.config.max_batch_tokens // per_sequence))

    def _decode(
        self, batch: list[_Request], sampling: SamplingSettings, stats: EntropyStats | None, stop: frozenset[int]
    ) -> None:
        """Decode ``batch`` to the end (fills each request's tokens, log-probs, temperatures, finish reason)."""
        with torch.inference_mode():
            logits, cache, mask, positions = self._prefill([r.prompt for r in batch])
            live = list(range(len(batch)))  # batch index of each row still in the model's batch
            while True:
                early = [row for row, i in enumerate(live) if len(batch[i].tokens) < sampling.min_tokens]
                banned = (early, sorted(stop)) if early and stop else None
                generators = [batch[i].generator for i in live]
                tokens, log_probs, temperatures = _sample(logits, sampling, stats, generators, banned)
                keep = []
                for row, i in enumerate(live):
                    request = batch[i]
                    request.tokens.append(tokens[row])
                    request.log_probs.append(log_probs[row])
                    if temperatures is not None:
                        request.temperatures.append(temperatures[row])
                    if tokens[row] in stop:
                        request.finish = "stop"
                    elif len(request.tokens) < request.budget:
                        keep.append(row)
                if not keep:
                    return
                if len(keep) < len(live):
                    index = torch.tensor(keep, device=self.device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    live = [live[row] for row in keep]
                next_ids = torch.tensor([[batch[i].tokens[-1]] for i in live], device=self.device)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
                out = self.model(
                    input_ids=next_ids,
                    attention_mask=mask,
                    position_ids=positions[:, None],
                    past_key_values=cache,
                    use_cache=True,
                )
                cache, positions = out.past_key_values, positions + 1
                logits = out.logits[:, -1].float()

    def _prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, Cache, torch.Tensor, torch.Tensor]:
        """Left-padded forward of the prompts: last logits ``[B, V]`` float32, KV cache, mask, next positions."""
        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float(), out.past_key_values, mask, positions[:, -1] + 1

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy full tensors into the model in place by HF name.

        ``named_tensors`` is consumed once, completely and in order even when a name is wrong (it may run
        collectives between items), then unknown names or wrong shapes raise ``ValueError``.
        """
        params = dict(self.model.named_parameters(remove_duplicate=False))
        unknown, mismatched = [], []
        with torch.no_grad():
            for name, tensor in named_tensors:
                param = params.get(name)
                if param is None:
                    unknown.append(name)
                elif param.shape != tensor.shape:
                    mismatched.append(f"{name}: {tuple(tensor.shape)} for {tuple(param.shape)}")
                else:
                    param.copy_(tensor)
        if unknown or mismatched:
            raise ValueError(
                f"HFEngine.load_weights: unknown names {unknown[:8]} ({len(unknown)}), "
                f"shape mismatches {mismatched[:8]} ({len(mismatched)})"
            )

    def prompt_log_probs(self, token_ids: Sequence[int]) -> torch.Tensor:
        """``[S - 1]`` float32 log-probs (on CPU) of ``token_ids[1:]`` given their prefixes, at temperature 1."""
        self._check_awake()
        if not 2 <= len(token_ids) <= self.config.max_model_len:
            raise ValueError(f"need 2 to max_model_len={self.config.max_model_len} tokens, got {len(token_ids)}")
        ids = torch.tensor([[int(t) for t in token_ids]], device=self.device)
        with torch.no_grad():  # not inference_mode: the result is an ordinary tensor for the caller
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1].float()
            return logits.log_softmax(dim=-1).gather(-1, ids[0, 1:, None])[:, 0].cpu()

    def sleep(self, level: int | None = None) -> None:
        """On CUDA (``offload_when_asleep``): move the weights to CPU memory for training; else nothing. The
        weights are kept at every ``level`` (vLLM's sleep levels do not apply to this engine)."""
        if self.config.offload_when_asleep and self.device.type == "cuda" and not self.asleep:
            self.model.to("cpu")
            torch.cuda.empty_cache()
            self.asleep = True

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring the weights back before a rollout (``tags``: vLLM's; only ``weights`` matters here)."""
        if self.asleep and (tags is None or "weights" in tags):
            self.model.to(self.device)
            self.asleep = False

    def close(self) -> None:
        """Free the model."""
        del self.model
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _check_awake(self) -> None:
        if self.asleep:
            raise RuntimeError("HFEngine is asleep (weights offloaded to CPU): call wake_up() first")


def _eos_ids(model: torch.nn.Module) -> frozenset[int]:
    """The EOS ids vLLM stops on without a tokenizer: the generation config's (else the model config's)."""
    source = getattr(model, "generation_config", None)
    value = getattr(source, "eos_token_id", None) if source is not None else None
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    if value is None:
        return frozenset()
    return frozenset([int(value)] if isinstance(value, int) else [int(v) for v in value])


def _sample(
    logits: torch.Tensor,
    sampling: SamplingSettings,
    stats: EntropyStats | None,
    generators: list[torch.Generator | None],
    banned: tuple[list[int], list[int]] | None = None,
) -> tuple[list[int], list[float], list[float] | None]:
    """One step of vLLM's sampler on ``[B, V]`` float32 logits: tokens, raw log-probs, temperatures (adaptive).

    ``banned``: (rows, token ids) that may not be drawn (``min_tokens``: the stop ids of rows still short of it),
    masked after the raw log-probs and before every other step, as vLLM's min-tokens processor does."""
    raw = logits.log_softmax(dim=-1)
    if banned is not None:
        rows, ids = banned
        logits = logits.clone()
        logits[torch.tensor(rows, device=logits.device)[:, None], torch.tensor(ids, device=logits.device)] = float(
            "-inf"
        )
    temperatures = None
    if sampling.temperature < SAMPLING_EPS:
        tokens = logits.argmax(dim=-1)
    else:
        if stats is not None:  # AdaptiveTemperatureProcessor, then vLLM's own division by T
            assert sampling.adaptive_tau is not None  # generate passes stats only with adaptive sampling
            factors = adaptive_temperature(logits, 1.0, stats, tau=sampling.adaptive_tau)
            logits = logits / factors[:, None]
            temperatures = [sampling.temperature * f for f in factors.tolist()]
        base = torch.full((logits.shape[0], 1), sampling.temperature, dtype=torch.float32, device=logits.device)
        logits = _top_k_top_p(logits / base, sampling.top_k, sampling.top_p)
        probs = logits.softmax(dim=-1, dtype=torch.float32)
        noise = torch.empty_like(probs)
        for row, generator in enumerate(generators):
            noise[row].exponential_(generator=generator)
        tokens = probs.div(noise).argmax(dim=-1)
    log_probs = raw.gather(-1, tokens[:, None])[:, 0]
    return tokens.tolist(), log_probs.tolist(), temperatures


def _top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """vLLM's masks (``apply_top_k_top_p_pytorch``): top-k keeps ties with the k-th value, then top-p keeps the
    smallest head of mass ``>= p`` (at least one token)."""
    vocab = logits.shape[-1]
    use_k, use_p = 0 < top_k < vocab, top_p < 1.0
    if not (use_k or use_p):
        return logits
    ordered, index = logits.sort(dim=-1, descending=False)
    if use_k:
        ordered = ordered.masked_fill(ordered < ordered[:, vocab - top_k : vocab - top_k + 1], float("-inf"))
    if use_p:
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - torch.tensor(top_p, dtype=torch.float32, device=logits.device)
        drop[:, -1] = False
        ordered = ordered.masked_fill(drop, float("-inf"))
    return logits.scatter(-1, index, ordered)
