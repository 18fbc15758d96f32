"""What the loop does between steps (trainer/pacing.py): the test-pacing hold, the step line of a log, and the
vLLM log lines the weight sync no longer repeats (rollout/vllm_engine.py). One process, no process group: the
hold's collectives are then the local flags."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import pytest

from megatron_hapo.trainer import pacing


def _stop_after(calls: int, then: object = None) -> tuple[list[int], object]:
    """A ``should_stop`` that answers yes on its ``calls``-th call (``then``: run first, on that call)."""
    seen: list[int] = []

    def should_stop() -> bool:
        seen.append(1)
        if len(seen) >= calls:
            if callable(then):
                then()
                return False
            return True
        return False

    return seen, should_stop


def test_no_hold_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pacing.HOLD_ENV, raising=False)
    seen, should_stop = _stop_after(1)
    pacing.hold_between_steps(5, should_stop)
    assert seen == []  # returned at once, asked nothing


def test_hold_waits_from_its_step_until_a_stop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.write_text("3")
    monkeypatch.setenv(pacing.HOLD_ENV, str(hold))
    seen, should_stop = _stop_after(3)
    pacing.hold_between_steps(2, should_stop)  # two steps done: not yet
    assert seen == []
    pacing.hold_between_steps(3, should_stop)  # held until the third ask says stop
    assert len(seen) == 3 and hold.is_file()


def test_hold_ends_when_the_file_goes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.write_text("")  # empty: after any step
    monkeypatch.setenv(pacing.HOLD_ENV, str(hold))
    seen, should_stop = _stop_after(2, then=hold.unlink)
    pacing.hold_between_steps(0, should_stop)
    assert len(seen) == 2 and not hold.exists()


def test_step_line_counts_like_the_metrics_file() -> None:
    metrics = {"reward_mean": 0.25, "accuracy": 0.5, "response_length_mean": 12.0, "time_step": 2.14}
    assert pacing.step_line(2, 16, metrics) == "step 2 (3/16) reward 0.250 acc 0.500 len 12.0 time 2.1s"
    assert pacing.step_line(0, 1, {}).startswith("step 0 (1/1) reward nan acc nan")  # a missing metric shows


def test_weight_sync_logs_keep_real_reload_warnings() -> None:
    pytest.importorskip("vllm", reason="vLLM's reload logger")
    from vllm.model_executor.model_loader.reload import layerwise

    from megatron_hapo.rollout import vllm_engine

    # the message the filter matches is still the one vLLM logs (a vLLM upgrade that rewords it fails here)
    assert 'logger.warning("%s: Failed to load weights", layer.__class__.__name__)' in inspect.getsource(layerwise)
    vllm_engine._quiet_weight_sync_logs()
    vllm_engine._quiet_weight_sync_logs()  # idempotent: one filter
    reload_logger = logging.getLogger(vllm_engine._RELOAD_LOGGER)
    assert layerwise.logger.name == vllm_engine._RELOAD_LOGGER
    assert sum(isinstance(f, vllm_engine._WeightlessRopeFilter) for f in reload_logger.filters) == 1

    def shown(layer: str) -> bool:
        record = reload_logger.makeRecord(
            reload_logger.name, logging.WARNING, __file__, 0, "%s: Failed to load weights", (layer,), None
        )
        return bool(reload_logger.filter(record))

    assert not shown("RotaryEmbedding") and not shown("Llama3RotaryEmbedding")
    assert shown("QKVParallelLinear")  # a weight the sync missed still warns
    for name in vllm_engine._PER_SYNC_LOGGERS:
        assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING


def test_keep_holds_through_a_stop_until_the_file_goes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hold = tmp_path / "hold"
    hold.write_text("1 keep")
    monkeypatch.setenv(pacing.HOLD_ENV, str(hold))
    polls: list[float] = []

    def poll(seconds: float) -> None:  # the hold's wait: the third one removes the file
        polls.append(seconds)
        if len(polls) == 3:
            hold.unlink()

    monkeypatch.setattr(pacing.time, "sleep", poll)
    pacing.hold_between_steps(0, lambda: True)  # before the first step: not held at "1"
    assert polls == []
    pacing.hold_between_steps(1, lambda: True)  # a stop is asked for all along: held all the same
    assert len(polls) == 3 and not hold.exists()
