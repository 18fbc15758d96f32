#!/usr/bin/env python
"""Compare a converted Megatron checkpoint with its Hugging Face original on a few prompts.

    .venv/bin/python tools/verify_conversion.py --hf-dir Qwen2.5-Math-1.5B --ckpt ckpt/qwen-mcore [--tp 2]

Reports the largest logit difference, the mean KL(HF || Megatron) per token, and how many greedy-decoded tokens
agree, on the prompts of ``--prompt`` (tokenised with the checkpoint's tokenizer) or random token ids when the
directory has no tokenizer. The Megatron side loads the checkpoint at ``--tp`` x ``--pp`` local CPU processes
(torch_dist reshards on load), both sides in float32. Exit status 1 when the logits differ by more than
``--max-diff`` or the greedy tokens disagree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from megatron_hapo.models.checkpoint import load_mcore
from megatron_hapo.parallel import runtime
from megatron_hapo.parallel.collectives import gather_vocab_shards
from megatron_hapo.parallel.local_launch import run_local_ranks
from megatron_hapo.trainer.preflight import check_checkpoint_data


def _prompts(hf_dir: Path, texts: list[str], length: int) -> torch.Tensor:
    """``[P, length]`` token ids: the tokenised prompts (truncated / left-padded by repetition) or random ids."""
    rows: list[list[int]] = []
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        rows = [tokenizer(text)["input_ids"] for text in texts]
    except (OSError, ValueError, TypeError):
        pass
    if not rows or not all(rows):
        vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
        return torch.randint(0, vocab, (len(texts), length), generator=torch.Generator().manual_seed(0))
    return torch.stack([torch.tensor((row * length)[-length:], dtype=torch.long) for row in rows])


def _megatron_greedy(chunks: list, tokens: torch.Tensor, steps: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits of the prompt [P, S, V], greedy continuation [P, steps])`` (TP1 / PP1 model, gathered vocab)."""
    from megatron_hapo.parallel.policy_loss import ParallelGroups  # noqa: PLC0415

    model, group = chunks[0], ParallelGroups.from_megatron().tp
    tokens = tokens.to(runtime.rank_device())
    with torch.no_grad():
        first = None
        for _ in range(steps):
            positions = torch.arange(tokens.shape[1]).expand_as(tokens)
            logits = gather_vocab_shards(model(tokens, positions, None), group)[..., :vocab]
            first = logits if first is None else first
            tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return first.cpu(), tokens[:, -steps:].cpu()


def _rank(rank: int, world: int, args: argparse.Namespace, tokens: torch.Tensor, out: str) -> None:
    runtime.quiet_logs()
    runtime.initialize_model_parallel(args.tp, 1)
    spec, chunks = load_mcore(args.ckpt, dtype=torch.float32)
    logits, greedy = _megatron_greedy(chunks, tokens, args.steps, spec.vocab_size)
    if rank == 0:
        torch.save({"logits": logits, "greedy": greedy}, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", type=Path, required=True)
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel processes for the Megatron side")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable)")
    parser.add_argument("--length", type=int, default=16, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=8, help="greedy tokens to compare")
    parser.add_argument("--max-diff", type=float, default=1e-3, help="allowed max |logit difference|")
    args = parser.parse_args(argv)
    check_checkpoint_data(args.ckpt, f"--ckpt {args.ckpt}")  # before any of its pickles is read
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    texts = args.prompt or ["What is 12 * 7?", "Solve x^2 = 49.", "The capital of France is"]
    tokens = _prompts(args.hf_dir, texts, args.length)
    hf = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_logits = hf(tokens).logits
        hf_greedy = tokens
        for _ in range(args.steps):  # plain greedy, no generation-config rules (EOS, min length) on either side
            hf_greedy = torch.cat([hf_greedy, hf(hf_greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "megatron.pt")
        run_local_ranks(_rank, args.tp, args, tokens, out, device="cpu")
        megatron = torch.load(out, weights_only=True)
    diff = float((megatron["logits"] - hf_logits).abs().max())
    log_p, log_q = torch.log_softmax(hf_logits, -1), torch.log_softmax(megatron["logits"], -1)
    kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
    agree = int((megatron["greedy"] == hf_greedy[:, -args.steps :]).sum())
    total = megatron["greedy"].numel()
    print(f"max |logit difference| {diff:.2e}, mean KL {kl:.2e}, greedy tokens agreeing {agree}/{total}")
    ok = diff <= args.max_diff and agree == total
    print("conversion verified" if ok else "conversion MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    from megatron_hapo.processes import run_cli

    sys.exit(run_cli(main))  # a refused input: its line, status 2
