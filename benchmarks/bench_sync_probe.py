"""How far a correct weight sync's probe log-probs are from the trainer's, against a broken sync's (CPU).

Justifies ``engine.sync_tolerance`` for :func:`megatron_hapo.rollout.weight_sync.verify_sync`'s statistic, the
mean multiplicative error ``mean(exp(|engine - trainer|)) - 1`` over a 64-token probe, and shows why the
previous statistic (the largest absolute log-prob difference) is not robust in 16-bit.

A Megatron GPT (one gloo rank) of a random Llama scored by the transformers engine (``engine.kind=hf``) on
several probes cut from random prompts, in every pairing of trainer dtype x engine dtype, then with a broken
engine: one decoder layer replaced by a fresh random one ("corrupted"), one layer left at its weights before a
training step ("stale": the trainer has moved on by ``--stale-lr``-sized steps), the final norm zeroed. Prints
the worst probe's mean multiplicative error and max |difference| for each case.

    python benchmarks/bench_sync_probe.py [--layers 4 --hidden 256 --probes 8 --scale 1]
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial
from pathlib import Path

import torch

from megatron_hapo.parallel.local_launch import run_local_ranks


def _save_llama(path: Path, hidden: int, layers: int, vocab: int, scale: float) -> None:
    import transformers  # noqa: PLC0415

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # matrices of std scale / sqrt(hidden): larger scales give peakier distributions
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, scale / hidden**0.5)
    model.save_pretrained(path, safe_serialization=True)


def _probe_errors(engine: object, chunks: list, groups: object, probes: list, vocab: int) -> tuple[float, float]:
    from megatron_hapo.rollout.weight_sync import probe_error, trainer_log_probs  # noqa: PLC0415

    worst = {"mult_error": 0.0, "max_abs": 0.0}
    for probe in probes:
        error = probe_error(engine.prompt_log_probs(probe), trainer_log_probs(chunks, probe, groups, vocab))
        worst = {name: max(worst[name], error[name]) for name in worst}
    return worst["mult_error"], worst["max_abs"]


def _broken(engine: object, model_dir: Path, case: str, layer: int, stale_lr: float) -> None:
    """Damage the engine's weights in place as a broken sync would."""
    from safetensors.torch import load_file  # noqa: PLC0415

    weights = load_file(str(next(model_dir.glob("*.safetensors"))))
    prefix = f"model.layers.{layer}."
    gen = torch.Generator().manual_seed(1)
    if case == "corrupted":
        damaged = {
            n: torch.randn(t.shape, generator=gen) * t.float().std()
            for n, t in weights.items()
            if n.startswith(prefix) and t.dim() > 1
        }
    elif case == "stale":  # the engine kept this layer from before an update of relative size stale_lr
        damaged = {
            n: t.float() * (1 + stale_lr * torch.randn(t.shape, generator=gen).sign())
            for n, t in weights.items()
            if n.startswith(prefix)
        }
    else:
        damaged = {"model.norm.weight": torch.zeros_like(weights["model.norm.weight"])}
    engine.load_weights(iter(damaged.items()))


def _measure(rank: int, world: int, args: argparse.Namespace, model_dir: Path, out: list) -> None:
    from megatron_hapo.models import HFCheckpoint, build_gpt, load_hf_weights, read_decoder_spec  # noqa: PLC0415
    from megatron_hapo.parallel import runtime  # noqa: PLC0415
    from megatron_hapo.parallel.policy_loss import ParallelGroups  # noqa: PLC0415
    from megatron_hapo.rollout.hf_engine import HFEngine, HFEngineConfig  # noqa: PLC0415

    runtime.quiet_logs()
    runtime.initialize_model_parallel(1, 1)
    spec = read_decoder_spec(model_dir)
    gen = torch.Generator().manual_seed(3)
    probes = [torch.randint(3, args.vocab, (64,), generator=gen).tolist() for _ in range(args.probes)]
    groups = ParallelGroups.from_megatron()
    rows = []
    for trainer_dtype in ("float32", "bfloat16"):
        chunks = build_gpt(spec, dtype=getattr(torch, trainer_dtype))
        load_hf_weights(chunks, spec, HFCheckpoint(model_dir).__getitem__, tp_rank=0, tp_size=1)
        for engine_dtype in ("float32", "bfloat16"):
            engine = HFEngine(model_dir, HFEngineConfig(dtype=engine_dtype, max_model_len=128))
            rows.append(
                (
                    f"correct sync: trainer {trainer_dtype}, engine {engine_dtype}",
                    *_probe_errors(engine, chunks, groups, probes, spec.vocab_size),
                )
            )
            if trainer_dtype == "bfloat16" and engine_dtype == "float32":
                for case in ("corrupted", "stale", "zeroed final norm"):
                    broken = HFEngine(model_dir, HFEngineConfig(dtype=engine_dtype, max_model_len=128))
                    _broken(broken, model_dir, case, spec.num_layers // 2, args.stale_lr)
                    label = f"broken sync ({case}{f', lr {args.stale_lr:g}' if case == 'stale' else ''})"
                    rows.append(
                        (
                            f"{label}: trainer bf16, engine fp32",
                            *_probe_errors(broken, chunks, groups, probes, spec.vocab_size),
                        )
                    )
    Path(out[0]).write_text("\n".join(f"{label}\t{mult:.3g}\t{worst:.3g}" for label, mult, worst in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--scale", type=float, default=1.0, help="weight std x sqrt(hidden)")
    parser.add_argument("--stale-lr", type=float, default=1e-2, help="relative size of the missed update")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        _save_llama(model_dir, args.hidden, args.layers, args.vocab, args.scale)
        result = Path(tmp) / "rows.tsv"
        run_local_ranks(partial(_measure, args=args, model_dir=model_dir, out=[str(result)]), 1)
        rows = [line.split("\t") for line in result.read_text().splitlines()]
    title = f"case (worst of {args.probes} probes of 64 tokens, scale {args.scale:g})"
    print(f"{title:<62} {'mult error':>11} {'max |diff|':>11}")
    for label, mult, worst in rows:
        print(f"{label:<62} {mult:>11} {worst:>11}")


if __name__ == "__main__":
    main()
