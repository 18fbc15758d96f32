"""The policy loss through Megatron's schedules is independent of the parallel split.

A single-rank reference (plain float64 ``log_softmax`` on a TP1 / PP1 GPTModel, then ``algos.policy_loss``
over the whole mini-batch) gives the loss and the gradients of the HAPO composition for every aggregation
mode. Every layout (DP 1/2, TP 1/2, PP 1/2, PP2 x VPP2, 1 or 4 micro-batches, with and without
``calculate_per_token_loss``) runs the real ``get_forward_backward_func`` with Megatron DDP +
``finalize_model_grads`` and must reproduce both the reference and the same loss on one rank with one
micro-batch within a relative error of 1e-6. The tiny model runs in float64, so what is left is the float32
rounding of the entropy statistics (float32 by design); float32 models differ by ~1e-6 from summation order
alone. Each launch groups several layouts: a rank spends seconds importing Megatron.
"""

from __future__ import annotations

import itertools
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from gloo import run_on_ranks
from tiny_gpt import SEQ, VOCAB, build_model, full_grads, full_state, init_megatron, load_full_state

from megatron_hapo.algos import AGGREGATION_MODES

BATCH = 8
HAPO = Path(__file__).parents[2] / "configs" / "algo" / "hapo.yaml"
#: Any layout against the same loss on one rank, one micro-batch.
SPLIT_TOLERANCE = 1e-6
#: Against the plain float64 log_softmax reference.
PLAIN_TOLERANCE = 1e-6


#: Cases with the mixed-policy guide term: the last two sequences are guide-policy samples.
GUIDE_MODES = ("token-mean", "seq-mean-token-mean")
GUIDE_ROWS = torch.arange(BATCH) >= BATCH - 2


def _algo(mode: str, scope: str = "minibatch", guide: bool = False):
    from megatron_hapo.config import load_config

    overrides = [f"algo.aggregation.kind={mode}", f"algo.entropy.scope={scope}"]
    if guide:
        overrides += [
            "algo.guide_policy.kind=mixed",
            "algo.guide_policy.weight=0.7",
            "algo.guide_policy.eps_low=0.1",
            "algo.guide_policy.dual_clip_c=2.0",
        ]
    return load_config(HAPO, overrides, warn=False).algo


def _make_data() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    prompt = torch.randint(2, 6, (BATCH, 1), generator=gen)
    response = torch.randint(1, SEQ - 6, (BATCH, 1), generator=gen)
    response[3] = 0  # a sequence with no response token
    position = torch.arange(SEQ).expand(BATCH, SEQ)
    mask = (position >= prompt - 1) & (position < prompt - 1 + response)
    return {
        "tokens": tokens,
        "targets": torch.roll(tokens, -1, dims=1),
        "mask": mask,
        "advantages": torch.randn(BATCH, SEQ, generator=gen, dtype=torch.float64) * mask,
        "noise": 0.05 * torch.randn(BATCH, SEQ, generator=gen),
    }


def _reference(_rank: int, _world: int, out: Path) -> None:
    """Single rank, no schedule: weights, data, and per-mode loss + gradients of the whole mini-batch."""
    from megatron_hapo.algos import GuideBatch, normalized_entropy
    from megatron_hapo.algos.compose import policy_loss

    init_megatron(1, 1)
    chunks = build_model(ddp=False)
    model = chunks[0]
    data = _make_data()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    with torch.no_grad():
        log_p = torch.log_softmax(model(data["tokens"], positions, None).double(), dim=-1)
        data["old_log_prob"] = log_p.gather(-1, data["targets"].unsqueeze(-1)).squeeze(-1) + data["noise"].double()
    results = {}
    cases = [(mode, False) for mode in AGGREGATION_MODES] + [(mode, True) for mode in GUIDE_MODES]
    for mode, guide in cases:
        model.zero_grad()
        log_p = torch.log_softmax(model(data["tokens"], positions, None).double(), dim=-1)
        log_prob = log_p.gather(-1, data["targets"].unsqueeze(-1)).squeeze(-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        on_mask = data["mask"] & ~(GUIDE_ROWS[:, None] & guide)
        h_hat, _ = normalized_entropy(entropy.detach(), on_mask)
        guide_batch = None
        if guide:  # the guide sequences' old_log_prob plays the guide policy's log-prob
            guide_mask = data["mask"] & GUIDE_ROWS[:, None]
            guide_batch = GuideBatch(
                log_prob=log_prob, guide_log_prob=data["old_log_prob"], advantages=data["advantages"], mask=guide_mask
            )
        algo = _algo(mode, guide=guide)
        loss, _ = policy_loss(
            log_prob, data["old_log_prob"], data["advantages"], on_mask, algo=algo, h_hat=h_hat, guide_batch=guide_batch
        )
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[_key(mode, guide)] = {"loss": loss.detach(), "grads": grads}
    reference = {"state": full_state(chunks), "data": data, "plain": results}
    reference["glue"] = {_key(mode, g): _run_case(reference, mode, "minibatch", 1, False, guide=g) for mode, g in cases}
    torch.save(reference, out)


def _key(mode: str, guide: bool) -> str:
    return f"{mode}+guide" if guide else mode


def _microbatches(data: dict[str, torch.Tensor], dp_rank: int, dp: int, num_mb: int, guide: bool) -> list:
    from megatron_hapo.parallel.policy_loss import PolicyMicroBatch

    share = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    size = BATCH // dp // num_mb
    out = []
    for start in range(share.start, share.stop, size):
        rows = slice(start, start + size)
        out.append(
            PolicyMicroBatch(
                tokens=data["tokens"][rows],
                position_ids=torch.arange(SEQ).expand(size, SEQ),
                targets=data["targets"][rows],
                mask=data["mask"][rows],
                old_log_prob=data["old_log_prob"][rows],
                advantages=data["advantages"][rows],
                guide_rows=GUIDE_ROWS[rows] if guide else None,
            )
        )
    return out


def _run_case(
    reference: dict,
    mode: str,
    scope: str,
    num_mb: int,
    per_token: bool,
    batch_p2p_comm: bool = True,
    guide: bool = False,
) -> dict:
    """One layout x case: forward-only pass -> pooled stats -> training pass; returns the loss and full grads."""
    from megatron.core import parallel_state as mpu
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

    from megatron_hapo.parallel.policy_loss import (
        LogProbEntropyStep,
        ParallelGroups,
        PolicyLossStep,
        check_pipeline_schedule,
        plan_minibatch,
        pooled_entropy_stats,
        stats_from_last_stage,
    )

    groups, algo = ParallelGroups.from_megatron(), _algo(mode, scope, guide)
    dp, last = mpu.get_data_parallel_world_size(), mpu.is_pipeline_last_stage()
    mbs = _microbatches(reference["data"], mpu.get_data_parallel_rank(), dp, num_mb, guide)
    chunks = build_model(per_token_loss=per_token, batch_p2p_comm=batch_p2p_comm)
    load_full_state(chunks, reference["state"])
    check_pipeline_schedule(get_model_config(chunks[0]))
    schedule = partial(
        get_forward_backward_func(),
        model=chunks,
        num_microbatches=num_mb,
        seq_length=SEQ,
        micro_batch_size=mbs[0].tokens.shape[0],
    )

    def batches():
        return [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)

    outputs = schedule(forward_step_func=LogProbEntropyStep(groups, VOCAB), data_iterator=batches(), forward_only=True)
    stats = None
    if last:
        stats = pooled_entropy_stats([o["entropy"] for o in outputs], [m.masks()[0] for m in mbs], algo, groups)
    stats = stats_from_last_stage(stats, groups.pp)
    plan = plan_minibatch(mbs, algo, groups, entropy_stats=stats)
    step = PolicyLossStep(algo, groups, plan, VOCAB, calculate_per_token_loss=per_token)
    outputs = schedule(forward_step_func=step, data_iterator=batches(), forward_only=False)
    counts = last and mpu.get_tensor_model_parallel_rank() == 0
    loss = torch.tensor([sum(float(o["loss_share"]) for o in outputs) if counts else 0.0], dtype=torch.float64)
    dist.all_reduce(loss)
    return {"loss": loss[0], "grads": full_grads(chunks)}


def _relative_errors(result: dict, expected: dict) -> tuple[float, float]:
    """(relative loss error, the largest per-parameter relative gradient error in norm)."""
    loss_err = abs(float(result["loss"]) - float(expected["loss"])) / abs(float(expected["loss"]))
    grads = result["grads"]
    grad_err = max(float((grads[n] - ref).norm() / ref.norm().clamp_min(1e-30)) for n, ref in expected["grads"].items())
    return loss_err, grad_err


def _layouts(rank: int, world: int, reference_file: Path, layouts: list[tuple], out: Path) -> None:
    reference = torch.load(reference_file, weights_only=True)
    report = []
    for tp, pp, vpp in layouts:
        init_megatron(tp, pp, vpp)
        dp = world // (tp * pp)
        for num_mb in (4,) if vpp else (1, 4):
            scopes = ["minibatch", "microbatch"] if dp * num_mb == 1 else ["minibatch"]
            cases = [(m, s, p, False) for m, s, p in itertools.product(AGGREGATION_MODES, scopes, (False, True))]
            cases += [(m, "minibatch", p, True) for m, p in itertools.product(GUIDE_MODES, (False, True))]
            for mode, scope, per_token, guide in cases:
                result = _run_case(reference, mode, scope, num_mb, per_token, batch_p2p_comm=not vpp, guide=guide)
                case = {"tp": tp, "pp": pp, "vpp": vpp, "dp": dp, "mb": num_mb, "mode": _key(mode, guide)}
                case.update(scope=scope, per_token=per_token)
                case["split_err"] = max(_relative_errors(result, reference["glue"][_key(mode, guide)]))
                case["plain_err"] = max(_relative_errors(result, reference["plain"][_key(mode, guide)]))
                report.append(case)
    if rank == 0:
        out.write_text(json.dumps(report))


def test_pipeline_schedule_guard_rejects_pp2_vpp_batched_p2p():
    from types import SimpleNamespace

    from megatron_hapo.parallel.policy_loss import check_pipeline_schedule

    def config(**overrides):
        base = {"pipeline_model_parallel_size": 2, "virtual_pipeline_model_parallel_size": 2, "batch_p2p_comm": True}
        return SimpleNamespace(**(base | overrides))

    with pytest.raises(ValueError, match="batch_p2p_comm=False"):
        check_pipeline_schedule(config())
    for fine in (
        {"batch_p2p_comm": False},
        {"virtual_pipeline_model_parallel_size": None},
        {"pipeline_model_parallel_size": 4},
    ):
        check_pipeline_schedule(config(**fine))


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    path = tmp / "reference.pt"
    run_on_ranks(partial(_reference, out=path), 1, tmp)
    return path


@pytest.mark.parametrize(
    ("world", "layouts"),
    [
        (1, [(1, 1, None)]),
        (2, [(1, 1, None), (2, 1, None), (1, 2, None), (1, 2, 2)]),
        (4, [(2, 2, None), (1, 2, None), (2, 1, None)]),
    ],
    ids=["world1-dp1", "world2-dp2-tp2-pp2-vpp2", "world4-tp2pp2-dp2pp2-dp2tp2"],
)
def test_loss_and_grads_match_single_rank(reference_file: Path, tmp_path: Path, world: int, layouts: list) -> None:
    report_file = tmp_path / "report.json"
    run_on_ranks(partial(_layouts, reference_file=reference_file, layouts=layouts, out=report_file), world, tmp_path)
    report = json.loads(report_file.read_text())
    units = {(True, False): 3, (False, False): 2, (True, True): 1, (False, True): 1}  # (dp == 1, vpp) -> cases
    guide_cases = {False: 2 * len(GUIDE_MODES) * 2, True: 2 * len(GUIDE_MODES)}  # both loss paths per mb count
    expected = sum(
        2 * len(AGGREGATION_MODES) * units[world == tp * pp, bool(vpp)] + guide_cases[bool(vpp)]
        for tp, pp, vpp in layouts
    )
    assert len(report) == expected
    worst_split = max(r["split_err"] for r in report)
    assert worst_split <= SPLIT_TOLERANCE, "; ".join(
        str(list(r.values())) for r in report if r["split_err"] > SPLIT_TOLERANCE
    )
    worst_plain = max(r["plain_err"] for r in report)
    print(f"{len(report)} cases: worst relative error vs one rank {worst_split:.1e}, vs plain fp64 {worst_plain:.1e}")
    assert worst_plain <= PLAIN_TOLERANCE, [r for r in report if r["plain_err"] > PLAIN_TOLERANCE][:3]
