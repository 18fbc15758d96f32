"""Rollout dumps hold the values the loss used: a HAPO step at two data-parallel ranks, every response dumped.

The step trains two mini-batches (two optimizer steps), each split over the two ranks, so a row's values come
from the rank that trained it and the second mini-batch's first-update ratio is not 1; and at two tensor-parallel
ranks with packed micro-batches. From the dump alone the
test recomputes what the loss computed: the clip bounds from ``h_hat`` (the configured clip kind), the
redistributed advantages from the group advantages, ``h_hat``, ratio and bounds (the configured redistribution
kind), and each mini-batch's token-mean clipped surrogate, whose mean over the two updates must equal the step's
``loss`` metric; the entropies' token means equal the step's ``entropy_mean``.
"""

from __future__ import annotations

import gzip
import json
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from test_skip_noop_pass import actor_and_hf_engine, digit_sum_score
from test_train_hf_engine import small_llama  # noqa: F401  (the shared fixture)

REPO = Path(__file__).parents[2]
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12], [13, 14]]


#: ``(tensor parallel, extra overrides)``: two data-parallel ranks, padded micro-batches; and two tensor-parallel
#: ranks (one replica: only TP rank 0 records) with packed micro-batches (the loss's values read back through
#: ``PolicyMicroBatch.sequences``).
LAYOUTS = {
    "dp2": (1, []),
    "tp2-packed": (2, ["train.max_tokens_per_microbatch=48", "train.pack_sequences=true"]),
}


def _dump_rank(rank: int, world: int, model: Path, run_dir: Path, layout: str) -> None:
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.trainer.rollout_dump import RolloutDumps
    from megatron_hapo.trainer.step import StepState, rl_step

    runtime.quiet_logs()
    tp, extra = LAYOUTS[layout]
    runtime.initialize_model_parallel(tp, 1)
    overrides = [
        *extra,
        f"model.path={model}",
        f"model.tensor_parallel={tp}",
        "engine.kind=hf",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",  # two optimizer steps
        "optim.lr=1e-2",
        "optim.warmup_steps=0",
    ]
    config = load_config(REPO / "configs" / "algo" / "hapo.yaml", overrides)
    actor, engine = actor_and_hf_engine(config, model)
    dumps = RolloutDumps(run_dir, every=1, samples=16, seed=0)
    metrics = rl_step(
        actor, engine, digit_sum_score, prompts=PROMPTS, answers=[0] * 4, config=config, state=StepState(), dumps=dumps
    )
    dumps.close()
    engine.close()
    (run_dir / f"metrics_{rank}.json").write_text(json.dumps({**metrics, "writer": dumps.writer is not None}))


def _read(path: Path) -> list[dict]:
    with gzip.open(path, "rt") as lines:
        return [json.loads(line) for line in lines]


def _tensor(rows: list[dict], name: str) -> torch.Tensor:
    """``[16, 6]`` float32 of one value (0 beyond each response)."""
    out = torch.zeros(len(rows), 6)
    for i, row in enumerate(rows):
        values = row["values"][name]
        out[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_dump_holds_what_the_loss_used(layout: str, small_llama: Path, tmp_path: Path) -> None:  # noqa: F811
    from megatron_hapo.algos import CLIP, REDISTRIBUTION
    from megatron_hapo.algos.surrogate import clipped_surrogate_from_ratio
    from megatron_hapo.config import load_config

    run_dir = tmp_path / "run"
    run_on_ranks(partial(_dump_rank, model=small_llama, run_dir=run_dir, layout=layout), 2, tmp_path / "ranks")
    reports = [json.loads((run_dir / f"metrics_{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["writer"] for r in reports] == [True, False]  # one rank writes
    assert [p.name for p in (run_dir / "rollouts").iterdir()] == ["step_000000.jsonl.gz"]  # no partial file left
    rows = _read(run_dir / "rollouts" / "step_000000.jsonl.gz")
    assert [(r["group"], r["sample"]) for r in rows] == [(g, s) for g in range(4) for s in range(4)]
    assert all(r["prompt_ids"] == PROMPTS[r["group"]] and len(r["response_ids"]) >= 1 for r in rows)
    metrics = reports[0]
    algo = load_config(REPO / "configs" / "algo" / "hapo.yaml", ["algo.reward_shaping.buffer_length=2"]).algo
    values = {name: _tensor(rows, name) for name in rows[0]["values"]}
    mask = values["loss_mask"].bool()
    lengths = torch.tensor([len(r["response_ids"]) for r in rows])
    assert torch.equal(mask.sum(-1), lengths)  # every response token is in HAPO's loss
    h_hat, ratio = values["h_hat"], values["ratio"]
    eps_low, eps_high = CLIP.get(algo.clip.kind).fn(h_hat, **CLIP.params(algo.clip.kind, algo.clip))
    torch.testing.assert_close(torch.where(mask, eps_high, 0), values["eps_high"], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.where(mask, eps_low, 0), values["eps_low"], rtol=0, atol=1e-6)
    red = algo.redistribution
    advantage = REDISTRIBUTION.get(red.kind).fn(
        values["group_advantage"],
        h_hat,
        ratio,
        values["eps_low"],
        values["eps_high"],
        **REDISTRIBUTION.params(red.kind, red),
    )
    torch.testing.assert_close(torch.where(mask, advantage, 0), values["advantage"], rtol=1e-6, atol=1e-6)
    assert float(values["advantage"].abs().max()) > 0 and float(values["group_advantage"].abs().max()) > 0
    losses, entropies = [], []
    for rows_of_update in (slice(0, 8), slice(8, 16)):  # mini-batch 1: groups 0-1, mini-batch 2: groups 2-3
        m = mask[rows_of_update]
        per_token, _ = clipped_surrogate_from_ratio(
            ratio[rows_of_update],
            values["advantage"][rows_of_update],
            m,
            eps_low=values["eps_low"][rows_of_update],
            eps_high=values["eps_high"][rows_of_update],
            dual_clip_c=algo.clip.dual_clip_c,
        )
        losses.append(float((per_token * m).sum() / m.sum()))
        entropies.append(float((values["entropy"][rows_of_update] * m).sum() / m.sum()))
    assert abs(sum(losses) / 2 - metrics["loss"]) <= 1e-5 * max(abs(metrics["loss"]), 1e-3), (losses, metrics["loss"])
    assert abs(sum(entropies) / 2 - metrics["entropy_mean"]) <= 1e-5 * metrics["entropy_mean"]
    assert float((ratio[:8][mask[:8]] - 1).abs().max()) <= 1e-5  # the first update: the old policy's weights
    assert float((ratio[8:][mask[8:]] - 1).abs().max()) > 1e-4  # after one optimizer step
    old, rollout = values["old_log_prob"][mask], values["rollout_log_prob"][mask]
    assert float((old - rollout).abs().max()) <= 1e-3  # float32 trainer against the float32 engine
    assert float(values["temperature"][mask].min()) > 0
