"""Throughput of RL runs, measured (a run's ``metrics.jsonl``) or predicted from two published figures: the
numbers behind ``tools/scaling_study.py`` and the studies' cost columns (:mod:`megatron_hapo.studies`).

The prediction is tokens/s/GPU = C * N^-alpha (N parameters) through two NeMo-RL v0.5 H100 BF16 on-policy GRPO
figures; see ``tools/scaling_study.py`` for the model, its calibration and its assumption.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING

from megatron_hapo.models.hf_config import decoder_spec
from megatron_hapo.models.plan import total_params

if TYPE_CHECKING:
    from megatron_hapo.config import Config

#: Architectures of the two calibration models (Hugging Face config keys) and their published figures.
_MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
LLAMA_31_8B = json.loads((_MODELS / "llama-3.1-8b-instruct" / "config.json").read_text())
QWEN3_32B = json.loads((_MODELS / "qwen3-32b" / "config.json").read_text())
CALIBRATION = (
    {"name": "Llama-3.1-8B", "arch": LLAMA_31_8B, "tokens_per_s_per_gpu": 1581.0, "step_s": 92.8, "gpus": 16},
    {"name": "Qwen3-32B", "arch": QWEN3_32B, "tokens_per_s_per_gpu": 571.0, "step_s": 376.0, "gpus": 32},
)
CALIBRATION_SOURCE = "NeMo-RL v0.5 performance summary, H100 BF16, on-policy GRPO"
#: Assumed rollout share of a predicted step (verl DeepSeek-671B, 96 GPUs: rollout 1050 s of a 1700 s step).
ROLLOUT_FRACTION = 1050.0 / 1700.0
#: (parameters, seconds) of verl's full NCCL weight broadcast on H100 (midpoints of 5.5-6.0 s and 14.2-18.1 s).
SYNC_POINTS = ((7e9, 5.75), (32e9, 16.15))
DEFAULT_TOKENS_PER_STEP = 1581.0 * 16 * 92.8
ASSUMPTION = (
    f"predicted split is an ASSUMPTION: rollout = {ROLLOUT_FRACTION:.1%} of the step (verl DeepSeek-671B "
    "1050 s of 1700 s; NeMo-RL publishes no split), sync = power law through verl's H100 NCCL broadcast "
    "times (7B 5.75 s, 32B 16.15 s), train = the rest"
)
SPLIT = ("rollout_s", "train_s", "sync_s", "other_s")
PREDICTED_FIELDS = ("step_s", *SPLIT, "tokens_per_s_per_gpu", "mfu")


def dense_decoder_params(hf_config: dict) -> int:
    """Parameters of a decoder megatron_hapo trains (Llama 3, Qwen2, Qwen3) from its Hugging Face config dict: the
    planner's count (``megatron_hapo.models.plan.total_params``); other architectures are refused, naming why."""
    return total_params(decoder_spec(hf_config))


def fit_power_law(points: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """``(C, alpha)`` with ``y = C * x^-alpha`` through exactly two ``(x, y)`` points."""
    (x1, y1), (x2, y2) = points
    alpha = math.log(y1 / y2) / math.log(x2 / x1)
    return y1 * x1**alpha, alpha


def calibration_fit() -> tuple[float, float]:
    """``(C, alpha)`` of tokens/s/GPU = C * N^-alpha through the two calibration models."""
    return fit_power_law(tuple((dense_decoder_params(c["arch"]), c["tokens_per_s_per_gpu"]) for c in CALIBRATION))


def predict_tokens_per_s_per_gpu(num_params: float, fit: tuple[float, float]) -> float:
    """The analytic model's tokens/s/GPU for ``num_params`` parameters."""
    c, alpha = fit
    return c * num_params**-alpha


def predicted_sync_s(num_params: float) -> float:
    """Assumed weight-sync seconds (power law through ``SYNC_POINTS``)."""
    c, alpha = fit_power_law(SYNC_POINTS)
    return c * num_params**-alpha


def predicted_split(step_s: float, num_params: float) -> tuple[float, float]:
    """``(rollout_s, sync_s)`` of a predicted step of ``step_s`` seconds (the ASSUMPTION above); training is the
    rest."""
    return ROLLOUT_FRACTION * step_s, min(predicted_sync_s(num_params), (1 - ROLLOUT_FRACTION) * step_s)


def mfu(num_params: float, tokens_per_s_per_gpu: float, peak_flops: float) -> float:
    """Training-equivalent MFU: 6 N FLOPs per token over the GPU's peak."""
    return 6.0 * num_params * tokens_per_s_per_gpu / peak_flops


def predicted_row(
    name: str, num_params: int, gpus: int, fit: tuple[float, float], *, tokens_per_step: float, peak_flops: float
) -> dict:
    """One ``predicted`` row: throughput from the fit, step from the workload, split from the ASSUMPTION."""
    tps = predict_tokens_per_s_per_gpu(num_params, fit)
    step = tokens_per_step / (tps * gpus)
    rollout, sync = predicted_split(step, num_params)
    return {
        "name": name,
        "params_b": num_params / 1e9,
        "gpus": gpus,
        "source": "predicted",
        "predicted": True,
        "predicted_fields": list(PREDICTED_FIELDS),
        "step_s": step,
        "rollout_s": rollout,
        "train_s": step - rollout - sync,
        "sync_s": sync,
        "other_s": 0.0,
        "tokens_per_s_per_gpu": tps,
        "mfu": mfu(num_params, tps, peak_flops),
        "tokens_per_step": tokens_per_step,
    }


def measured_row(name: str, metrics: list[dict], num_params: int, gpus: int, peak_flops: float) -> dict:
    """One ``measured`` row: means over the steps after the first (all steps when there is only one)."""
    rows = metrics[1:] or metrics

    def mean(*keys: str) -> float:
        values = [sum(row[k] for k in keys) for row in rows if all(k in row for k in keys)]
        return fmean(values) if values else math.nan

    step, rollout, sync = mean("time_step"), mean("time_generate"), mean("time_sync")
    train = mean("time_old_log_prob", "time_train")
    tps = mean("tokens_per_second") / gpus
    return {
        "name": name,
        "params_b": num_params / 1e9,
        "gpus": gpus,
        "source": "measured",
        "predicted": False,
        "predicted_fields": [],
        "step_s": step,
        "rollout_s": rollout,
        "train_s": train,
        "sync_s": sync,
        "other_s": step - rollout - train - sync,
        "tokens_per_s_per_gpu": tps,
        "mfu": mfu(num_params, tps, peak_flops),
        "steps_averaged": len(rows),
    }


#: Write bandwidth of a checkpoint per node to the shared file system: an ASSUMPTION (parallel file systems give a
#: client node 1-5 GB/s; the low end).
CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE = 1e9
#: The stop lead time's safety factor and fixed allowance (the launcher's signal relay, the stop checks'
#: collectives, the manifest).
LEAD_SAFETY, LEAD_ALLOWANCE_S = 1.25, 60.0
#: Never ask for less warning than the launch scripts' old fixed 10 minutes.
MIN_LEAD_S = 600


def estimated_step_s(config: Config, num_params: float, gpus: int) -> float:
    """An RL step's seconds ESTIMATED from the throughput fit: every response at half of its limit on average."""
    rollout = config.rollout
    tokens = float(config.train.prompts_per_step * rollout.num_samples_per_prompt)
    tokens *= (rollout.max_prompt_length + rollout.max_response_length) / 2
    return tokens / (predict_tokens_per_s_per_gpu(num_params, calibration_fit()) * gpus)


def checkpoint_bytes(num_params: float, dtype: str) -> float:
    """A checkpoint's size: the parameters in ``dtype``, and Adam's float32 m and v with float32 main parameters
    for 16-bit training (a 70B bf16 run: about 1 TB)."""
    return num_params * (2 + 12 if dtype == "bfloat16" else 4 + 8)


def stop_lead_time(config: Config, num_params: float, *, nodes: int, gpus_per_node: int) -> dict[str, float]:
    """How long before the time limit a run must be asked to stop (Slurm's ``--signal=USR1@T``), ESTIMATED.

    The loop checks for a stop between a step's phases: after the rollout, after the updates, after the sync
    and evaluation (:func:`~megatron_hapo.trainer.loop.train`), so a request waits at most for the longest
    phase, then the checkpoint is written::

        T = LEAD_SAFETY x (max(rollout, updates) + save) + LEAD_ALLOWANCE_S, in whole minutes, >= MIN_LEAD_S

    with the phases from :func:`estimated_step_s` split as :func:`predicted_row` splits a step and the save at
    :data:`CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE`. An evaluation is not in it: a request that arrives during
    one waits for it too (keep ``output.eval_interval`` evaluations short, or add their time to T)."""
    step = estimated_step_s(config, num_params, nodes * gpus_per_node)
    rollout, sync = predicted_split(step, num_params)
    save = checkpoint_bytes(num_params, config.model.dtype) / (nodes * CHECKPOINT_WRITE_BYTES_PER_S_PER_NODE)
    lead = LEAD_SAFETY * (max(rollout, step - rollout - sync) + save) + LEAD_ALLOWANCE_S
    return {
        "step_s": step,
        "rollout_s": rollout,
        "updates_s": step - rollout - sync,
        "save_s": save,
        "lead_s": float(max(MIN_LEAD_S, math.ceil(lead / 60) * 60)),
    }
