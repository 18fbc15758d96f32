#!/usr/bin/env python
"""What a rollout dump costs (``output.save_rollouts_every``): its size, the writer thread's time, and how much
the writer slows the training thread while it writes.

    .venv/bin/python benchmarks/bench_rollout_dump.py [--responses 32] [--tokens 10240] [--repeats 3]

One dump of the default size at a 70B-class run's response length: ``--responses`` responses of ``--tokens``
tokens, every per-token value the trainer writes (12 lists: the loss's 8 and the rollout's 3, with ``h_hat``),
random float32 values of realistic spread, and the text of every token from a real byte-level BPE tokenizer (GPT-2's
vocabulary, trained here on the fly: no download) when ``tokenizers`` is installed. Reported: the compressed size
and bytes per token; the writer's seconds; the main thread's time in ``submit`` (what the step waits for); and a
main thread busy with float32 matmuls (the trainer's work on a CPU rank) timed alone and while the writer
writes, alternated ``--repeats`` times (the ratio is the slow-down the background thread causes through the
GIL and the shared cores; on a GPU rank the main thread mostly waits on kernels).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from megatron_hapo.trainer.dump_files import write_dump
from megatron_hapo.trainer.rollout_dump import DumpRecord, DumpWriter, dump_path

VALUES = (
    "rollout_log_prob",
    "temperature",
    "group_advantage",
    "old_log_prob",
    "entropy",
    "loss_mask",
    "ratio",
    "advantage",
    "eps_low",
    "eps_high",
    "h_hat",
)


class BpeDecoder:
    """``decode`` / ``batch_decode`` over a ``tokenizers.Tokenizer`` (picklable: the writer process gets a copy)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer = tokenizer

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return self.tokenizer.decode_batch(batch, skip_special_tokens=skip_special_tokens)


def _tokenizer() -> BpeDecoder | None:
    """A byte-level BPE tokenizer trained on a little text (offline), or ``None`` without ``tokenizers``."""
    try:
        from tokenizers import ByteLevelBPETokenizer  # noqa: PLC0415
    except ImportError:
        return None
    text = ["Let x be the answer. We compute 3 + 4 * 2 = 11, so the answer is \\boxed{11}."] * 200
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(text, vocab_size=300, show_progress=False)
    return BpeDecoder(bpe._tokenizer)


def _records(responses: int, tokens: int) -> list[DumpRecord]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(responses):
        values = {name: torch.randn(tokens, generator=gen) for name in VALUES}
        values["loss_mask"] = torch.ones(tokens)
        values["eps_low"] = torch.full((tokens,), 0.2)
        head = {"step": 0, "group": i // 16, "sample": i % 16, "reward": 1.0, "correct": True, "answer": "11"}
        head |= {
            "finish_reason": "stop",
            "prompt_ids": list(range(200)),
            "response_ids": [t % 300 for t in range(tokens)],
        }
        out.append(DumpRecord(head, values))
    return out


class ThreadWriter:
    """The alternative not taken: the same writing in a thread of the training process (``--writer thread``)."""

    def __init__(self, tokenizer: object) -> None:
        self.tokenizer, self.written, self.errors = tokenizer, [], 0
        self._thread: threading.Thread | None = None

    def submit(self, path: Path, records: list[DumpRecord]) -> None:
        task = (path, [record.task_part() for record in records])

        def run() -> None:
            write_dump(task, self.tokenizer)
            self.written.append(path)

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()


def _matmul(a: torch.Tensor) -> torch.Tensor:
    return torch.tanh(a @ a)


def _alone(iterations: int = 40) -> float:
    """Seconds per matmul step with nothing beside it."""
    a = torch.randn(512, 512)
    start = time.perf_counter()
    for _ in range(iterations):
        a = _matmul(a)
    return (time.perf_counter() - start) / iterations


def _beside(writer: DumpWriter | ThreadWriter, path: Path, records: list[DumpRecord]) -> tuple[float, float, float]:
    """``(seconds in submit, the writer's seconds, seconds per matmul step while it wrote)``."""
    a = torch.randn(512, 512)
    start = time.perf_counter()
    writer.submit(path, records)
    submitted = time.perf_counter()
    steps = 0
    while not writer.written and not writer.errors:
        a = _matmul(a)
        steps += 1
    done = time.perf_counter()
    return submitted - start, done - start, (done - submitted) / max(steps, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--responses", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=10240)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main thread's matmuls")
    parser.add_argument("--writer", choices=("process", "thread"), default="process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records, tokenizer = _records(args.responses, args.tokens), _tokenizer()
    alone, beside, write_s, submit_s, size = [], [], [], [], 0
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):  # alternated: alone, then beside the writer
            alone.append(_alone())
            writer = DumpWriter(tokenizer) if args.writer == "process" else ThreadWriter(tokenizer)
            path = dump_path(Path(folder), repeat)
            submitted, written, per_step = _beside(writer, path, records)
            writer.close()
            submit_s.append(submitted)
            write_s.append(written)
            beside.append(per_step)
            size = path.stat().st_size
    total = args.responses * args.tokens
    median = statistics.median
    text = "BPE" if tokenizer else "none"
    print(f"dump of {args.responses} x {args.tokens} tokens, token text: {text}, writer: {args.writer}")
    print(f"  file {size / 2**20:.1f} MiB gzip, {size / total:.1f} bytes per token")
    print(
        f"  writer {median(write_s):.2f} s (median of {args.repeats}); "
        f"the step waits in submit {max(submit_s) * 1e3:.2f} ms"
    )
    print(
        f"  main-thread matmul step: alone {median(alone) * 1e3:.2f} ms, while the writer writes "
        f"{median(beside) * 1e3:.2f} ms ({median(beside) / median(alone):.2f}x)"
    )


if __name__ == "__main__":
    main()
