#!/usr/bin/env python
"""The one-call GPU check: the trainer's GPU path end to end on one CUDA device, in one command (docs/GPU.md).

    python scripts/gpu_check.py [--allow-cpu] [--out DIR]      (scripts/gpu_check.sh installs the wheels first)

Runs on one rank (``RANK=0 WORLD_SIZE=1``, NCCL on ``cuda:0``) with a tiny random Llama (4 layers, GQA, vocabulary
500, padded by Megatron to 512) saved in bfloat16 by transformers on the spot, with a word-level tokenizer and a
chat template. One summary line per check, ``[gpu-check] PASS|FAIL|SKIP name: detail (seconds)``:

``tiny_model``      the HF model, tokenizer and prompt files (this process).
``device``          joins the process group through ``parallel.runtime`` (NCCL on CUDA) and Megatron TP1/PP1;
                    one all-reduce on the collective device; reports the GPU, CUDA, NCCL and library versions.
``forward_fp32``    ``trainer.actor.build_actor`` at ``model.dtype=float32``: Megatron's forward-only log-probs and
                    entropies (``LogProbEntropyStep``) against a float64 transformers forward of the same weights.
                    Tolerance 1e-3 on the largest |difference|: float32 noise is about 1e-6 on CPU (TF32 is switched
                    off for this check); one wrong weight matrix moves log-probs by order 1.
``forward_bf16``    the same at ``model.dtype=bfloat16`` (the actor the next checks train). The weights are bf16 in
                    the file, so the reference sees exactly the same values; what differs is bf16 arithmetic (8-bit
                    mantissa: each rounding is up to 2^-9 relative, over 4 layers and a 500-way softmax).
                    Tolerances: mean multiplicative error ``mean(exp|dlogp|) - 1`` <= 0.02, max |dlogp| <= 0.25,
                    max |dentropy| <= 0.1; measured on CPU bf16: 0.004 / 0.013 / 0.0006 (5x and more below); a
                    wrong weight gives errors of order 1.
``weight_sync``     ``make_engine(engine.kind=hf)`` in bf16 on the device; ``sync_weights`` from Megatron and
                    ``verify_sync`` (a dict: ``mult_error`` <= 0.03; both sides run bf16, with different kernels:
                    0.004-0.006 measured on CPU); a deliberately wrong engine weight must make ``verify_sync``
                    raise; on CUDA ``sleep`` must hand the engine's weight memory back and ``wake_up`` restore it.
``ppo_updates``     three ``trainer.step.rl_step`` calls of the HAPO preset with the hf engine (generate ->
                    reward -> advantages -> Megatron PPO update -> verified sync): loss and gradient norm finite,
                    no skipped update, the weights moved, every sync verified.
``checkpoint``      ``trainer.checkpoint.save_checkpoint``; a fresh actor (the initial weights) loads it with
                    ``load_checkpoint``: every parameter and every optimizer-state tensor bit-equal the trained
                    actor's, the step restored, ``latest_checkpoint`` finds it intact.
``export_hf``       ``tools/convert_mcore_to_hf.py`` on that checkpoint (a subprocess, as a user runs it): every
                    exported tensor bit-equals the trained model's HF view (the weight-sync mapping), and the
                    exported model's float64 log-probs match the trained Megatron model within the bf16 tolerance.
``train_cli``       ``python -m megatron_hapo.train configs/algo/hapo.yaml ... engine.kind=hf model.dtype=bfloat16``
                    under ``RANK/WORLD_SIZE/MASTER_ADDR`` (NCCL on ``cuda:LOCAL_RANK``) for 3 steps with an
                    evaluation: ``metrics.jsonl`` has steps 0-2, finite losses, verified syncs, a checkpoint.
``pytest_gpu``      ``python -m pytest tests/gpu -m gpu -rs``: everything that needs no vLLM / Transformer Engine /
                    second GPU must pass; those skip, and are reported as the named SKIPs ``vllm_engine``,
                    ``transformer_engine_fp8``, ``multi_gpu`` (the check machine has one GPU and neither package).

The checks from ``device`` to ``export_hf`` share one process (the suite: one actor trained, saved, exported), each
under its own time limit, in a child process with a hard limit: a failing or hanging check does not stop the others
(a hang is killed after ``faulthandler`` dumps its stack into ``suite.log``). ``train_cli`` and ``pytest_gpu`` are
processes of their own. Exit status 0 only when every check passed; the only SKIPs allowed are the three named
above (and, with ``--allow-cpu``, ``pytest_gpu`` itself). Everything lands under ``--out`` (default ``$OUT``, else
``runs/gpu_check``): ``gpu_check.log`` (these lines), ``summary.json`` (every check's numbers), and the logs of
the suite, the export, the training run (with its ``metrics.jsonl``) and pytest.

``--allow-cpu`` runs the same script on a machine without CUDA (gloo, bf16 on the CPU): CI runs it that way
(``tests/dist/test_gpu_check.py``). There ``pytest_gpu`` is a SKIP (every test in ``tests/gpu`` needs CUDA) and
the ``sleep`` memory check of ``weight_sync`` is not made (the hf engine sleeps only on CUDA); everything else is
the same code path, so a CPU pass proves the script and the CPU path, not the GPU.
"""

# ruff: noqa: PLC0415  (imports are lazy on purpose: the parent process never imports megatron, --list-missing
# runs before the carried wheels are installed, and each check imports what it exercises)

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PREFIX = "[gpu-check]"

#: ``(requirement, module)`` carried as wheels in ``.gpu_wheels`` (scripts/fetch_gpu_wheels.sh) and installed by
#: scripts/gpu_check.sh where the image lacks them (see that script for why each is needed).
REQUIREMENTS = (
    ("megatron-core==0.19.2", "megatron.core"),
    ("psutil", "psutil"),
    ("tensorboard", "tensorboard"),
    ("protobuf", "google.protobuf"),
    ("absl-py", "absl"),
    ("pytest", "pytest"),
    ("pluggy", "pluggy"),
    ("iniconfig", "iniconfig"),
    ("pygments", "pygments"),
)

# The tiny model: GQA (4 query heads over 2 KV heads), vocabulary 500 (Megatron pads it to 512).
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 500, 128, 4, 4, 2, 256
WEIGHT_STD = 0.05  # 2.5x the default init: logits spread (std about 0.6), so log-prob errors show
#: End-of-sequence ids of the generation config: 2 (``</s>``) and 100 more, so that responses end at varied lengths
#: (a random model never writes "Answer:"; DAPO's overlong shaping then gives groups mixed rewards and the
#: training run of ``train_cli`` takes real updates, not zero-advantage ones).
EOS_IDS = [2, *range(400, 500)]
WORDS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "What", "is", "+", "?", "Answer:", *map(str, range(10))]

FP32_MAX_ABS = 1e-3
BF16_MULT_ERROR, BF16_MAX_ABS, BF16_ENTROPY_MAX_ABS = 0.02, 0.25, 0.1
SYNC_TOLERANCE = 0.03  # verify_sync's mean multiplicative error, both sides in bf16 (different kernels)
PPO_STEPS, CLI_STEPS = 3, 3

#: The checks of the suite process, in order, with their time limits in seconds (``--budget-scale`` multiplies).
SUITE = (
    ("device", 60),
    ("forward_fp32", 40),
    ("forward_bf16", 40),
    ("weight_sync", 40),
    ("ppo_updates", 90),
    ("checkpoint", 60),
    ("export_hf", 60),
)
#: Hard limits (seconds) of the stages; they sum to 450 s, under the 8 minutes the check has on a GPU node.
STAGE_LIMITS = {"tiny_model": 40, "suite": 170, "train_cli": 100, "pytest_gpu": 140}
#: SKIPs that do not fail the check: what the check machine cannot run (no vLLM, no Transformer Engine, one GPU).
ALLOWED_SKIPS = {
    "vllm_engine": re.compile(r"vllm", re.IGNORECASE),
    "transformer_engine_fp8": re.compile(r"transformer.?engine", re.IGNORECASE),
    "multi_gpu": re.compile(r"needs \d+ GPUs", re.IGNORECASE),
}


class CheckFailedError(Exception):
    """A check's expectation did not hold (the message says which, with the numbers)."""


class CheckTimeoutError(Exception):
    """A check ran past its time limit."""


class StoppedError(Exception):
    """The check was stopped from outside (SIGTERM: the outer time limit of gpu_check.sh)."""


def _stop(signum: int, _frame: object) -> None:
    raise StoppedError(f"signal {signum}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailedError(message)


@dataclass
class Result:
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str
    seconds: float
    data: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"{PREFIX} {self.status} {self.name}: {self.detail} ({self.seconds:.1f} s)"


class Log:
    """Prints to stdout and appends to ``gpu_check.log``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, text: str) -> None:
        print(text, flush=True)
        with self.path.open("a") as handle:
            handle.write(text + "\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _subprocess_env(**extra: str) -> dict[str, str]:
    """This environment with the repository importable and no inherited rank variables."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of ``path``, indented with ``|`` (told apart from the check's own lines)."""
    if not path.is_file():
        return ""
    return "\n".join(f"    | {line}" for line in path.read_text(errors="replace").splitlines()[-lines:])


def _error_text(exc: BaseException) -> str:
    """One line: the exception and where it was raised (the innermost frame of this repository or the last)."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if str(REPO) in f.filename] or frames
    where = f" at {Path(ours[-1].filename).name}:{ours[-1].lineno}" if ours else ""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}{where}: {first}"[:600]


# ----------------------------------------------------------------------------------------------------------------
# Inputs: the tiny HF model with its tokenizer, and prompt files


def make_tiny_inputs(root: Path, seed: int = 0) -> dict[str, Path]:
    """A tiny random bf16 Llama with a word-level tokenizer and chat template in ``root/model``, and DAPO-layout
    ``root/train.jsonl`` (16 prompts) / ``root/eval.jsonl`` (4) of "What is a + b ?" (also used by tests/gpu)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=EOS_IDS,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the default init; norms away from 1 so that their mapping matters
        for param in model.parameters():
            param.normal_(0, WEIGHT_STD) if param.dim() > 1 else param.copy_(1 + 0.1 * torch.randn_like(param))
    model.to(torch.bfloat16).save_pretrained(model_dir, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    template = (
        "{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=template
    ).save_pretrained(model_dir)
    files = {"model": model_dir}
    for name, count in (("train", 16), ("eval", 4)):
        rows = []
        for i in range(count):
            a, b = i % 5, (i * 3 + (name == "eval")) % 5
            rows.append(
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": f"What is {a} + {b} ?"}],
                        "reward_model": {"ground_truth": str(a + b)},
                    }
                )
            )
        files[name] = root / f"{name}.jsonl"
        files[name].write_text("\n".join(rows) + "\n")
    return files


def train_overrides(model_dir: Path) -> list[str]:
    """The run settings of the suite and of ``train_cli``: HAPO, the hf engine, bf16, a tiny batch."""
    return [
        f"model.path={model_dir}",
        "model.dtype=bfloat16",
        "model.micro_batch_size=4",
        "engine.kind=hf",
        f"engine.sync_tolerance={SYNC_TOLERANCE}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=56",
        "rollout.max_response_length=8",
        "algo.reward_shaping.buffer_length=4",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "train.seed=3",
    ]


# ----------------------------------------------------------------------------------------------------------------
# The suite: one process, one actor


def _optimizer_state(optimizer: Any) -> list[dict]:
    """The torch optimizer state under a Megatron optimizer: Adam's moments and step (this rank's shard with the
    distributed optimizer, whose own ``state_dict`` leaves the parameter state out)."""
    return [part.optimizer.state_dict() for part in getattr(optimizer, "chained_optimizers", [optimizer])]


def _tensors(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every tensor inside a nested state dict, with its path (deterministic order)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from _tensors(value[key], f"{path}/{key}")
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}/{i}")


class Suite:
    """The in-process checks (``device`` ... ``export_hf``), sharing one trained bf16 actor."""

    def __init__(
        self,
        work: Path,
        results: Path,
        out: Path,
        *,
        allow_cpu: bool,
        scale: float,
        checks: list[str],
        inject: dict[str, str],
        limits: dict[str, int] | None = None,
    ) -> None:
        self.work, self.results, self.out, self.allow_cpu, self.scale = work, results, out, allow_cpu, scale
        self.checks, self.inject = checks, inject
        self.limits = limits or {}
        """Per-check time limits (``--limit``) over the scaled defaults."""
        self.model_dir = work / "inputs" / "model"
        self._actor: Any = None
        self.engine: Any = None
        self.state: Any = None
        self.checkpoint: Path | None = None
        self.tokens: Any = None
        self.reference: tuple | None = None

    # -- bookkeeping
    def _record(self, event: dict) -> None:
        with self.results.open("a") as handle:
            handle.write(json.dumps(event) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def run(self) -> None:
        import faulthandler

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the parent asks for stacks before a hard kill

        def on_alarm(_signum: int, _frame: object) -> None:
            raise CheckTimeoutError("ran past its time limit")

        signal.signal(signal.SIGALRM, on_alarm)
        for name, base_limit in SUITE:
            if name not in self.checks:
                continue
            limit = self.limits.get(name) or max(1, int(base_limit * self.scale))
            self._record({"event": "start", "name": name, "limit": limit})
            print(f"--- {name} (limit {limit} s)", flush=True)
            start = time.monotonic()
            status, data = "PASS", {}
            signal.alarm(limit)
            try:
                _inject_fault(self.inject.get(name))
                detail, data = getattr(self, f"check_{name}")()
                self._synchronize()
            except CheckFailedError as exc:
                status, detail = "FAIL", str(exc)
                traceback.print_exc()
            except CheckTimeoutError as exc:
                status, detail = "FAIL", f"CheckTimeoutError: {exc} ({limit} s)"
                traceback.print_exc()
            except BaseException as exc:  # a check's crash is its result, not the suite's end
                status, detail = "FAIL", _error_text(exc)
                traceback.print_exc()
            finally:
                signal.alarm(0)
            data = {**data, **self._memory()}
            result = Result(name, status, detail, time.monotonic() - start, data)
            print(result.line(), flush=True)
            self._record({"event": "result", **asdict(result)})

    @staticmethod
    def _synchronize() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # an asynchronous CUDA error belongs to the check that caused it

    @staticmethod
    def _memory() -> dict:
        import torch

        if not torch.cuda.is_available():
            return {}
        peak = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        return {"peak_gpu_mib": round(peak, 1)}

    # -- shared pieces
    def config(self, *extra: str) -> Any:
        from megatron_hapo.config import load_config

        return load_config(
            REPO / "configs" / "algo" / "hapo.yaml", [*train_overrides(self.model_dir), *extra], warn=False
        )

    def actor(self) -> Any:
        """The bf16 actor the checks train (built by ``forward_bf16``, or here when that check failed)."""
        if self._actor is None:
            from megatron_hapo.trainer.actor import build_actor

            self._actor = build_actor(self.config())
        return self._actor

    def probe_tokens(self) -> Any:
        import torch

        if self.tokens is None:
            gen = torch.Generator().manual_seed(1)
            self.tokens = torch.randint(3, VOCAB, (4, 48), generator=gen)
        return self.tokens

    def reference_of(self, model_dir: Path) -> tuple:
        """float64 transformers log-probs and entropies ``[B, S-1]`` of the probe tokens (on the CPU)."""
        import torch
        import transformers

        tokens = self.probe_tokens()
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
        with torch.no_grad():
            log_p = model(input_ids=tokens).logits.double().log_softmax(-1)
        log_prob = log_p[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        entropy = -(log_p.exp() * log_p).sum(-1)[:, :-1]
        return log_prob, entropy

    def megatron_log_probs(self, actor: Any) -> tuple:
        """Megatron's forward-only log-probs and entropies ``[B, S-1]`` of the probe tokens (back on the host)."""
        import torch
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_hapo.parallel.policy_loss import LogProbEntropyStep, PolicyMicroBatch
        from megatron_hapo.parallel.runtime import rank_device

        tokens = self.probe_tokens()
        batch, seq = tokens.shape
        mask = torch.ones(batch, seq, dtype=torch.bool)
        mask[:, -1] = False
        micro = PolicyMicroBatch(
            tokens=tokens,
            position_ids=torch.arange(seq).expand(batch, seq).contiguous(),
            targets=torch.roll(tokens, -1, dims=1),
            mask=mask,
        ).to(rank_device())
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=LogProbEntropyStep(actor.groups, actor.spec.vocab_size),
                data_iterator=iter([micro]),
                model=actor.chunks,
                num_microbatches=1,
                seq_length=seq,
                micro_batch_size=batch,
                forward_only=True,
            )
        return tuple(outputs[0][key][:, :-1].float().cpu() for key in ("log_prob", "entropy"))

    @staticmethod
    def compare(ours: tuple, reference: tuple) -> dict:
        from megatron_hapo.rollout.weight_sync import probe_error

        error = probe_error(ours[0].flatten(), reference[0].flatten())
        return {
            "mult_error": error["mult_error"],
            "max_abs_log_prob": error["max_abs"],
            "mean_abs_log_prob": float((ours[0].double() - reference[0]).abs().mean()),
            "max_abs_entropy": float((ours[1].double() - reference[1]).abs().max()),
        }

    @staticmethod
    def parameters(actor: Any) -> dict:
        from megatron_hapo.models.loading import unwrap

        return {
            f"{i}.{name}": param.detach().clone()
            for i, chunk in enumerate(actor.chunks)
            for name, param in unwrap(chunk).named_parameters()
        }

    # -- the checks (each returns (detail, data) or raises)
    def check_device(self) -> tuple[str, dict]:
        import torch
        import torch.distributed as dist
        import transformers

        from megatron_hapo.parallel import runtime

        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
        cuda = torch.cuda.is_available()
        expect(cuda or self.allow_cpu, "no CUDA device (torch.cuda.is_available() is False); --allow-cpu for a CPU run")
        runtime.quiet_logs()
        runtime.join_process_group()
        runtime.initialize_model_parallel(1, 1, seed=3)
        import megatron.core

        backend, device = dist.get_backend(), runtime.rank_device()
        box = torch.full((4,), 2.0, device=runtime.collective_device())
        dist.all_reduce(box)
        data = {
            "backend": backend,
            "device": str(device),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "megatron_core": megatron.core.__version__,
            "python": sys.version.split()[0],
        }
        if cuda:
            data.update(
                gpu=torch.cuda.get_device_name(),
                capability=list(torch.cuda.get_device_capability()),
                cuda=torch.version.cuda,
                nccl=_nccl_version(),
                bf16=torch.cuda.is_bf16_supported(),
                gpus=torch.cuda.device_count(),
            )
            expect(backend == "nccl" and device.type == "cuda", f"CUDA present but backend {backend} on {device}")
        expect(bool((box == 2.0).all()), f"all_reduce at world 1 changed the tensor: {box.tolist()}")
        where = f"{data.get('gpu', 'CPU')} ({device}, {backend})"
        return f"{where}; torch {torch.__version__}, megatron-core {megatron.core.__version__}", data

    def _forward_check(self, dtype: str) -> tuple[dict, Any]:
        from megatron_hapo.trainer.actor import build_actor

        if self.reference is None:
            self.reference = self.reference_of(self.model_dir)
        actor = build_actor(self.config(f"model.dtype={dtype}"))
        return self.compare(self.megatron_log_probs(actor), self.reference), actor

    def check_forward_fp32(self) -> tuple[str, dict]:
        with _ieee_fp32_matmul():
            errors, actor = self._forward_check("float32")
        del actor
        worst = max(errors["max_abs_log_prob"], errors["max_abs_entropy"])
        detail = f"max |dlogp| {errors['max_abs_log_prob']:.2e}, max |dH| {errors['max_abs_entropy']:.2e}"
        expect(math.isfinite(worst) and worst <= FP32_MAX_ABS, f"{detail} > {FP32_MAX_ABS:g}")
        return f"{detail} vs float64 transformers (<= {FP32_MAX_ABS:g})", errors

    def check_forward_bf16(self) -> tuple[str, dict]:
        errors, self._actor = self._forward_check("bfloat16")
        detail = (
            f"mult error {errors['mult_error']:.2e}, max |dlogp| {errors['max_abs_log_prob']:.2e}, "
            f"max |dH| {errors['max_abs_entropy']:.2e}"
        )
        within = (
            errors["mult_error"] <= BF16_MULT_ERROR
            and errors["max_abs_log_prob"] <= BF16_MAX_ABS
            and errors["max_abs_entropy"] <= BF16_ENTROPY_MAX_ABS
        )
        limits = f"<= {BF16_MULT_ERROR:g} / {BF16_MAX_ABS:g} / {BF16_ENTROPY_MAX_ABS:g}"
        expect(within, f"{detail}: over {limits}")
        return f"{detail} vs float64 transformers ({limits})", errors

    def check_weight_sync(self) -> tuple[str, dict]:
        import torch

        from megatron_hapo.rollout.factory import make_engine
        from megatron_hapo.rollout.weight_sync import WeightSyncError, sync_probe, sync_weights, verify_sync

        actor, config = self.actor(), self.config()
        self.engine = make_engine(
            self.model_dir,
            config.engine,
            dtype=config.model.dtype,
            seed=config.train.seed,
            max_model_len=config.rollout.max_prompt_length + config.rollout.max_response_length,
        )
        actor.probe = sync_probe(self.probe_tokens().tolist())
        report = sync_weights(self.engine, actor.chunks, actor.spec, actor.sync_plan, actor.groups)
        error = verify_sync(
            self.engine,
            actor.chunks,
            actor.groups,
            actor.probe,
            vocab_size=actor.spec.vocab_size,
            tolerance=SYNC_TOLERANCE,
        )
        expect(isinstance(error, dict) and {"mult_error", "max_abs"} <= set(error), f"verify_sync returned {error!r}")
        data = {"sync_seconds": report.seconds, "sync_bytes": report.bytes, **error}
        weight = self.engine.model.get_parameter("model.layers.0.mlp.down_proj.weight")
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(-1.0)  # a wrong weight in the engine: the probe must catch it
        try:
            verify_sync(
                self.engine,
                actor.chunks,
                actor.groups,
                actor.probe,
                vocab_size=actor.spec.vocab_size,
                tolerance=SYNC_TOLERANCE,
            )
            caught = False
        except WeightSyncError as exc:
            caught = True
            found = re.search(r"error of ([0-9.e+-]+)", str(exc))
            data["wrong_weight_mult_error"] = float(found.group(1)) if found else str(exc)[:200]
        with torch.no_grad():
            weight.copy_(saved)
        expect(caught, "verify_sync accepted an engine with a negated down_proj weight")
        detail = f"{report.bytes / 2**20:.1f} MiB in {report.seconds:.2f} s, probe mult error {error['mult_error']:.2e}"
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()
            awake = torch.cuda.memory_allocated()
            self.engine.sleep()
            asleep = torch.cuda.memory_allocated()
            self.engine.wake_up()
            data.update(engine_sleep_freed_mib=(awake - asleep) / 2**20)
            expect(asleep < awake, f"engine.sleep() freed no GPU memory ({awake} -> {asleep} bytes)")
            detail += f", sleep freed {(awake - asleep) / 2**20:.1f} MiB"
        after = verify_sync(
            self.engine,
            actor.chunks,
            actor.groups,
            actor.probe,
            vocab_size=actor.spec.vocab_size,
            tolerance=SYNC_TOLERANCE,
        )
        data["mult_error_after_wake"] = after["mult_error"]
        return f"{detail}; a wrong weight is refused (error {data['wrong_weight_mult_error']})", data

    def check_ppo_updates(self) -> tuple[str, dict]:
        import torch

        from megatron_hapo.rewards import first_token_parity
        from megatron_hapo.rollout.weight_sync import sync_probe
        from megatron_hapo.trainer.step import StepState, rl_step

        actor, config = self.actor(), self.config()
        if self.engine is None:
            from megatron_hapo.rollout.factory import make_engine

            self.engine = make_engine(
                self.model_dir, config.engine, dtype=config.model.dtype, seed=config.train.seed, max_model_len=64
            )
        gen = torch.Generator().manual_seed(5)
        prompts = [torch.randint(3, VOCAB, (6,), generator=gen).tolist() for _ in range(4)]
        answers = [0, 1, 0, 1]
        actor.probe = sync_probe(prompts)

        def score(token_ids: Any, targets: Any) -> tuple[Any, Any]:
            outcomes = [first_token_parity(t, a) for t, a in zip(token_ids, targets, strict=True)]
            return torch.tensor([r for r, _ in outcomes]), torch.tensor([c for _, c in outcomes])

        before = self.parameters(actor)
        self.state = StepState()
        rows = []
        for _ in range(PPO_STEPS):
            metrics = rl_step(
                actor, self.engine, score, prompts=prompts, answers=answers, config=config, state=self.state
            )
            rows.append(
                {
                    k: metrics.get(k)
                    for k in (
                        "loss",
                        "grad_norm",
                        "updates_skipped",
                        "sync_probe_error",
                        "sync_probe_max_abs",
                        "kept_groups",
                        "accuracy",
                        "mismatch_max_abs_log_ratio",
                        "temperature_mean",
                    )
                }
            )
        after = self.parameters(actor)
        moved = max(float((after[k].float() - before[k].float()).abs().max()) for k in before)
        data = {"steps": rows, "max_weight_change": moved}
        losses = [r["loss"] for r in rows]
        expect(all(r["loss"] is not None and math.isfinite(r["loss"]) for r in rows), f"losses {losses}")
        expect(all(math.isfinite(r["grad_norm"]) for r in rows), f"grad norms {[r['grad_norm'] for r in rows]}")
        expect(all(r["updates_skipped"] == 0 for r in rows), f"skipped updates {[r['updates_skipped'] for r in rows]}")
        expect(all(r["sync_probe_error"] <= SYNC_TOLERANCE for r in rows), "sync error over tolerance")
        expect(moved > 0, "the weights did not move")
        worst_sync = max(r["sync_probe_error"] for r in rows)
        return (
            f"{PPO_STEPS} rl_steps, losses {', '.join(f'{x:.3g}' for x in losses)}, weights moved by up to "
            f"{moved:.2e}, sync error <= {worst_sync:.2e}"
        ), data

    def check_checkpoint(self) -> tuple[str, dict]:
        from megatron_hapo.trainer.actor import build_actor
        from megatron_hapo.trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
        from megatron_hapo.trainer.step import StepState

        actor = self.actor()
        state = self.state or StepState(step=PPO_STEPS)
        root = self.work / "checkpoints"
        start = time.monotonic()
        self.checkpoint = save_checkpoint(root, actor, state, hf_dir=self.model_dir)
        save_s = time.monotonic() - start
        expect(latest_checkpoint(root) == self.checkpoint, f"latest_checkpoint: {latest_checkpoint(root)}")
        trained, trained_opt = self.parameters(actor), list(_tensors(_optimizer_state(actor.optimizer)))
        fresh = build_actor(self.config())
        differed = sum(not _bit_equal(p, trained[k]) for k, p in self.parameters(fresh).items())
        loaded = load_checkpoint(self.checkpoint, fresh)
        params = self.parameters(fresh)
        expect(params.keys() == trained.keys(), "the reloaded model has other parameters")
        bad = [k for k in trained if not _bit_equal(params[k], trained[k])]
        fresh_opt = list(_tensors(_optimizer_state(fresh.optimizer)))
        expect(
            len(fresh_opt) == len(trained_opt) and len(trained_opt) > 0,
            f"optimizer state: {len(trained_opt)} tensors saved, {len(fresh_opt)} reloaded",
        )
        bad_opt = [p for (p, a), (_, b) in zip(trained_opt, fresh_opt, strict=True) if not _bit_equal(a, b)]
        data = {
            "checkpoint": self.checkpoint.name,
            "save_seconds": save_s,
            "parameters": len(trained),
            "differed_before_load": differed,
            "optimizer_tensors": len(trained_opt),
            "step": loaded.step,
        }
        expect(not bad, f"{len(bad)} parameters differ after the reload, e.g. {bad[:3]}")
        expect(not bad_opt, f"{len(bad_opt)} optimizer tensors differ after the reload, e.g. {bad_opt[:3]}")
        expect(loaded.step == state.step, f"step {loaded.step} reloaded, {state.step} saved")
        del fresh
        return (
            f"{len(trained)} parameters ({differed} differed before the load) and {len(trained_opt)} optimizer "
            f"tensors bit-equal after the reload, step {loaded.step}; saved in {save_s:.1f} s"
        ), data

    def check_export_hf(self) -> tuple[str, dict]:
        from safetensors.torch import load_file

        from megatron_hapo.rollout.weight_sync import bucket_hf_tensors

        expect(self.checkpoint is not None, "no checkpoint (the checkpoint check failed)")
        actor, out = self.actor(), self.work / "export"
        log = self.out / "export.log"
        with log.open("w") as handle:
            result = subprocess.run(
                [
                    sys.executable,
                    str(REPO / "tools" / "convert_mcore_to_hf.py"),
                    "--ckpt",
                    str(self.checkpoint),
                    "--out",
                    str(out),
                ],
                cwd=REPO,
                env=_subprocess_env(),
                stdout=handle,
                stderr=subprocess.STDOUT,
                timeout=max(10, 45 * self.scale),
                check=False,
            )
        expect(result.returncode == 0, f"convert_mcore_to_hf.py exited {result.returncode}: {_tail(log, 3)}")
        exported = {}
        for shard in sorted(out.glob("*.safetensors")):
            exported.update(load_file(str(shard)))
        units = [unit for bucket in actor.sync_plan.buckets for unit in bucket]
        ours = bucket_hf_tensors(units, actor.chunks, actor.spec, actor.groups.tp)
        ours = {name: tensor.cpu() for name, tensor in ours.items()}
        expect(exported.keys() == ours.keys(), f"exported names differ: {sorted(exported.keys() ^ ours.keys())[:5]}")
        bad = [name for name in ours if not _bit_equal(exported[name], ours[name])]
        expect(not bad, f"{len(bad)} exported tensors differ from the trained model, e.g. {bad[:3]}")
        errors = self.compare(self.megatron_log_probs(actor), self.reference_of(out))
        initial = self.reference or self.reference_of(self.model_dir)
        trained = self.reference_of(out)
        moved = float((trained[0] - initial[0]).abs().max())
        data = {
            "tensors": len(ours),
            "dtype": str(next(iter(exported.values())).dtype),
            **errors,
            "trained_vs_initial_max_abs_log_prob": moved,
        }
        detail = f"mult error {errors['mult_error']:.2e}, max |dlogp| {errors['max_abs_log_prob']:.2e}"
        expect(
            errors["mult_error"] <= BF16_MULT_ERROR and errors["max_abs_log_prob"] <= BF16_MAX_ABS,
            f"exported model vs trained Megatron: {detail}",
        )
        return (
            f"{len(ours)} tensors bit-equal the trained model; its float64 log-probs vs Megatron bf16: {detail} "
            f"(training moved them by up to {moved:.2e})"
        ), data


@contextlib.contextmanager
def _ieee_fp32_matmul() -> Iterator[None]:
    """float32 matmuls in full precision (no TF32) inside the block (torch's newer API where it exists)."""
    import torch

    matmul = torch.backends.cuda.matmul
    name, value = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    saved = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        yield
    finally:
        setattr(matmul, name, saved)


def _nccl_version() -> str:
    import torch

    try:
        version = torch.cuda.nccl.version()
    except Exception as exc:  # only reported
        return f"unknown ({type(exc).__name__})"
    return ".".join(map(str, version)) if isinstance(version, tuple | list) else str(version)


def _inject_fault(kind: str | None) -> None:
    """Faults for the tests of this script's isolation (``--inject CHECK=KIND``): ``raise`` an error, ``hang`` in
    Python (the check's time limit ends it), ``block`` as a stuck kernel or collective would (the time limit cannot
    interrupt it: the parent kills the suite), ``exit`` the suite process."""
    if kind == "raise":
        raise RuntimeError("injected fault")
    if kind == "hang":
        while True:
            time.sleep(0.1)
    if kind == "block":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            time.sleep(0.1)
    if kind == "exit":
        os._exit(3)


def _bit_equal(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def suite_main(args: argparse.Namespace) -> int:
    suite = Suite(
        Path(args.work),
        Path(args.results),
        Path(args.out),
        allow_cpu=args.allow_cpu,
        scale=args.budget_scale,
        checks=args.checks.split(","),
        inject=dict(item.split("=", 1) for item in args.inject),
        limits=_limits(args.limit),
    )
    suite.run()
    with contextlib.suppress(Exception):
        from megatron_hapo.parallel import runtime

        if suite.engine is not None:
            suite.engine.close()
        runtime.leave_process_group()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# The stages run by the parent


#: How long past a check's own limit (its SIGALRM, which ends a hang in Python) the parent waits before it kills
#: the suite (a check blocked where no signal reaches it: a stuck kernel or collective).
WATCH_GRACE_S = 10.0
#: How long the parent waits for the suite's stack dump (SIGUSR1, faulthandler) before the kill.
DUMP_WAIT_S = 30.0


def _limits(items: list[str]) -> dict[str, int]:
    """``--limit CHECK=SECONDS`` items as a mapping."""
    return {name: int(seconds) for name, seconds in (item.split("=", 1) for item in items)}


class CheckWatch:
    """Says when the suite's current check has run ``WATCH_GRACE_S`` past its own limit, from the suite's
    ``start`` / ``result`` events (``suite_results.jsonl``): the kill then comes a fixed time after that check
    started, whatever the start-up before it took."""

    def __init__(self, results: Path) -> None:
        self.results = results
        self.seen: dict[str, float] = {}
        """When this process first saw each check's start event."""

    def overran(self) -> str | None:
        if not self.results.is_file():
            return None
        events = [json.loads(line) for line in self.results.read_text().splitlines() if line.strip()]
        done = {e["name"] for e in events if e["event"] == "result"}
        for event in events:
            if event["event"] == "start" and event["name"] not in done:
                seen = self.seen.setdefault(event["name"], time.monotonic())
                if time.monotonic() - seen > event["limit"] + WATCH_GRACE_S:
                    return event["name"]
        return None


def _wait_for_text(path: Path, text: str, timeout_s: float) -> None:
    """Until ``path`` holds ``text`` (or ``timeout_s``: a hang guard)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and text not in path.read_text(errors="replace"):
        time.sleep(0.1)


def _run_process(
    args: list[str],
    log: Path,
    limit: float,
    *,
    env: dict[str, str],
    dump_stacks: bool = False,
    watch: CheckWatch | None = None,
) -> int:
    """Run ``args`` (its own process group) with output to ``log``; past ``limit`` seconds, or once ``watch`` says
    a check overran, kill the group (after a SIGUSR1 stack dump when ``dump_stacks``, waited for in the log) and
    return -9."""
    deadline = time.monotonic() + limit
    with log.open("a") as handle:
        proc = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            while True:
                try:
                    return proc.wait(timeout=max(0.0, min(0.5, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    overran = watch.overran() if watch is not None else None
                    if overran is None and time.monotonic() < deadline:
                        continue
                    why = f"{overran} ran {WATCH_GRACE_S:.0f} s past its limit" if overran else f"after {limit:.0f} s"
                    break
        except StoppedError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise
        if dump_stacks:
            handle.flush()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGUSR1)
                _wait_for_text(log, "most recent call first", DUMP_WAIT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        handle.write(f"\n[gpu-check] killed: {why}\n")
        return -9


class Checker:
    """Runs the stages in order and writes the summary."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out or os.environ.get("OUT") or REPO / "runs" / "gpu_check").resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in (
            "gpu_check.log",
            "summary.json",
            "suite.log",
            "suite_results.jsonl",
            "export.log",
            "train_cli.log",
            "train_cli_metrics.jsonl",
            "pytest_gpu.log",
            "pytest_gpu.xml",
        ):
            (self.out / stale).unlink(missing_ok=True)
        self.log = Log(self.out / "gpu_check.log")
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
        self.results: list[Result] = []
        self.start = time.monotonic()
        self.inputs: dict[str, Path] | None = None

    def limit(self, stage: str) -> float:
        """The stage's limit, cut to what is left of ``--deadline`` (a few seconds are kept for the summary)."""
        deadline = self.args.deadline or sum(STAGE_LIMITS.values()) * self.args.budget_scale
        left = deadline - (time.monotonic() - self.start) - 5
        return max(5.0, min(STAGE_LIMITS[stage] * self.args.budget_scale, left))

    def add(self, result: Result) -> None:
        self.results.append(result)
        self.log(result.line())

    def run(self) -> int:
        import torch  # the parent only builds the inputs on the CPU; it never touches the GPU

        self.cuda = torch.cuda.is_available()
        self.log(
            f"{PREFIX} megatron_hapo GPU check: {'CUDA' if self.cuda else 'CPU (--allow-cpu)'}, "
            f"python {sys.version.split()[0]}, torch {torch.__version__}, out {self.out}, work {self.work}"
        )
        if not self.cuda and not self.args.allow_cpu:
            self.add(Result("device", "FAIL", "no CUDA device; pass --allow-cpu to run the CPU path", 0.0))
            return self.finish()
        signal.signal(signal.SIGTERM, _stop)
        try:
            self.stage_tiny_model()
            stages = self.args.stages.split(",")
            for stage in ("suite", "train_cli", "pytest_gpu"):
                if stage in stages:
                    getattr(self, f"stage_{stage}")()
        except StoppedError as exc:
            self.add(Result("stopped", "FAIL", f"stopped from outside ({exc}): later checks did not run", 0.0))
        return self.finish()

    def stage_tiny_model(self) -> None:
        start = time.monotonic()
        try:
            self.inputs = make_tiny_inputs(self.work / "inputs")
            self.add(
                Result(
                    "tiny_model",
                    "PASS",
                    f"bf16 Llama {LAYERS} layers, hidden {HIDDEN}, {HEADS}/{KV_HEADS} "
                    f"heads, vocab {VOCAB}; train/eval jsonl",
                    time.monotonic() - start,
                )
            )
        except Exception as exc:
            traceback.print_exc()
            self.add(Result("tiny_model", "FAIL", _error_text(exc), time.monotonic() - start))

    def stage_suite(self) -> None:
        checks = [name for name, _ in SUITE if name in self.args.checks.split(",")]
        if self.inputs is None:
            for name in checks:
                self.add(Result(name, "FAIL", "not run: no tiny model", 0.0))
            return
        results_file = self.out / "suite_results.jsonl"
        args = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--suite-child",
            "--work",
            str(self.work),
            "--results",
            str(results_file),
            "--out",
            str(self.out),
            "--budget-scale",
            str(self.args.budget_scale),
            "--checks",
            ",".join(checks),
            *(f"--inject={item}" for item in self.args.inject),
            *(f"--limit={item}" for item in self.args.limit),
        ]
        if self.args.allow_cpu:
            args.append("--allow-cpu")
        start = time.monotonic()
        stopped = None
        try:
            code = _run_process(
                args,
                self.out / "suite.log",
                self.limit("suite"),
                env=_subprocess_env(),
                dump_stacks=True,
                watch=CheckWatch(results_file),
            )
        except StoppedError as exc:  # report what the suite finished, then stop
            code, stopped = -15, exc
        events = []
        if results_file.is_file():
            events = [json.loads(line) for line in results_file.read_text().splitlines() if line.strip()]
        done = {e["name"]: e for e in events if e["event"] == "result"}
        started = [e["name"] for e in events if e["event"] == "start"]
        for name in checks:
            if name in done:
                self.add(Result(**{k: v for k, v in done[name].items() if k != "event"}))
            elif name in started:
                why = {-9: "killed at its time limit or the suite's", -15: "stopped from outside"}.get(
                    code, f"the suite process died (exit {code})"
                )
                self.add(
                    Result(name, "FAIL", f"{why} during this check; stacks in suite.log", time.monotonic() - start)
                )
            else:
                self.add(Result(name, "FAIL", f"not run: the suite process ended early (exit {code})", 0.0))
        if any(r.status == "FAIL" for r in self.results if r.name in checks):
            self.log(f"--- tail of {self.out / 'suite.log'}:\n{_tail(self.out / 'suite.log', 40)}")
        if stopped is not None:
            raise stopped

    def stage_train_cli(self) -> None:
        start = time.monotonic()
        if self.inputs is None:
            self.add(Result("train_cli", "FAIL", "not run: no tiny model", 0.0))
            return
        run_dir = self.work / "train_run"
        args = [
            sys.executable,
            "-m",
            "megatron_hapo.train",
            "configs/algo/hapo.yaml",
            *train_overrides(self.inputs["model"]),
            f"data.train_file={self.inputs['train']}",
            f"data.eval_sets.held_out={self.inputs['eval']}",
            f"train.total_steps={CLI_STEPS}",
            "output.eval.n=2",
            "output.reward_workers=1",
            f"output.dir={run_dir}",
        ]
        env = _subprocess_env(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port())
        )
        log = self.out / "train_cli.log"
        log.write_text("$ " + " ".join(args) + "\n")
        code = _run_process(args, log, self.limit("train_cli"), env=env)
        seconds = time.monotonic() - start
        metrics = run_dir / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        if metrics.is_file():
            (self.out / "train_cli_metrics.jsonl").write_text(metrics.read_text())
        latest = run_dir / "checkpoints" / "latest"
        problems = []
        if code != 0:
            problems.append(f"exit {code}" + (" (killed at the time limit)" if code == -9 else ""))
        if [r.get("step") for r in rows] != list(range(CLI_STEPS)):
            problems.append(f"metrics.jsonl steps {[r.get('step') for r in rows]}")
        finite = [math.isfinite(r.get("loss", math.nan)) and math.isfinite(r.get("grad_norm", math.nan)) for r in rows]
        if not all(finite):
            problems.append(f"losses {[r.get('loss') for r in rows]}, grad norms {[r.get('grad_norm') for r in rows]}")
        if not all(r.get("optimizer_steps", 0) > 0 and r.get("updates_skipped", 1) == 0 for r in rows):
            problems.append(
                f"optimizer steps {[r.get('optimizer_steps') for r in rows]}, skipped "
                f"{[r.get('updates_skipped') for r in rows]}"
            )
        if not all(r.get("sync_probe_error", math.inf) <= SYNC_TOLERANCE for r in rows):
            problems.append(f"sync errors {[r.get('sync_probe_error') for r in rows]}")
        if rows and "eval/held_out/avg@2" not in rows[-1]:
            problems.append("no evaluation in the last row")
        if not latest.is_file() or latest.read_text().strip() != f"step_{CLI_STEPS:06d}":
            problems.append(f"checkpoints/latest: {latest.read_text().strip() if latest.is_file() else 'missing'}")
        data = {"exit": code, "rows": rows}
        if problems:
            self.add(Result("train_cli", "FAIL", "; ".join(problems), seconds, data))
            self.log(f"--- tail of {log}:\n{_tail(log, 40)}")
            return
        losses = ", ".join(f"{r['loss']:.3g}" for r in rows)
        grads = ", ".join(f"{r['grad_norm']:.3g}" for r in rows)
        self.add(
            Result(
                "train_cli",
                "PASS",
                f"{CLI_STEPS} steps, losses {losses}, grad norms {grads}, sync error <= "
                f"{max(r['sync_probe_error'] for r in rows):.2e}, avg@2 {rows[-1]['eval/held_out/avg@2']:.2f}, "
                f"checkpoint {latest.read_text().strip()}",
                seconds,
                data,
            )
        )

    def stage_pytest_gpu(self) -> None:
        if not self.cuda:
            self.add(Result("pytest_gpu", "SKIP", "tests/gpu need CUDA (--allow-cpu run): not run", 0.0))
            return
        start = time.monotonic()
        log, xml = self.out / "pytest_gpu.log", self.out / "pytest_gpu.xml"
        limit = self.limit("pytest_gpu")
        args = [
            sys.executable,
            "-m",
            "pytest",
            "tests/gpu",
            "-m",
            "gpu",
            "-rs",
            "-v",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            "-o",
            f"faulthandler_timeout={int(max(30, limit - 20))}",
        ]
        code = _run_process(args, log, limit, env=_subprocess_env())
        text = log.read_text(errors="replace") if log.is_file() else ""
        seconds = time.monotonic() - start
        passed, outcome, named, unexpected = classify_pytest(text, code)
        data = {"exit": code, "summary": outcome, "allowed_skips": named, "unexpected_skips": unexpected}
        if passed:
            self.add(Result("pytest_gpu", "PASS", outcome, seconds, data))
        else:
            why = [outcome] + ([f"unexpected skips: {'; '.join(unexpected)}"] if unexpected else [])
            self.add(Result("pytest_gpu", "FAIL", " | ".join(why), seconds, data))
            self.log(f"--- tail of {log}:\n{_tail(log, 60)}")
        for name, reasons in named.items():
            self.add(Result(name, "SKIP", " | ".join(reasons), 0.0))

    def finish(self) -> int:
        allowed = set(ALLOWED_SKIPS) | ({"pytest_gpu"} if self.args.allow_cpu and not self.cuda else set())
        failed = [r.name for r in self.results if r.status == "FAIL"]
        bad_skips = [r.name for r in self.results if r.status == "SKIP" and r.name not in allowed]
        skipped = [r.name for r in self.results if r.status == "SKIP" and r.name in allowed]
        passed = not failed and not bad_skips and any(r.status == "PASS" for r in self.results)
        seconds = time.monotonic() - self.start
        mode = "cuda" if getattr(self, "cuda", False) else "cpu"
        summary = {
            "passed": passed,
            "mode": mode,
            "seconds": round(seconds, 1),
            "failed": failed,
            "skipped": skipped,
            "unexpected_skips": bad_skips,
            "checks": [asdict(r) for r in self.results],
            "work": str(self.work),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        counts = f"{sum(r.status == 'PASS' for r in self.results)} passed, {len(skipped)} allowed skips"
        if skipped:
            counts += f" ({', '.join(skipped)})"
        where = "" if mode == "cuda" else " [CPU run: proves the script and the CPU path, not the GPU]"
        if passed:
            self.log(f"{PREFIX} ALL PASSED: {counts} in {seconds:.0f} s{where}")
        else:
            self.log(f"{PREFIX} FAILED: {', '.join(failed + bad_skips)}; {counts} in {seconds:.0f} s{where}")
        return 0 if passed else 1


def classify_pytest(text: str, code: int) -> tuple[bool, str, dict[str, list[str]], list[str]]:
    """Read a ``pytest -rs`` output: ``(passed, outcome line, allowed skips by name, unexpected skips)``.

    It passed when pytest exited 0, at least one test passed, and every skip is one of :data:`ALLOWED_SKIPS`."""
    skips = re.findall(r"^SKIPPED \[(\d+)\] ([^:\s]+(?::\d+)?): (.*)$", text, flags=re.MULTILINE)
    named: dict[str, list[str]] = {}
    unexpected = []
    for count, where, reason in skips:
        name = next((n for n, pattern in ALLOWED_SKIPS.items() if pattern.search(reason)), None)
        (named.setdefault(name, []) if name else unexpected).append(f"{count}x {where}: {reason}")
    summary = re.findall(
        r"^=+ (.*(?:passed|failed|error|skipped|no tests ran).*) in [0-9.]+s.* =+$", text, flags=re.MULTILINE
    )
    outcome = summary[-1] if summary else f"no pytest summary (exit {code})"
    passed = code == 0 and not unexpected and bool(re.search(r"\b[1-9][0-9]* passed", outcome))
    return passed, outcome, named, unexpected


def list_missing() -> list[str]:
    """The requirements of :data:`REQUIREMENTS` this interpreter lacks (or has at another pinned version)."""
    import importlib.metadata
    import importlib.util

    missing = []
    for requirement, module in REQUIREMENTS:
        name, _, pinned = requirement.partition("==")
        try:
            version = importlib.metadata.version(name)
            found = importlib.util.find_spec(module) is not None
        except (importlib.metadata.PackageNotFoundError, ImportError, ValueError):
            version, found = None, False
        if not found or version is None or (pinned and version != pinned):
            missing.append(requirement)
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (gloo, CPU); for CI")
    parser.add_argument("--out", help="results folder (default: $OUT, else runs/gpu_check)")
    parser.add_argument("--work-dir", help="where the scratch folder goes (default: the system temp folder)")
    parser.add_argument(
        "--deadline",
        type=float,
        help="seconds for the whole check (default: the sum of the "
        "stage limits, 450 s); the stage limits are cut to what is left of it",
    )
    parser.add_argument("--stages", default="suite,train_cli,pytest_gpu", help="stages to run (comma-separated)")
    parser.add_argument("--checks", default=",".join(name for name, _ in SUITE), help="checks of the suite to run")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every time limit")
    parser.add_argument("--list-missing", action="store_true", help="print the carried requirements not installed")
    parser.add_argument("--suite-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--results", help=argparse.SUPPRESS)
    parser.add_argument("--inject", action="append", default=[], help=argparse.SUPPRESS)  # CHECK=KIND, for tests
    parser.add_argument(
        "--limit", action="append", default=[], metavar="CHECK=SECONDS", help="one check's time limit (repeatable)"
    )
    args = parser.parse_args(argv)
    if args.list_missing:
        for requirement in list_missing():
            print(requirement)
        return 0
    if args.suite_child:
        return suite_main(args)
    return Checker(args).run()


if __name__ == "__main__":
    sys.exit(main())
