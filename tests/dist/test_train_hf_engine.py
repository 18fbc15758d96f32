"""The RL loop with the transformers rollout engine (``engine.kind=hf``): no vLLM needed.

1. ``python -m megatron_hapo.train ... engine.kind=hf --local-ranks 2`` runs HAPO end to end (Megatron TP2, an
   HF engine per rank, verifier workers, verified syncs, an evaluation and a checkpoint).
2. The memory handover, through the engine protocol: a recording wrapper around the real HF engines (the policy's
   and mixed-policy DAPO's frozen guide) and around the optimizer checks, over whole ``rl_step`` calls, that
   every rollout runs on an awake engine, every optimizer step while the policy engine sleeps, the weights are
   woken before the sync and the KV cache only after it, and the guide engine sleeps outside its own rollouts.
   On CPU sleep and wake free nothing; on GPU the same order hands the engine's memory to the trainer.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from rl_fixtures import _dapo_jsonl, _model_with_tokenizer


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with the entry-point tests' word-level tokenizer (vocabulary 20)."""
    import transformers

    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        eos_token_id=2,
        bos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(path / "weights", safe_serialization=True)
    return _model_with_tokenizer(path / "weights", path / "model")


def test_train_entry_point_with_hf_engine(small_llama: Path, tmp_path: Path, repo_root: Path) -> None:
    run_dir = tmp_path / "run"
    args = [
        "configs/algo/hapo.yaml",
        f"model.path={small_llama}",
        "model.tensor_parallel=2",
        "engine.kind=hf",
        "engine.tensor_parallel=1",
        "engine.max_num_seqs=16",
        f"data.train_file={_dapo_jsonl(tmp_path / 't.jsonl', 12)}",
        f"data.eval_sets.held_out={_dapo_jsonl(tmp_path / 'e.jsonl', 3)}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "train.total_steps=2",
        "optim.lr=1e-4",
        "optim.warmup_steps=0",
        "output.eval.n=2",
        "output.reward_workers=1",
        f"output.dir={run_dir}",
        "--local-ranks",
        "2",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "megatron_hapo.train", *args], cwd=repo_root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1], rows
    for row in rows:  # float32 trainer and engine: the sync reproduces the trainer's probe log-probs closely
        assert math.isfinite(row["loss"]) and row["sync_probe_error"] <= 1e-4, row
        assert row["sync_probe_max_abs"] <= 1e-3 and row["time_generate"] > 0, row
    assert "temperature_max" in rows[1], rows[1]  # the second rollout sampled with HAPO's adaptive temperature
    assert 0 <= rows[-1]["eval/held_out/avg@2"] <= rows[-1]["eval/held_out/pass@2"] <= 1, rows[-1]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_000002"


class RecordingEngine:
    """A rollout engine that forwards to a real one and checks the sleep / wake protocol on every call, vLLM's
    sleep levels included: weights woken from a level-2 sleep are garbage until the next ``load_weights``."""

    def __init__(self, name: str, engine: object, log: list[str], level: int) -> None:
        self.name, self.engine, self.log, self.level = name, engine, log, level
        self.awake = {"weights": True, "kv_cache": True}
        self.dropped = self.garbage = False

    def _require(self, call: str, *parts: str) -> None:
        asleep = [part for part in parts if not self.awake[part]]
        assert not asleep, f"{self.name}.{call} while {asleep} sleep (log: {self.log[-6:]})"
        assert not (self.garbage and "kv_cache" in parts), f"{self.name}.{call} on dropped weights: {self.log[-6:]}"
        self.log.append(f"{self.name}.{call}")

    def generate(self, *args: object, **kwargs: object) -> list:
        self._require("generate", "weights", "kv_cache")
        return self.engine.generate(*args, **kwargs)

    def load_weights(self, named_tensors: object) -> None:
        self._require("load_weights", "weights")
        self.engine.load_weights(named_tensors)
        self.garbage = False

    def prompt_log_probs(self, token_ids: object) -> torch.Tensor:
        self._require("prompt_log_probs", "weights", "kv_cache")
        return self.engine.prompt_log_probs(token_ids)

    def sleep(self, level: int | None = None) -> None:
        level = self.level if level is None else level
        self.awake, self.dropped = dict.fromkeys(self.awake, False), level == 2
        self.log.append(f"{self.name}.sleep({level})")
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        for tag in tags or list(self.awake):
            self.garbage = self.garbage or (tag == "weights" and not self.awake[tag] and self.dropped)
            self.awake[tag] = True
        self.log.append(f"{self.name}.wake_up({','.join(tags or ['all'])})")
        self.engine.wake_up(tags)


def _handover_ranks(rank: int, world: int, model: Path, repo_root: Path, out: Path, level: int) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.factory import make_engine
    from megatron_hapo.trainer.actor import build_actor
    from megatron_hapo.trainer.step import StepState, rl_step

    overrides = [
        f"model.path={model}",
        "model.tensor_parallel=2",
        "engine.kind=hf",
        "engine.tensor_parallel=1",
        f"algo.guide_policy.model_path={model}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_response_length=4",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "optim.lr=1e-3",
        "model.offload=optimizer",
        f"engine.sleep_level={level}",
    ]
    config = load_config(repo_root / "configs/algo/mixed_dapo.yaml", overrides)
    runtime.quiet_logs()
    runtime.initialize_model_parallel(2, 1)
    actor = build_actor(config)
    actor.probe = [5, 6, 7, 8, 9, 10, 11, 12]
    log: list[str] = []
    build = partial(make_engine, engine=config.engine, dtype="float32", max_model_len=64, seed=0)
    level = config.engine.sleep_level
    engine, guide = RecordingEngine("policy", build(model), log, level), RecordingEngine("guide", build(model), log, 1)
    guide.sleep()
    step = actor.optimizer.step

    def recorded_step() -> object:
        assert not any(engine.awake.values()), f"optimizer step while the policy engine is awake: {log[-6:]}"
        assert not any(guide.awake.values()), f"optimizer step while the guide engine is awake: {log[-6:]}"
        log.append("optimizer.step")
        return step()

    actor.optimizer.step = recorded_step
    offload, restore, generate = actor.offload_training_state, actor.restore_training_state, engine.generate

    def released() -> bool:  # the gradient buffers' storage (really freed on CPU too)
        return all(buffer.grad_data.untyped_storage().size() == 0 for c in actor.chunks for buffer in c.buffers)

    def recorded(name: str, call: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            log.append(f"trainer.{name}")
            call()

        return run

    def recorded_generate(*args: object, **kwargs: object) -> list:
        assert actor.offloaded and released(), f"rollout beside the optimizer state: {log[-6:]}"
        return generate(*args, **kwargs)

    actor.offload_training_state, actor.restore_training_state = (
        recorded("offload", offload),
        recorded("restore", restore),
    )
    engine.generate = recorded_generate
    actor.offload_training_state()  # as the loop does before its first step

    def never_right(token_ids: list[list[int]], answers: list) -> tuple[torch.Tensor, torch.Tensor]:
        correct = torch.tensor([i % 8 == 0 for i in range(len(token_ids))])  # 1 of 2 groups has a right answer
        return correct.float() * 2 - 1, correct

    state, prompts = StepState(), [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
    for _ in range(2):
        rl_step(
            actor, engine, never_right, prompts=prompts, answers=[0] * 4, config=config, state=state, guide_engine=guide
        )
    if rank == 0:
        out.write_text(json.dumps(log))


@pytest.mark.parametrize("level", [1, 2])
def test_engines_sleep_while_the_trainer_updates(
    small_llama: Path, tmp_path: Path, repo_root: Path, level: int
) -> None:
    """The policy engine sleeps at ``engine.sleep_level`` (2 by default: its weights dropped and then replaced by
    the sync before any use), the frozen guide always at level 1."""
    out = tmp_path / "log.json"
    ranks = partial(_handover_ranks, model=small_llama, repo_root=repo_root, out=out, level=level)
    run_on_ranks(ranks, 2, tmp_path / "ranks")
    log = json.loads(out.read_text())
    step_logs = "\n".join(log).split("policy.generate")[1:]
    assert len(step_logs) == 2, log
    for entries in (part.strip().split("\n") for part in step_logs):
        assert "optimizer.step" in entries and entries[0] == f"policy.sleep({level})", entries
        assert "guide.generate" in entries, entries  # a zero-reward group went to the guide
        guide_at = entries.index("guide.generate")
        assert entries[guide_at - 1] == "guide.wake_up(all)" and entries[guide_at + 1] == "guide.sleep(1)", entries
        sync = entries.index("policy.wake_up(weights)")
        assert entries[sync + 1] == "policy.load_weights", entries  # one reload call per sync
        assert entries[sync + 2] == "policy.wake_up(kv_cache)" and entries[sync + 3] == "policy.prompt_log_probs"
        assert max(i for i, e in enumerate(entries) if e == "optimizer.step") < sync, entries
        # model.offload=optimizer: restored for the updates only, offloaded again before the engine wakes
        steps = [i for i, e in enumerate(entries) if e == "optimizer.step"]
        assert entries.index("trainer.restore") < steps[0] and steps[-1] < entries.index("trainer.offload") < sync


class FailingEngine:
    """Reads two tensors of the sync's stream, then fails (e.g. out of memory) on this rank only."""

    def __init__(self, engine: object) -> None:
        self.engine = engine

    def load_weights(self, named_tensors: object) -> None:
        iterator = iter(named_tensors)
        next(iterator), next(iterator)
        raise MemoryError("simulated: the engine ran out of memory mid-sync")


def _failing_sync_ranks(rank: int, world: int, model: Path, repo_root: Path, out: Path) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.factory import make_engine
    from megatron_hapo.rollout.weight_sync import WeightSyncError, sync_weights
    from megatron_hapo.trainer.actor import build_actor

    config = load_config(
        repo_root / "configs/algo/hapo.yaml", [f"model.path={model}", "model.tensor_parallel=2", "engine.kind=hf"]
    )
    runtime.quiet_logs()
    runtime.initialize_model_parallel(2, 1)
    actor = build_actor(config)
    engine = make_engine(model, config.engine, dtype="float32", max_model_len=64, seed=0)
    if rank == 0:
        engine = FailingEngine(engine)
    try:
        sync_weights(engine, actor.chunks, actor.spec, actor.sync_plan, actor.groups)
        outcome = "no error"
    except WeightSyncError as exc:
        outcome = str(exc)
    out.with_name(f"rank{rank}").write_text(outcome)


def test_a_sync_failing_on_one_rank_fails_on_every_rank_without_a_hang(
    small_llama: Path, tmp_path: Path, repo_root: Path
) -> None:
    """The sync's stream runs TP gathers and PP broadcasts between its tensors: a rank whose engine stops reading
    still drains it, and every rank raises ``WeightSyncError`` (before, the other ranks waited in a collective)."""
    out = tmp_path / "out"
    run_on_ranks(partial(_failing_sync_ranks, model=small_llama, repo_root=repo_root, out=out), 2, tmp_path / "r")
    rank0, rank1 = (out.with_name(f"rank{r}").read_text() for r in (0, 1))
    assert "failed on at least one rank" in rank0 and "MemoryError" in rank0, rank0
    assert "failed on at least one rank" in rank1 and "MemoryError" not in rank1, rank1
