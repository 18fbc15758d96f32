"""The adaptive-temperature logits processor driven like vLLM 0.32's V1 model runner, without an engine.

A small simulator keeps the persistent batch (which request sits in which row) and reports its changes to the
processor through vLLM's own ``BatchUpdateBuilder`` / ``BatchUpdate`` (removed, added, moved / swapped rows).
After every apply it does what ``GPUModelRunner._bookkeeping_sync`` does: one entry per kept token is appended to
each request's output list (a ``-1`` placeholder under async scheduling), none for a discarded row (a prompt
chunk before the last one). Under async scheduling a request that stopped stays one more step in the batch (the
step scheduled before its stop was seen). The applied logits and the recorded temperatures are compared row by
row with :func:`megatron_hapo.algos.adaptive_temperature`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

pytest.importorskip("vllm", reason="the processor implements vLLM's logits-processor interface")

from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdateBuilder, MoveDirectionality

from megatron_hapo.algos import EntropyStats, adaptive_temperature
from megatron_hapo.rollout.temperature_processor import (
    AdaptiveTemperatureProcessor,
    request_args,
)
from megatron_hapo.rollout.vllm_engine import trim_records

VOCAB = 40
STATS = [
    EntropyStats.from_floats(1.2, 0.6, 0.9, -0.7),  # published sign
    EntropyStats.from_floats(0.8, 1.1, 0.5, 0.4),  # paper sign: rows cool down too
    EntropyStats.from_floats(2.0, 0.3, 1.5, 1.5),
]


@dataclass
class Req:
    key: int
    tau: float | None  # None: not adaptive
    temperature: float = 1.0
    stats: EntropyStats = STATS[0]
    outputs: list[int] = field(default_factory=list)
    tokens: int = 0  # tokens the scheduler kept (what the engine returns)
    prefill_chunks: int = 1  # apply steps whose token is discarded, +1
    stopped: bool = False

    def params(self) -> SamplingParams:
        extra = None
        if self.tau is not None:
            extra = request_args(self.key, tau=self.tau, temperature=self.temperature, stats=self.stats)
        return SamplingParams(temperature=self.temperature, extra_args=extra)


class Batch:
    """vLLM's persistent batch as the processor sees it, with the reference records."""

    def __init__(self, processor: AdaptiveTemperatureProcessor, *, async_scheduling: bool) -> None:
        self.processor, self.async_scheduling = processor, async_scheduling
        self.rows: list[Req | None] = []
        self.builder = BatchUpdateBuilder()
        self.expected: dict[int, dict[int, float]] = {}
        self.requests: dict[int, Req] = {}
        self.generator = torch.Generator().manual_seed(5)

    def remove(self, index: int) -> None:
        self.rows[index] = None
        self.builder.removed_append(index)

    def add(self, req: Req, index: int) -> None:
        while len(self.rows) <= index:
            self.rows.append(None)
        self.rows[index] = req
        self.requests[req.key] = req
        self.builder.added.append((index, req.params(), [1, 2, 3], req.outputs))

    def move(self, source: int, target: int, swap: bool = False) -> None:
        self.rows[source], self.rows[target] = (self.rows[target] if swap else None), self.rows[source]
        direction = MoveDirectionality.SWAP if swap else MoveDirectionality.UNIDIRECTIONAL
        self.builder.moved.append((source, target, direction))

    def step(self, stop: set[int] = frozenset()) -> None:
        """One engine step: batch update, apply, reference check, bookkeeping; requests in ``stop`` stop."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        assert None not in self.rows, "the simulator keeps the batch dense, as vLLM's condense() does"
        self.processor.update_state(self.builder.get_and_reset(len(self.rows)))
        logits = torch.randn(len(self.rows), VOCAB, generator=self.generator) * 3
        logits[:, -5:] = float("-inf")  # banned tokens
        applied = self.processor.apply(logits.clone())
        for row, req in enumerate(self.rows):
            expected = logits[row]
            if req.tau is not None:
                factor = adaptive_temperature(logits[row][None], 1.0, req.stats, tau=req.tau)
                temperature = adaptive_temperature(logits[row][None], req.temperature, req.stats, tau=req.tau)
                self.expected.setdefault(req.key, {})[len(req.outputs)] = float(temperature)
                expected = logits[row] / factor
            torch.testing.assert_close(applied[row], expected, atol=1e-6, rtol=1e-6)
        for req in self.rows:  # _bookkeeping_sync
            if req.prefill_chunks > 1:
                req.prefill_chunks -= 1  # a discarded prompt chunk: no output entry
                continue
            req.outputs.append(-1 if self.async_scheduling else 7)
            if not req.stopped:
                req.tokens += 1
                req.stopped = req.key in stop


def _run(processor: AdaptiveTemperatureProcessor, *, async_scheduling: bool) -> Batch:
    batch = Batch(processor, async_scheduling=async_scheduling)
    a, b = Req(0, 0.3, 0.9, STATS[0]), Req(1, None, 0.7)
    c = Req(2, 0.1, 1.3, STATS[1], prefill_chunks=3)  # a long prompt, prefilled in 3 chunks
    d, e, f = Req(3, 0.2, 0.6, STATS[2]), Req(4, None), Req(5, 0.45, 1.0, STATS[1])
    for index, req in enumerate((a, b, c)):
        batch.add(req, index)
    batch.step()  # rows a b c: adaptive rows 0 and 2 (a gather)
    batch.add(d, 3)
    batch.step()
    batch.step(stop={0})  # a stops on a stop token
    if async_scheduling:
        batch.step()  # the step vLLM scheduled before it saw the stop: a is applied once more
    batch.remove(0)  # a leaves; d moves down into its row (condense), then c and b swap
    batch.move(3, 0)
    batch.move(1, 2, swap=True)
    batch.step()  # rows d c b
    batch.remove(2)  # b leaves, e and f come in
    batch.add(e, 2)
    batch.add(f, 3)
    batch.step()
    batch.move(0, 3, swap=True)  # rows f c e d
    batch.step(stop={2})
    if async_scheduling:
        batch.step()
    batch.remove(1)
    batch.move(3, 1)  # rows f d e
    batch.step()
    batch.step()
    return batch


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_records_match_adaptive_temperature_through_batch_changes(async_scheduling: bool) -> None:
    processor = AdaptiveTemperatureProcessor(None, torch.device("cpu"), False)
    batch = _run(processor, async_scheduling=async_scheduling)
    records = processor.take_records()
    assert processor.take_records() == {}  # taken once
    assert set(records) == {0, 2, 3, 5}  # the adaptive requests only
    tokens = {key: req.tokens for key, req in batch.requests.items()}
    for key, recorded in records.items():
        expected = [batch.expected[key][position] for position in sorted(batch.expected[key])]
        assert len(recorded) == len(expected)
        kept = trim_records(recorded, tokens[key], request=key)
        torch.testing.assert_close(kept, torch.tensor(expected[: tokens[key]]), atol=1e-6, rtol=1e-6)
    # the requests that stopped on a stop token carry one trailing record under async scheduling, none otherwise
    stopped = {key for key, req in batch.requests.items() if req.stopped}
    assert stopped == {0, 2}
    assert {key: len(recorded) - tokens[key] for key, recorded in records.items()} == {
        key: int(async_scheduling and key in stopped) for key in records
    }


def test_prompt_chunks_do_not_shift_the_records() -> None:
    """A request prefilled in chunks is sampled (and recorded) once per chunk; only the last chunk's token is kept."""
    processor = AdaptiveTemperatureProcessor(None, torch.device("cpu"), False)
    batch = Batch(processor, async_scheduling=False)
    req = Req(9, 0.4, 1.0, STATS[1], prefill_chunks=3)
    batch.add(req, 0)
    first_chunk = []
    for step in range(5):
        batch.step()
        if step == 0:
            first_chunk = [batch.expected[9][0]]
    recorded = processor.take_records()[9]
    assert len(recorded) == 3 == req.tokens  # 5 applies: 2 discarded chunks, then positions 0, 1, 2
    assert recorded[0] == pytest.approx(batch.expected[9][0], abs=1e-6) and recorded[0] != first_chunk[0]


def test_all_rows_adaptive_use_a_view_and_no_host_sync() -> None:
    """``apply`` runs device ops only: no .item() / .tolist() / bool(tensor) / host tensors (checked on CPU)."""
    forbidden = {
        torch.Tensor.item,
        torch.Tensor.tolist,
        torch.Tensor.__bool__,
        torch.Tensor.__int__,
        torch.Tensor.__float__,
        torch.Tensor.__index__,
        torch.Tensor.cpu,
        torch.Tensor.numpy,
        torch.Tensor.nonzero,
        torch.nonzero,
        torch.tensor,
        torch.as_tensor,
    }

    class NoSync(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in forbidden and not (func is torch.as_tensor and isinstance(args[0], torch.Tensor)):
                raise AssertionError(f"host synchronisation in apply(): {func}")
            return func(*args, **(kwargs or {}))

    processor = AdaptiveTemperatureProcessor(None, torch.device("cpu"), False)
    batch = Batch(processor, async_scheduling=True)
    for index in range(4):
        batch.add(Req(index, 0.05 * (index + 1), 0.5 + 0.4 * index, STATS[index % 3]), index)
    batch.step()  # builds the device tensors (update_state may copy host -> device; apply may not)
    logits = torch.randn(4, VOCAB)
    with NoSync():
        processor.apply(logits.clone())
    batch.add(Req(7, None), 4)  # a non-adaptive last row: still the first-rows view
    batch.step()
    batch.remove(0)
    batch.move(4, 0)  # rows 1..3 adaptive, row 0 not: the gather path
    batch.step()
    with NoSync():
        processor.apply(torch.randn(4, VOCAB))


def test_trim_records() -> None:
    assert trim_records([0.9, 1.1, 1.0], 2, request=0).tolist() == pytest.approx([0.9, 1.1])
    with pytest.raises(RuntimeError, match="2 temperatures recorded for 3 tokens"):
        trim_records([0.9, 1.1], 3, request=0)
    with pytest.raises(RuntimeError, match="non-finite"):
        trim_records([0.9, float("nan"), 1.0], 3, request=4)
    assert trim_records([float("nan")], 0, request=1).numel() == 0  # a dropped trailing record is not checked


def test_non_finite_logits_surface_in_the_records_not_in_apply() -> None:
    processor = AdaptiveTemperatureProcessor(None, torch.device("cpu"), False)
    batch = Batch(processor, async_scheduling=False)
    batch.add(Req(0, 0.2), 0)
    processor.update_state(batch.builder.get_and_reset(1))
    logits = torch.randn(1, VOCAB)
    logits[0, 3] = float("nan")
    processor.apply(logits)  # no host check during decoding
    with pytest.raises(RuntimeError, match="non-finite"):
        trim_records(processor.take_records()[0], 1, request=0)


def test_validate_params_rejects_bad_arguments() -> None:
    for tau, temperature in itertools.product((0.2, 1.5), (0.9, 0.0)):
        params = Req(0, tau, temperature).params()
        if tau < 1 and temperature > 0:
            AdaptiveTemperatureProcessor.validate_params(params)
        else:
            with pytest.raises(ValueError, match="tau"):
                AdaptiveTemperatureProcessor.validate_params(params)
    AdaptiveTemperatureProcessor.validate_params(SamplingParams())


class FakeLLM:
    """What VLLMEngine uses of ``vllm.LLM`` for weights and sleep, with vLLM 0.32's tag semantics."""

    def __init__(self, read: int | None = None, fail: bool = False) -> None:
        self.read, self.fail, self.calls, self.tags = read, fail, [], set()
        self.iterator = None

    def collective_rpc(self, method: str, kwargs: dict) -> None:
        self.iterator = kwargs["weights_iterator"]
        for count, _ in enumerate(self.iterator, 1):
            if self.fail:
                raise ValueError("There is no module or parameter named 'x'")
            if count == self.read:
                return

    def reset_prefix_cache(self) -> bool:
        return True

    def sleep(self, level: int) -> None:
        self.calls.append(("sleep", level))
        self.tags = {"weights", "kv_cache"}

    def wake_up(self, tags: list[str]) -> bool:
        assert set(tags) <= self.tags, "vLLM's executor ignores a wake_up naming an awake tag"
        self.calls.append(("wake_up", tuple(tags)))
        self.tags -= set(tags)
        return not self.tags


def _engine(llm: FakeLLM, level: int = 1):
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine

    engine = VLLMEngine.__new__(VLLMEngine)
    engine.llm, engine.config, engine._sleep_mode = llm, VLLMConfig(sleep_level=level), True
    engine._sleeping, engine._weights_dropped = set(), False
    return engine


def _stream(log: list) -> object:
    for i in range(3):
        log.append(i)  # stands for the collectives that produce each tensor
        yield f"w{i}", torch.zeros(1)


def test_load_weights_passes_the_stream_through_and_drains_what_vllm_leaves() -> None:
    log: list[int] = []
    llm = FakeLLM()
    stream = _stream(log)
    _engine(llm).load_weights(stream)
    assert llm.iterator is stream and log == [0, 1, 2]  # the same lazy iterator, read once, in order
    log.clear()
    with pytest.raises(RuntimeError, match="without reading 2 tensors"):
        _engine(FakeLLM(read=1)).load_weights(_stream(log))
    assert log == [0, 1, 2]  # drained: every rank runs the same collectives
    log.clear()
    with pytest.raises(ValueError, match="no module"):
        _engine(FakeLLM(fail=True)).load_weights(_stream(log))
    assert log == [0, 1, 2]


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_in_two_parts(level: int) -> None:
    llm = FakeLLM()
    engine = _engine(llm, level)
    engine.wake_up()  # awake: nothing to do
    engine.sleep()
    engine.sleep()  # already asleep: no second call
    assert engine.asleep and engine.sleeping_tags == {"weights", "kv_cache"} and llm.calls == [("sleep", level)]
    with pytest.raises(RuntimeError, match="asleep"):
        engine.load_weights(_stream([]))
    with pytest.raises(ValueError, match="tags"):
        engine.wake_up(["scheduling"])
    engine.wake_up(["weights"])
    assert engine.sleeping_tags == {"kv_cache"} and engine.asleep
    with pytest.raises(RuntimeError, match="asleep"):
        engine._check_usable()
    engine.load_weights(_stream([]))
    engine.wake_up(["weights", "kv_cache"])  # only the sleeping tag reaches vLLM
    assert not engine.asleep and llm.calls[-1] == ("wake_up", ("kv_cache",))
    engine._check_usable()
    engine.sleep()
    engine.wake_up()  # both at once
    assert llm.calls[-1] == ("wake_up", ("kv_cache", "weights"))
    if level == 2:  # the weights were dropped: unusable until a load
        with pytest.raises(RuntimeError, match="level-2"):
            engine._check_usable()
        engine.load_weights(_stream([]))
    engine._check_usable()
    engine.sleep()
    engine.wake_up(["kv_cache"])
    with pytest.raises(RuntimeError, match="KV cache is awake"):
        engine.sleep()
