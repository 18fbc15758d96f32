"""tools/plan.py: every shipped run config fits its cluster; broken layouts and configs that do not fit are refused
with the reason; the planner's parameter count equals transformers' meta-device model for every architecture."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: run config -> nodes of 8 GPUs (the launch scripts' #SBATCH --nodes)
SHIPPED = {
    "qwen2.5-math-1.5b-hapo": 4,
    "qwen2.5-math-7b-hapo": 4,
    "qwen3-8b-hapo": 8,
    "qwen3-14b-hapo": 8,
    "qwen3-32b-hapo": 8,
    "llama-3.1-8b-hapo": 4,
    "llama-3.3-70b-hapo": 8,
    "llama-3.3-70b-hapo-fp8": 8,
    "llama-3.3-70b-mixed-dapo": 8,
}


def _tool():
    spec = importlib.util.spec_from_file_location("plan_tool", REPO / "tools" / "plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["plan_tool"] = module
    spec.loader.exec_module(module)
    return module


def test_every_run_config_is_planned_and_shipped() -> None:
    shipped = {p.stem for p in (REPO / "configs" / "runs").glob("*.yaml") if not p.stem.startswith("_")}
    assert shipped == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_fit_80gb_gpus(name: str, capsys: pytest.CaptureFixture) -> None:
    code = _tool().main(
        [str(REPO / "configs" / "runs" / f"{name}.yaml"), "--nodes", str(SHIPPED[name]), "--gpus-per-node", "8"]
    )
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "fits (80 GiB GPUs)" in out.out and "training (heaviest stage)" in out.out


def test_broken_layouts_are_refused_with_the_reason(capsys: pytest.CaptureFixture) -> None:
    config = str(REPO / "configs" / "runs" / "qwen2.5-math-7b-hapo.yaml")
    tool = _tool()
    cases = [
        (["model.tensor_parallel=8"], "num_attention_heads=28 is not divisible by the tensor-parallel size (8)"),
        (["model.pipeline_parallel=3"], "not divisible by model.tensor_parallel x model.pipeline_parallel"),
        (["engine.tensor_parallel=16"], "engine.tensor_parallel=16 spans nodes"),
        (["train.mini_batch_prompts=48"], "must divide train.prompts_per_step=512"),
        (["model.virtual_pipeline=2"], "model.virtual_pipeline needs model.pipeline_parallel > 1"),
        (["rollout.max_response_length=40000"], "exceeds the model's max_position_embeddings 32768"),
        (
            ["model.tensor_parallel=1", "model.recompute=none", "train.max_tokens_per_microbatch=65536"],
            "training needs",
        ),
        (["engine.gpu_memory_utilization=0.05", "engine.tensor_parallel=1"], "KV cache holds no full-length"),
        (["model.fp8=hybrid", "model.fp8_recipe=mxfp8"], "model.fp8 on H100: fp8 recipe mxfp8 needs compute"),
    ]
    for overrides, reason in cases:
        assert tool.main([config, *overrides, "--nodes", "4", "--gpus-per-node", "8"]) == 1, overrides
        out = capsys.readouterr()
        assert reason in out.err and ("does not fit" in out.out or "invalid" in out.out), (overrides, out.err)


def test_activations_are_sized_by_the_token_budget() -> None:
    """A micro-batch holds the budget's tokens (one longest sequence at least), not the longest possible
    sequences times the micro-batch size."""
    from megatron_hapo.config import load_config
    from megatron_hapo.models.plan import microbatch_tokens

    config = REPO / "configs" / "runs" / "qwen2.5-math-7b-hapo.yaml"
    assert load_config(config, warn=False).train.max_tokens_per_microbatch == 16384  # the shipped budget
    sizes = {}
    for overrides in (
        ["train.max_tokens_per_microbatch=8192"],
        ["train.max_tokens_per_microbatch=32768"],
        ["train.max_tokens_per_microbatch=null", "model.micro_batch_size=2"],
    ):
        sizes[overrides[0]] = microbatch_tokens(load_config(config, overrides, warn=False))
    longest = 1024 + 10240  # a sequence longer than the budget gets a micro-batch of its own
    assert list(sizes.values()) == [longest, 32768, 2 * longest]


def test_fused_output_leaves_no_logits_in_the_plan(capsys: pytest.CaptureFixture) -> None:
    """Qwen2.5-Math-1.5B at TP1: the float32 logits of a 16384-token micro-batch dominate training memory."""
    import re

    config = str(REPO / "configs" / "runs" / "qwen2.5-math-1.5b-hapo.yaml")
    logits = []
    for flag in ("false", "true"):
        assert _tool().main([config, f"model.fused_output={flag}", "--nodes", "4", "--gpus-per-node", "8"]) == 0
        logits.append(float(re.search(r"logits ([0-9.]+)", capsys.readouterr().out).group(1)))
    assert logits[0] > 15 and logits[1] <= 1.0, logits


def test_parameter_count_matches_transformers() -> None:
    import json

    from megatron_hapo.models.hf_config import decoder_spec
    from megatron_hapo.models.plan import stage_params, total_params

    tool = _tool()
    for path in sorted((REPO / "configs" / "models").glob("*/config.json")):
        hf = json.loads(path.read_text())
        spec = decoder_spec(hf)
        assert total_params(spec) == tool.meta_device_params(hf), path
        # the Megatron shards add up to the model plus vocabulary padding (and the tied copy on the last stage)
        tp, pp = 2, 2
        padding = (spec.padded_vocab_size(tp) - spec.vocab_size) * spec.hidden_size
        tied_copy = spec.vocab_size * spec.hidden_size if spec.tie_word_embeddings else 0
        per_copy = padding * (1 if spec.tie_word_embeddings else 2) + tied_copy + padding * spec.tie_word_embeddings
        per_layer_norms = 2 * spec.hidden_size + 2 * spec.head_dim * spec.qk_norm
        norms = (spec.num_layers * per_layer_norms + spec.hidden_size) * (tp - 1)  # replicated on every TP rank
        assert sum(stage_params(spec, tp, pp)) * tp == total_params(spec) + per_copy + norms, path


def _plan_70b(capsys: pytest.CaptureFixture, *overrides: str) -> tuple[int, str, str]:
    config = str(REPO / "configs" / "runs" / "llama-3.3-70b-hapo.yaml")
    code = _tool().main([config, *overrides, "--nodes", "8", "--gpus-per-node", "8"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_engine_share_must_fit_beside_the_trainers_resident_state(capsys: pytest.CaptureFixture) -> None:
    """During rollout the trainer keeps parameters, float32 gradients and Adam state on the GPU: the shipped 70B
    layout (TP8 x PP4, DP2) with the engine asking for 0.6 of the GPU needs about 89 GiB without the distributed
    optimizer and is refused; sharded over the two data-parallel ranks, the Adam state halves and it fits."""
    code, out, err = _plan_70b(capsys, "engine.gpu_memory_utilization=0.6", "model.distributed_optimizer=false")
    assert code == 1 and "during rollout the trainer keeps 41.1 GiB" in err, err
    assert "lower engine.gpu_memory_utilization to 0.48 or less" in err
    assert "gradients 8.5" in out and "optimizer 25.4" in out  # float32 gradient buffer for bf16 parameters
    code, out, err = _plan_70b(capsys, "engine.gpu_memory_utilization=0.6")
    assert code == 0 and "optimizer 12.7" in out and "the trainer keeps 28.4 GiB" in out, out + err


def test_offload_hands_the_optimizer_memory_to_the_engine(capsys: pytest.CaptureFixture) -> None:
    """``model.offload=optimizer``: gradients and Adam state leave the GPU during rollout (parameters stay)."""
    code, _, err = _plan_70b(capsys, "engine.gpu_memory_utilization=0.75")
    assert code == 1 and "keeps 28.4 GiB per GPU (parameters, gradients, optimizer)" in err, err
    assert "set model.offload=optimizer" in err
    code, out, err = _plan_70b(capsys, "engine.gpu_memory_utilization=0.75", "model.offload=optimizer")
    assert code == 0 and "the trainer keeps 7.2 GiB" in out, out + err  # 4.2 parameters + 3.0 runtime


def test_sequence_parallelism_splits_the_activations_over_tp(capsys: pytest.CaptureFixture) -> None:
    """Korthikanti et al.: ``s b h (10 + 24 / tp)`` per layer without sequence parallelism, ``34 s b h / tp`` with
    it; at TP8 and the 70B shape that is 13 / 4.25, so the activations shrink about 3x."""
    import re

    sizes = []
    for flag in ("false", "true"):
        code, out, err = _plan_70b(
            capsys, f"model.sequence_parallel={flag}", "model.recompute=none", "train.max_tokens_per_microbatch=null"
        )
        assert code == 0, err
        sizes.append(float(re.search(r"activations ([0-9.]+)", out).group(1)))
    assert sizes[0] / sizes[1] == pytest.approx(13 / 4.25, rel=0.05), sizes


def test_fp8_rows_are_padded_to_what_each_tp_rank_needs(capsys: pytest.CaptureFixture) -> None:
    """The 70B FP8 layout (TP8, sequence parallelism, tensorwise): rows padded to 16 x 8 = 128 tokens, so a token
    budget below one such row is refused; blockwise needs 128 x 8."""
    code, out, err = _plan_70b(capsys, "model.fp8=hybrid")
    assert code == 0 and "micro-batch rows padded to multiples of 128 tokens" in out, out + err
    code, _, err = _plan_70b(capsys, "model.fp8=hybrid", "train.max_tokens_per_microbatch=100")
    assert code == 1 and "train.max_tokens_per_microbatch=100 is below one padded row" in err, err
    code, out, err = _plan_70b(capsys, "model.fp8=hybrid", "model.fp8_recipe=blockwise")
    assert code == 0 and "micro-batch rows padded to multiples of 1024 tokens" in out, out + err


def test_the_guide_engine_is_counted_and_must_fit(capsys: pytest.CaptureFixture) -> None:
    """Mixed-policy DAPO at 70B: the guide engine cannot sleep (one sleep-mode vLLM engine per process), so its
    share stays on every GPU. At the default 0.15 its 16.4 GiB of weights do not fit; with a share that holds them
    the trainer's resident state, the policy engine and the guide exceed 80 GB unless the optimizer state leaves
    the GPU during rollout: the shipped config does that and fits."""

    def plan(*overrides: str) -> tuple[int, str, str]:
        config = str(REPO / "configs" / "runs" / "llama-3.3-70b-mixed-dapo.yaml")
        code = _tool().main([config, *overrides, "--nodes", "8", "--gpus-per-node", "8"])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = plan()
    assert code == 0 and "guide engine (vLLM, awake all run): weights 16.4 GiB per GPU in 24.0 GiB" in out, out + err
    code, _, err = plan("engine.guide_gpu_memory_utilization=0.15")
    assert code == 1 and "the guide engine needs 19.6 GiB per GPU" in err, err
    assert "raise engine.guide_gpu_memory_utilization to 0.25" in err
    code, _, err = plan("model.offload=none")
    assert code == 1 and "during rollout the trainer keeps 52.4 GiB" in err and "guide engine's share" in err, err
    code, _, err = plan("algo.guide_policy.kind=none", "model.offload=none")  # without a guide the HAPO run fits
    assert code == 0, err
