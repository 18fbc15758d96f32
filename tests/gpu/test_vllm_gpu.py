"""The colocated vLLM engine on a GPU: weight sync + verification, sleep / wake, adaptive temperature.

One rank (NCCL world of 1), a tiny Llama (head_dim 64) in a Megatron GPT on CUDA and a CUDA vLLM engine with
sleep mode in the same process, as on a cluster node. Needs CUDA and a GPU build of vLLM.
"""

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
VOCAB = 1000


@pytest.fixture(scope="module")
def gpu_world(require_vllm, nccl_megatron_world):
    """vLLM first (a skip must not wait for NCCL), then the one-rank world."""


def _tiny_llama(path: Path) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def test_sync_verify_sleep_wake_and_adaptive_temperature(gpu_world, tmp_path: Path) -> None:
    from megatron_hapo.algos import EntropyStats
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec
    from megatron_hapo.parallel.policy_loss import ParallelGroups
    from megatron_hapo.rollout import SamplingSettings
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_hapo.rollout.weight_sync import build_sync_plan, sync_weights, verify_sync

    _tiny_llama(tmp_path / "hf")
    spec = read_decoder_spec(tmp_path / "hf")
    chunks = build_gpt(spec, dtype=torch.bfloat16)  # on this rank's GPU
    source = HFCheckpoint(tmp_path / "hf")
    load_hf_weights(chunks, spec, lambda name: source[name] * 1.01, tp_rank=0, tp_size=1)  # differs from the files
    groups = ParallelGroups.from_megatron()
    engine = VLLMEngine(tmp_path / "hf", VLLMConfig(max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.3))
    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=2**20)
    probe = list(range(3, 67))  # 64 tokens, as the trainer's probe (weight_sync.PROBE_TOKENS)
    report = sync_weights(engine, chunks, spec, plan, groups)
    assert report.buckets > 1
    error = verify_sync(engine, chunks, groups, probe, vocab_size=VOCAB, tolerance=0.05)  # bf16 kernels
    assert error["mult_error"] <= 0.05 and error["max_abs"] >= 0, error
    free_awake = torch.cuda.mem_get_info()[0]
    engine.sleep()
    assert torch.cuda.mem_get_info()[0] > free_awake  # the engine gave memory back
    engine.wake_up()
    sync_weights(engine, chunks, spec, plan, groups)
    assert verify_sync(engine, chunks, groups, probe, vocab_size=VOCAB, tolerance=0.05)["mult_error"] <= 0.05
    stats = EntropyStats.from_floats(1.5, 0.5, 1.0, 1.0)
    sampling = SamplingSettings(max_tokens=16, temperature=1.0, adaptive_tau=0.2, seed=3)
    responses = engine.generate([[5, 6, 7], [8, 9]], 4, sampling, stats)
    temperatures = torch.cat([r.temperatures for r in responses])
    assert len(responses) == 8 and temperatures.numel() == sum(len(r.token_ids) for r in responses)
    assert float(temperatures.min()) >= 0.8 - 1e-6 and float(temperatures.max()) <= 1.2 + 1e-6
    engine.close()


def test_adaptive_temperature_records_with_async_scheduling_on_and_off(gpu_world, tmp_path: Path) -> None:
    """On GPUs vLLM schedules asynchronously by default (``engine.async_scheduling``; the CPU build cannot): step
    N + 1 is scheduled before step N's tokens are known, so the temperature records must still be kept per real
    token. Both ways, every recorded temperature equals the adaptive temperature recomputed from the float32
    reference's entropy at that position, and the temperature metrics of the two runs (the same seeds) agree."""
    import transformers

    from megatron_hapo.algos import EntropyStats, adaptive_temperature
    from megatron_hapo.rollout import SamplingSettings
    from megatron_hapo.rollout.engine import temperature_metrics
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine

    _tiny_llama(tmp_path / "hf")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).cuda()
    stats = EntropyStats.from_floats(1.5, 0.5, 1.0, 1.0)
    sampling = SamplingSettings(max_tokens=24, temperature=0.9, adaptive_tau=0.3, seed=5)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    metrics, errors = {}, {}
    for mode in (False, True):
        config = VLLMConfig(
            max_model_len=256, max_num_seqs=16, gpu_memory_utilization=0.3, dtype="float32", async_scheduling=mode
        )
        engine = VLLMEngine(tmp_path / "hf", config)
        responses = engine.generate(prompts, 4, sampling, stats)
        engine.close()
        worst = 0.0
        for r in responses:
            tokens = torch.tensor([prompts[r.prompt_index] + r.token_ids], device="cuda")
            with torch.no_grad():
                logits = reference(tokens).logits[0, len(prompts[r.prompt_index]) - 1 : -1].float().cpu()
            expected = adaptive_temperature(logits, 0.9, stats, tau=0.3)
            worst = max(worst, float((r.temperatures - expected).abs().max()))
        metrics[mode], errors[mode] = temperature_metrics(responses), worst
    assert max(errors.values()) <= 1e-3, errors  # per-token records right with and without async scheduling
    for name, value in metrics[False].items():
        assert abs(metrics[True][name] - value) <= 0.02, (name, metrics)
