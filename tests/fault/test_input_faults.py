"""Bad input never crashes silently and never hangs: each gets a clear error naming what is wrong, or a counted
skip where the config asks for one. Every case goes through the public entry of its layer."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from megatron_hapo.config import ConfigError, load_config
from megatron_hapo.data import DataError, read_prompts

REPO = Path(__file__).resolve().parents[2]
HAPO = REPO / "configs" / "algo" / "hapo.yaml"


def _jsonl(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n")
    return path


def _plan_errors(overrides: list[str]) -> list[str]:
    from megatron_hapo.models.hf_config import read_decoder_spec
    from megatron_hapo.models.plan import Layout, check_layout

    config = load_config(REPO / "configs" / "runs" / "qwen3-8b-hapo.yaml", overrides, warn=False)
    spec = read_decoder_spec(REPO / "configs" / "models" / "qwen3-8b-base")
    m = config.model
    return check_layout(
        spec,
        config,
        Layout(1, 8, m.tensor_parallel, m.pipeline_parallel, m.virtual_pipeline, config.engine.tensor_parallel),
    )


CONFIG_FAULTS = [
    ("unknown config key", ["algo.clip.eps_hgih=0.3"], "did you mean 'algo.clip.eps_high'"),
    ("wrong type", ["train.total_steps=ten"], "train.total_steps: expected int, got str"),
    ("out-of-range value", ["engine.gpu_memory_utilization=2"], "engine.gpu_memory_utilization=2"),
    ("unknown algorithm kind", ["algo.advantage.kind=magic"], "magic"),
]


@pytest.mark.parametrize(("fault", "overrides", "message"), CONFIG_FAULTS, ids=[c[0] for c in CONFIG_FAULTS])
def test_bad_config_is_refused_naming_the_key(faults, fault: str, overrides: list[str], message: str) -> None:
    faults.inject(fault)
    with pytest.raises(ConfigError, match=None) as error:
        load_config(HAPO, overrides)
    assert message in str(error.value), str(error.value)
    faults.survive(fault)


def test_impossible_parallel_layout_is_refused(faults) -> None:
    fault = faults.inject("impossible parallel layout")
    errors = _plan_errors(["model.tensor_parallel=3"])
    assert any("not divisible by the tensor-parallel size (3)" in e for e in errors), errors
    faults.survive(fault)


def test_bad_data_files_and_rows(tmp_path: Path, faults) -> None:
    for name in ("missing data file", "malformed row", "malformed row, skip mode", "prompt over the length limit"):
        faults.inject(name)
    with pytest.raises(DataError, match="no such prompt file"):
        read_prompts(tmp_path / "absent.jsonl")
    faults.survive("missing data file")
    good = json.dumps({"prompt": "What is 1 + 1 ?", "reward_model": {"ground_truth": "2"}})
    path = _jsonl(tmp_path / "rows.jsonl", [good, "{not json", json.dumps({"prompt": "no answer"}), good])
    with pytest.raises(DataError, match=r"rows.jsonl: line 2"):
        read_prompts(path)
    faults.survive("malformed row")
    kept = read_prompts(path, bad_rows="skip")
    assert len(kept.examples) == 2 and [row for row, _ in kept.skipped] == [2, 3]
    faults.survive("malformed row, skip mode")
    from megatron_hapo.data import encode_prompts

    class Tokenizer:  # a prompt's length is its character count
        def apply_chat_template(self, chat: list, **_: object) -> list[int]:
            return list(range(len(chat[-1]["content"])))

    encoded = encode_prompts(kept.examples, Tokenizer(), max_prompt_length=5)
    assert encoded.dropped_too_long == 2 and encoded.token_ids == []
    faults.survive("prompt over the length limit")


def _verify(kind: str) -> tuple[float, bool]:
    if kind == "raise":
        raise ValueError("bad input")
    if kind == "hang":
        threading.Event().wait()  # forever: only the time limit ends it
    if kind == "die":
        os._exit(3)
    if kind == "memory":
        return float(len(bytearray(4 * 2**30))), True  # beyond the 1 GiB address-space limit
    return 1.0, True


def test_reward_function_that_raises_hangs_dies_or_eats_memory(faults) -> None:
    from megatron_hapo.rewards import RewardWorkers

    names = {"raise": "reward raises", "hang": "reward hangs", "die": "reward crashes", "memory": "reward eats memory"}
    for name in names.values():
        faults.inject(name)
    workers = RewardWorkers(_verify, workers=2, timeout_s=5.0, memory_mb=1024, failure_value=(-1.0, False))
    try:
        outcomes = workers.map([("ok",), ("raise",), ("hang",), ("die",), ("memory",), ("ok",)])
        # the hang never returns by itself: "timeout" means the time limit cut it
        assert [o.status for o in outcomes] == ["ok", "error", "timeout", "crash", "error", "ok"]
        assert [o.value for o in outcomes[1:5]] == [(-1.0, False)] * 4  # scored wrong, and counted:
        assert workers.counts == {"ok": 2, "error": 2, "timeout": 1, "crash": 1}
        assert workers.map([("ok",)] * 3)[2].value == (1.0, True)  # replaced workers serve again
    finally:
        workers.close()
    for name in names.values():
        faults.survive(name)


def test_a_workers_start_up_does_not_count_against_a_call(faults) -> None:
    """A verifier module that takes 1 s to import, a 0.5 s limit per call: every call is in time, the first ones
    (the workers' start-up) and those after a replacement alike. Before, the limit ran from the send: timeouts."""
    from slow_import_verifier import verify

    from megatron_hapo.rewards import RewardWorkers

    fault = faults.inject("verifier module slow to import")
    workers = RewardWorkers(verify, workers=2, timeout_s=0.5, failure_value=(-1.0, False))
    try:
        assert [o.status for o in workers.map([("2",), ("3",), ("2",)])] == ["ok"] * 3
        workers._replace(workers._pool[0])  # a fresh worker, importing again
        assert [o.value for o in workers.map([("2",), ("2",)])] == [(1.0, True)] * 2
    finally:
        workers.close()
    faults.survive(fault)


def test_empty_response_is_packed_and_scored_wrong(faults) -> None:
    import torch

    from megatron_hapo.rewards import first_token_equals
    from megatron_hapo.rollout.engine import Response
    from megatron_hapo.trainer.batch import StepBatch
    from megatron_hapo.trainer.microbatch import build_microbatch

    fault = faults.inject("empty response")
    empty = Response(prompt_index=0, token_ids=[], log_probs=torch.zeros(0), finish_reason="stop")
    full = Response(prompt_index=0, token_ids=[5, 2], log_probs=torch.zeros(2), finish_reason="stop")
    batch = StepBatch.from_responses([[7, 8, 9]], [empty, full], max_response_length=4)
    for pack in (False, True):
        micro, _ = build_microbatch(batch, torch.arange(2), pack=pack, train=True)
        assert micro.masks()[0].sum(-1).tolist() == [0, 2]
    assert batch.response_mask[0].sum() == 0
    assert first_token_equals([], 5) == (-1.0, False)
    faults.survive(fault)


def test_repeated_non_finite_gradients_stop_the_run(faults) -> None:
    from megatron_hapo.trainer.loop import _check_skips
    from megatron_hapo.trainer.step import StepState

    fault = faults.inject("non-finite gradient norm in every update, 3 steps in a row")
    state = StepState(step=7)
    all_skipped = {"optimizer_steps": 2.0, "updates_skipped": 2.0}
    _check_skips(state, all_skipped, limit=3)
    _check_skips(state, {"optimizer_steps": 2.0, "updates_skipped": 1.0}, limit=3)  # one good update resets
    assert state.consecutive_skips == 0
    _check_skips(state, all_skipped, limit=3)
    _check_skips(state, all_skipped, limit=3)
    with pytest.raises(FloatingPointError, match="3 steps in a row had only non-finite gradient norms"):
        _check_skips(state, all_skipped, limit=3)
    faults.survive(fault)
