"""The forward-only pass is skipped where it is a no-op (one on-policy optimizer step, nothing reading old
log-probs or entropies before the loss: GRPO, DAPO), and the update is the same as with it.

1. The loss, float64 tiny GPT, one rank: the old log-probs of the explicit pass against the loss's own detached
   log-probs (``MiniBatchPlan.old_is_current``): loss and every gradient equal to 1e-12, and the mismatch
   metrics the update reports equal the explicit ones.
2. The whole step, float32, the transformers engine: ``rl_step`` with ``train.old_log_prob_pass=always`` and with
   ``auto`` from the same weights and the same seeded rollout: no forward-only sequence in the second, the loss,
   the gradients and the updated weights equal to 1e-6.
3. Which algorithms skip: GRPO and DAPO do; HAPO (adaptive temperature), GTPO and GRPO-S (entropy-shaped
   advantages), the rollout correction and mixed-policy DAPO do not.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from test_packing import VOCAB, _step_batch
from test_train_hf_engine import small_llama  # noqa: F401  (the shared fixture)
from tiny_gpt import full_grads

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize(
    ("preset", "overrides", "skips"),
    [
        ("grpo", [], True),
        ("dapo", [], True),
        ("hapo", [], False),
        ("gtpo", [], False),
        ("grpo_s", [], False),
        ("grpo", ["algo.rollout_correction.kind=tis"], False),
        ("mixed_dapo", [], False),
    ],
)
def test_which_algorithms_read_old_log_probs_before_the_loss(preset: str, overrides: list[str], skips: bool) -> None:
    from megatron_hapo.algos import reads_old_log_prob_before_loss
    from megatron_hapo.config import load_config

    algo = load_config(REPO / "configs" / "algo" / f"{preset}.yaml", overrides, warn=False).algo
    assert reads_old_log_prob_before_loss(algo) is not skips


def _loss_and_grads(chunks, groups, algo, batch, *, old_is_current: bool) -> dict:
    from megatron_hapo.parallel.policy_loss import PolicyLossStep, plan_minibatch
    from megatron_hapo.trainer.metrics import reduce_loss_metrics
    from megatron_hapo.trainer.microbatch import BatchLayout, microbatches, run_schedule

    for chunk in chunks:
        chunk.zero_grad_buffer()
    mbs, _ = microbatches(batch, torch.arange(batch.num_sequences), BatchLayout(max_tokens=96, pack=True), train=True)
    plan = plan_minibatch(mbs, algo, groups, old_is_current=old_is_current)
    outputs = run_schedule(PolicyLossStep(algo, groups, plan, VOCAB), mbs, chunks, forward_only=False)
    return {"metrics": reduce_loss_metrics(outputs), "grads": full_grads(chunks)}


def _loss_rank(rank: int, world: int, out: Path) -> None:
    from megatron_hapo.algos import rollout_mismatch_metrics
    from megatron_hapo.config import load_config
    from megatron_hapo.models import TinyGPTShape, build_tiny_gpt
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.policy_loss import LogProbEntropyStep, ParallelGroups
    from megatron_hapo.trainer.microbatch import BatchLayout, microbatches, run_schedule

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    chunks = build_tiny_gpt(TinyGPTShape(vocab_size=VOCAB, seq_length=64, num_layers=2), dtype=torch.float64, seed=0)
    groups = ParallelGroups.from_megatron()
    algo = load_config(REPO / "configs" / "algo" / "dapo.yaml", warn=False).algo
    batch = _step_batch(guide=False)
    rows = torch.arange(batch.num_sequences)
    mbs, slots = microbatches(batch, rows, BatchLayout(max_tokens=192, pack=True))  # the pass's own layout
    outputs = run_schedule(LogProbEntropyStep(groups, VOCAB), mbs, chunks, forward_only=True)
    old = torch.zeros(batch.response_mask.shape, dtype=torch.float64)
    for output, where in zip(outputs, slots, strict=True):
        old[where.rows, : where.index.shape[1]] = where.read(output["log_prob"])
    batch.old_log_prob = old.clone()  # the explicit pass
    explicit = _loss_and_grads(chunks, groups, algo, batch, old_is_current=False)
    batch.old_log_prob = batch.rollout_log_prob.double().clone()  # skipped: the rollout's ride along
    skipped = _loss_and_grads(chunks, groups, algo, batch, old_is_current=True)
    expected = rollout_mismatch_metrics(old, batch.rollout_log_prob.double(), batch.response_mask)
    grads = max(float((skipped["grads"][n] - g).abs().max()) for n, g in explicit["grads"].items())
    report = {
        "loss": [explicit["metrics"]["loss"], skipped["metrics"]["loss"]],
        "grad_max_abs_diff": grads,
        "grad_norm": sum(float(g.norm()) for g in explicit["grads"].values()),
        "mismatch": {name: [float(value), skipped["metrics"][name]] for name, value in expected.items()},
        "ratio_mean": skipped["metrics"].get("ratio_mean"),
    }
    out.write_text(json.dumps(report))


def test_the_loss_with_its_own_log_probs_equals_the_explicit_pass(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run_on_ranks(partial(_loss_rank, out=out), 1, tmp_path / "ranks")
    report = json.loads(out.read_text())
    explicit, skipped = report["loss"]
    assert abs(explicit - skipped) <= 1e-12 * max(abs(explicit), 1.0), report
    assert report["grad_norm"] > 1e-3 and report["grad_max_abs_diff"] <= 1e-12, report
    for name, (want, got) in report["mismatch"].items():
        assert abs(want - got) <= 1e-6 * max(abs(want), 1.0), (name, report)  # float32 statistics
    assert report["mismatch"]["mismatch_max_abs_log_ratio"][0] > 0.01  # the rollout's log-probs really differ


def digit_sum_score(token_ids: list[list[int]], answers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A response is right when its ids sum to a multiple of 3 (+1 / -1): mixed outcomes in every group."""
    correct = torch.tensor([sum(ids) % 3 == 0 for ids in token_ids])
    return correct.float() * 2 - 1, correct


def actor_and_hf_engine(config: object, model: Path) -> tuple:
    """The actor of ``config`` and a transformers rollout engine of ``model``, with a fixed sync probe."""
    from megatron_hapo.trainer.actor import build_actor, build_engine

    actor, engine = build_actor(config), build_engine(config, str(model))
    actor.probe = [5, 6, 7, 8, 9, 10, 11, 12]
    return actor, engine


def _step_rank(rank: int, world: int, model: Path, out: Path) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.trainer.step import StepState, rl_step

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]
    report = {}
    for mode in ("always", "auto"):
        overrides = [
            f"model.path={model}",
            "engine.kind=hf",
            "rollout.num_samples_per_prompt=4",
            "rollout.max_response_length=6",
            "train.prompts_per_step=4",
            "train.mini_batch_prompts=4",  # one optimizer step
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            f"train.old_log_prob_pass={mode}",
        ]
        config = load_config(REPO / "configs" / "algo" / "grpo.yaml", overrides)
        actor, engine = actor_and_hf_engine(config, model)
        metrics = rl_step(
            actor, engine, digit_sum_score, prompts=prompts, answers=[0] * 4, config=config, state=StepState()
        )
        params = torch.cat([p.detach().reshape(-1) for p in actor.chunks[0].parameters()])
        grads = torch.cat([b.grad_data.reshape(-1) for b in actor.chunks[0].buffers])
        report[mode] = {"metrics": metrics, "params": params.tolist(), "grads": grads.tolist()}
        engine.close()
    out.write_text(json.dumps(report))


def test_a_skipped_pass_gives_the_same_update(small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "report.json"
    run_on_ranks(partial(_step_rank, model=small_llama, out=out), 1, tmp_path / "ranks")
    report = json.loads(out.read_text())
    always, auto = report["always"], report["auto"]
    assert always["metrics"]["forward_only_sequences"] > 0 and auto["metrics"]["forward_only_sequences"] == 0
    assert "time_old_log_prob" in always["metrics"] and "time_old_log_prob" not in auto["metrics"]
    assert always["metrics"]["generated_samples"] == auto["metrics"]["generated_samples"] == 16
    loss = (always["metrics"]["loss"], auto["metrics"]["loss"])
    assert abs(loss[0] - loss[1]) <= 1e-6 * max(abs(loss[0]), 1.0) and loss[0] != 0, loss
    grads = torch.tensor(always["grads"]), torch.tensor(auto["grads"])
    assert float(grads[0].norm()) > 0 and float((grads[0] - grads[1]).abs().max()) <= 1e-6
    moved = torch.tensor(always["params"]), torch.tensor(auto["params"])
    assert float((moved[0] - moved[1]).abs().max()) <= 1e-6
    for name in ("mismatch_kl", "mismatch_k3", "mismatch_max_abs_log_ratio"):  # now from the update's forward
        assert abs(always["metrics"][name] - auto["metrics"][name]) <= 1e-5, (name, always["metrics"], auto["metrics"])
