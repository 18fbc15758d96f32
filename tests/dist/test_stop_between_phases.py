"""A stop request waits for one phase of a step, not the whole step (a 70B step takes 15-25 minutes, more than
Slurm's warning before the time limit): asked during the rollout, the step is dropped before any update and the
checkpoint is the previous step's, its prompts come again on resume; asked during the updates, the step is kept,
checkpointed without the weight sync or an evaluation. The real loop (``trainer.loop.train``) on one rank with the
transformers engine; the request is raised by the phase itself (an event, not a time)."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from test_train_hf_engine import small_llama  # noqa: F401  (the shared fixture)

PROMPTS_PER_STEP, UPDATES_PER_STEP = 4, 2


def _stop_rank(rank: int, world: int, model: Path, repo_root: Path, run_dir: Path, phase: str) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.trainer.actor import build_actor, build_engine
    from megatron_hapo.trainer.loop import LoopSettings, train

    overrides = [
        f"model.path={model}",
        "engine.kind=hf",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_response_length=4",
        "algo.reward_shaping.buffer_length=2",
        f"train.prompts_per_step={PROMPTS_PER_STEP}",
        f"train.mini_batch_prompts={PROMPTS_PER_STEP // UPDATES_PER_STEP}",
        "train.total_steps=3",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
    ]
    config = load_config(repo_root / "configs/algo/grpo.yaml", overrides)
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    actor, engine = build_actor(config), build_engine(config, str(model))
    actor.probe = [5, 6, 7, 8, 9, 10, 11, 12]
    counts = {"score": 0, "optimizer_steps": 0, "syncs": 0}
    requested = []

    def score(token_ids: list[list[int]], answers: list) -> tuple[torch.Tensor, torch.Tensor]:
        counts["score"] += 1
        if phase == "rollout" and counts["score"] == 2:  # the second step's rollout
            requested.append("rollout")
        correct = torch.tensor([i % 2 == 0 for i in range(len(token_ids))])  # every group has both rewards
        return correct.float() * 2 - 1, correct

    step, load = actor.optimizer.step, engine.load_weights

    def counted_step() -> object:
        counts["optimizer_steps"] += 1
        if phase == "update" and counts["optimizer_steps"] == UPDATES_PER_STEP + 1:  # the second step's first
            requested.append("update")
        return step()

    def counted_load(named_tensors: object) -> None:
        counts["syncs"] += 1
        load(named_tensors)

    actor.optimizer.step, engine.load_weights = counted_step, counted_load
    prompts = [[5 + i % 7, 6, 7 + i % 3] for i in range(12)]
    settings = LoopSettings(run_dir, model_dir=model, progress_bar=False)
    state = train(
        actor, engine, score, config, settings, prompts=prompts, answers=[0] * 12, should_stop=lambda: bool(requested)
    )
    record = {"step": state.step, "cursor": state.data_cursor, "stopped": state.stopped, **counts}
    (run_dir / "record.json").write_text(json.dumps(record))


@pytest.mark.parametrize("phase", ["rollout", "update"])
def test_a_stop_waits_for_one_phase(small_llama: Path, tmp_path: Path, repo_root: Path, phase: str) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ranks = partial(_stop_rank, model=small_llama, repo_root=repo_root, run_dir=run_dir, phase=phase)
    run_on_ranks(ranks, 1, tmp_path / "ranks")
    record = json.loads((run_dir / "record.json").read_text())
    rows = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    latest = (run_dir / "checkpoints" / "latest").read_text()
    if phase == "rollout":  # dropped before its update: step 0's checkpoint, its prompts not consumed
        expected = {"step": 1, "cursor": PROMPTS_PER_STEP, "optimizer_steps": UPDATES_PER_STEP, "syncs": 1}
        assert rows == [0] and latest == "step_000001", (rows, latest)
    else:  # its updates all done, then checkpointed without the sync
        expected = {"step": 2, "cursor": 2 * PROMPTS_PER_STEP, "optimizer_steps": 2 * UPDATES_PER_STEP, "syncs": 1}
        assert rows == [0, 1] and latest == "step_000002", (rows, latest)
    assert record["stopped"] and {key: record[key] for key in expected} == expected, record
    saved = json.loads((run_dir / "checkpoints" / latest / "trainer_state.json").read_text())
    assert saved["data_cursor"] == expected["cursor"], saved
