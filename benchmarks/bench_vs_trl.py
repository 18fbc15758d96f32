#!/usr/bin/env python
"""Our trainer against Hugging Face TRL's ``GRPOTrainer`` on the same work, side by side on this machine.

    .venv/bin/python benchmarks/bench_vs_trl.py                 # both sizes, 3 alternations each (~25 min)
    .venv/bin/python benchmarks/bench_vs_trl.py --sizes 4m --repeats 1 --steps 3   # a quick look

TRL 1.16 (``use_vllm=False``: transformers ``generate``) is installed into a private folder (``--trl-dir``, with
``pip install --target --no-deps``: never a project dependency) and imported from there in its own process.
Both systems get the same random float32 Llama (``--sizes``: 4m = vocabulary 2048, hidden 256, 4 layers, 4.2 M
parameters, 128-token responses; 100m = hidden 768, 12 layers, 102 M parameters, 32-token responses), the same 16
prompts of 32 tokens (a word-level tokenizer and chat template) x 8 samples, exactly that many new tokens each
(``rollout.min_response_length`` / ``min_new_tokens``), GRPO with the token-mean loss (TRL's ``loss_type=dapo``),
clip 0.2, no KL, one optimizer step per rollout (AdamW lr 1e-5, weight decay 0.1, gradient clip 1), micro-batches
of 8 sequences, and the same reward (:func:`digit_share`, ours in its verifier workers, TRL's in-process). Ours
runs as ``python -m megatron_hapo.train`` builds it (one rank, the vLLM engine and the verified weight sync),
also with ``engine.kind=hf`` and with HAPO's preset on the same tokens (stated as such: a different algorithm,
with its forward-only pass and entropy statistics).

The systems alternate (ours, TRL, ours, ...) ``--repeats`` times; each run does ``--steps`` RL steps and the first
is dropped (start-up). Reported per system: min and median step time, generated tokens per second, the phase
split (ours from ``metrics.jsonl``; TRL's generation timed around ``_generate_and_score_completions``, the rest
is its update) and the peak RSS of the process tree (sampled every 0.1 s). Results: ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRL_PACKAGES = ("trl==1.16.0", "accelerate", "datasets", "multiprocess", "pandas", "python-dateutil", "pytz", "tzdata")
PROMPTS, SAMPLES, PROMPT_TOKENS, MICRO_BATCH = 16, 8, 32, 8
#: size -> (hidden, layers, intermediate, response tokens)
SIZES = {"4m": (256, 4, 688, 128), "100m": (768, 12, 2560, 32)}
VOCAB = 2048


def digit_share(response: str, ground_truth: object, extra: object = None) -> float:
    """The share of the response's words that are digits: a reward that varies within a group (random model)."""
    words = response.split()
    return sum(w.isdigit() for w in words) / max(1, len(words))


def make_inputs(out: Path, size: str, seed: int = 0) -> tuple[Path, Path]:
    """A random Llama of ``size`` with a word tokenizer, and the prompt file (``PROMPTS`` rows)."""
    import torch  # noqa: PLC0415  (the worker and the parent import only what they use)
    import transformers  # noqa: PLC0415

    from megatron_hapo.models.word_tokenizer import ARITHMETIC_WORDS, write_word_tokenizer  # noqa: PLC0415

    hidden, layers, intermediate, _ = SIZES[size]
    model_dir = out / f"model-{size}"
    words = [*ARITHMETIC_WORDS, *(f"w{i}" for i in range(VOCAB - len(ARITHMETIC_WORDS)))]
    write_word_tokenizer(model_dir, words)
    tokens = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        intermediate_size=intermediate,
        max_position_embeddings=512,
        **tokens,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float()
    model.generation_config = transformers.GenerationConfig(**tokens)
    model.save_pretrained(model_dir)
    generator = torch.Generator().manual_seed(seed)
    data = out / "prompts.jsonl"
    with data.open("w") as f:
        for _ in range(PROMPTS):  # the chat template adds <|user|> and <|assistant|>: 30 words, 32 tokens
            ids = torch.randint(len(ARITHMETIC_WORDS), VOCAB, (PROMPT_TOKENS - 2,), generator=generator).tolist()
            text = " ".join(words[i] for i in ids)
            f.write(json.dumps({"prompt": [{"role": "user", "content": text}], "answer": "0"}) + "\n")
    return model_dir, data


class TreePeak:
    """Peak summed RSS of a process and its descendants, sampled every 0.1 s in a thread."""

    def __init__(self, pid: int) -> None:
        import psutil  # noqa: PLC0415

        self.root, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil  # noqa: PLC0415

        while not self._stop.wait(0.1):
            try:
                procs = [self.root, *self.root.children(recursive=True)]
                total = 0
                for p in procs:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
                self.peak = max(self.peak, total)
            except psutil.Error:
                return

    def stop(self) -> float:
        """The peak in GiB."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**30


def _stop_group(process: subprocess.Popen) -> None:
    """Stop a run's process group at once: two different signals (the trainer's "stop now"), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_measured(command: list[str], env: dict[str, str], log: Path) -> float:
    """Run ``command`` to its end (its output to ``log``); the peak RSS of its process tree in GiB."""
    with log.open("w") as f:
        process = subprocess.Popen(
            command, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        peak = TreePeak(process.pid)
        try:
            code = process.wait()
        finally:  # the benchmark stopped (Ctrl-C, SIGTERM): the run and everything it started go with it
            gib = peak.stop()
            if process.poll() is None:
                _stop_group(process)
    if code:
        raise SystemExit(f"{' '.join(command[:4])} ... failed ({code}); its log: {log}")
    return gib


def ours(work: Path, size: str, model_dir: Path, data: Path, *, steps: int, variant: str, extra: list[str]) -> dict:
    """One run of our trainer (``variant``: grpo, grpo-hf or hapo); per-step phase times without the first."""
    response = SIZES[size][3]
    run_dir = work / f"ours-{variant}-{size}-{time.monotonic_ns()}"
    preset = "configs/algo/hapo.yaml" if variant == "hapo" else "configs/algo/grpo.yaml"
    overrides = [
        f"model.path={model_dir}",
        "model.dtype=float32",
        f"model.micro_batch_size={MICRO_BATCH}",
        f"data.train_file={data}",
        f"data.reward={Path(__file__).resolve()}:digit_share",
        "data.answer_key=answer",
        f"rollout.num_samples_per_prompt={SAMPLES}",
        f"rollout.max_prompt_length={PROMPT_TOKENS}",
        f"rollout.max_response_length={response}",
        f"rollout.min_response_length={response}",
        f"train.prompts_per_step={PROMPTS}",
        f"train.mini_batch_prompts={PROMPTS}",
        f"train.total_steps={steps}",
        "optim.lr=1e-5",
        "optim.warmup_steps=0",
        f"engine.max_num_seqs={PROMPTS * SAMPLES}",
        f"output.dir={run_dir}",
        "output.save_interval=0",
        "output.eval_interval=0",
        "output.reward_workers=1",
    ]
    if variant == "hapo":  # DAPO's overlong shaping within the response (every response has the same length)
        overrides += [f"algo.reward_shaping.buffer_length={response // 4}"]
    else:
        overrides += ["algo.aggregation.kind=token-mean"]
    if variant == "grpo-hf":
        overrides += ["engine.kind=hf"]
    command = [sys.executable, "-m", "megatron_hapo.train", preset, *overrides, *extra, "--local-ranks", "1"]
    peak = run_measured(command, dict(os.environ), work / f"{run_dir.name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {
        "step": [r["time_step"] for r in rows],
        "generation": [r["time_generate"] + r["time_reward"] for r in rows],
        "old_log_prob": [r.get("time_old_log_prob", 0.0) for r in rows],
        "update": [r["time_train"] for r in rows],
        "sync": [r.get("time_sync", 0.0) for r in rows],
        "grad_norm": [r["grad_norm"] for r in rows],
        "reward": [r["reward_mean"] for r in rows],
        "peak_gib": peak,
    }


def trl(work: Path, size: str, model_dir: Path, data: Path, *, steps: int, trl_dir: Path) -> dict:
    """One run of TRL's ``GRPOTrainer`` in its own process (this file's ``--trl-worker``)."""
    out = work / f"trl-{size}-{time.monotonic_ns()}.json"
    command = [sys.executable, __file__, "--trl-worker", str(model_dir), str(data), str(SIZES[size][3]), str(steps)]
    env = dict(os.environ, PYTHONPATH=f"{trl_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", TRL_OUT=str(out))
    peak = run_measured([*command], env, out.with_suffix(".log"))
    result = json.loads(out.read_text())
    return {key: values[1:] for key, values in result.items()} | {"peak_gib": peak}


def trl_worker(model_dir: str, data: str, response: int, steps: int) -> None:
    """Train ``steps`` TRL GRPO steps; write per-step times (and grad norm, reward) to ``$TRL_OUT``."""
    import datasets  # noqa: PLC0415  (from --trl-dir, in this process only)
    import transformers  # noqa: PLC0415
    import trl  # noqa: PLC0415

    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    dataset = datasets.Dataset.from_list(rows * steps)
    config = trl.GRPOConfig(
        output_dir=str(Path(os.environ["TRL_OUT"]).with_suffix(".dir")),
        per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO_BATCH,
        num_generations=SAMPLES,
        max_completion_length=response,
        generation_kwargs={"min_new_tokens": response},
        temperature=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        num_iterations=1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        weight_decay=0.1,
        max_grad_norm=1.0,
        max_steps=steps,
        logging_steps=1,
        report_to="none",
        use_cpu=True,
        bf16=False,  # TRL's GRPOConfig defaults to bf16 autocast; both systems compute in float32 here
        save_strategy="no",
        shuffle_dataset=False,
        seed=0,
    )
    times: dict[str, list[float]] = {"step": [], "generation": [], "grad_norm": [], "reward": []}

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            times["step"].append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001, ANN003
            if logs and "grad_norm" in logs:
                times["grad_norm"].append(float(logs["grad_norm"]))
                times["reward"].append(float(logs.get("reward", float("nan"))))

    def reward(completions: list, **kwargs: object) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [digit_share(t, None) for t in texts]

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=reward, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    inner = trainer._generate_and_score_completions

    def timed(*args: object, **kwargs: object) -> object:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            times["generation"].append(time.perf_counter() - start)

    trainer._generate_and_score_completions = timed
    trainer.add_callback(Clock())
    trainer.train()
    Path(os.environ["TRL_OUT"]).write_text(json.dumps(times))


def install_trl(trl_dir: Path) -> None:
    """TRL and the packages it needs that the project does not have, into ``trl_dir`` (once)."""
    if (trl_dir / "trl" / "__init__.py").is_file():
        return
    print(f"installing {', '.join(TRL_PACKAGES)} into {trl_dir} (not into the project's environment)")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--target", str(trl_dir), "--no-deps", *TRL_PACKAGES],
        check=True,
    )


def summarise(runs: list[dict], tokens_per_step: int) -> dict:
    """Pooled per-step values of a system's runs: min / median step, phase medians, tokens/s, peak GiB."""
    pooled: dict[str, list[float]] = {}
    for run in runs:
        for key, values in run.items():
            if isinstance(values, list):
                pooled.setdefault(key, []).extend(values)
    step = pooled["step"]
    out = {"step_min": min(step), "step_median": statistics.median(step), "steps": len(step)}
    for key in ("generation", "old_log_prob", "update", "sync"):
        if pooled.get(key):
            out[key] = statistics.median(pooled[key])
    if "update" not in out:  # TRL: what is not generation is its update (and bookkeeping)
        out["update"] = statistics.median(s - g for s, g in zip(step, pooled["generation"], strict=True))
    out["tokens_per_s"] = tokens_per_step / out["generation"]
    out["grad_norm_median"] = statistics.median(pooled["grad_norm"])
    out["peak_gib"] = max(run["peak_gib"] for run in runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the systems (each runs this often)")
    parser.add_argument("--steps", type=int, default=5, help="RL steps per run (the first is dropped)")
    parser.add_argument("--systems", nargs="+", default=["ours", "trl", "ours-hf", "ours-hapo"])
    parser.add_argument("--trl-dir", type=Path, default=ROOT / ".bench_cache" / "trl-1.16")
    parser.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    parser.add_argument("--ours-override", nargs="*", default=[], help="more key=value overrides for our runs")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: each run's process group is stopped
    install_trl(args.trl_dir)
    summary: dict[str, dict] = {}
    work = Path(tempfile.mkdtemp(prefix="bench_vs_trl_"))  # kept when a run fails (its log is named), else removed
    if True:
        for size in args.sizes:
            model_dir, data = make_inputs(work, size)
            tokens = PROMPTS * SAMPLES * SIZES[size][3]
            runs: dict[str, list[dict]] = {name: [] for name in args.systems}
            for repeat in range(args.repeats):
                for name in args.systems:
                    start = time.perf_counter()
                    if name == "trl":
                        run = trl(work, size, model_dir, data, steps=args.steps, trl_dir=args.trl_dir)
                    else:
                        variant = {"ours": "grpo", "ours-hf": "grpo-hf", "ours-hapo": "hapo"}[name]
                        extra = args.ours_override
                        run = ours(work, size, model_dir, data, steps=args.steps, variant=variant, extra=extra)
                    runs[name].append(run)
                    took = time.perf_counter() - start
                    print(f"{size} {name} run {repeat + 1}: steps {[round(s, 2) for s in run['step']]} ({took:.0f} s)")
            summary[size] = {name: summarise(values, tokens) for name, values in runs.items()}
            print_table(size, summary[size])
    shutil.rmtree(work)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))


def print_table(size: str, systems: dict[str, dict]) -> None:
    names = list(systems)
    rows = [
        ("step s, min / median", lambda s: f"{s['step_min']:.2f} / {s['step_median']:.2f}"),
        ("generation s (incl. reward)", lambda s: f"{s['generation']:.2f}"),
        ("forward-only old log-probs s", lambda s: f"{s['old_log_prob']:.2f}" if "old_log_prob" in s else "-"),
        ("update s", lambda s: f"{s['update']:.2f}"),
        ("weight sync s", lambda s: f"{s['sync']:.2f}" if "sync" in s else "-"),
        ("generated tokens / s", lambda s: f"{s['tokens_per_s']:.0f}"),
        ("grad norm, median", lambda s: f"{s['grad_norm_median']:.3g}"),
        ("peak RSS of the process tree GiB", lambda s: f"{s['peak_gib']:.2f}"),
    ]
    print(f"\n{size}: | per RL step | {' | '.join(names)} |")
    print(f"|---|{'---|' * len(names)}")
    for label, cell in rows:
        print(f"| {label} | {' | '.join(cell(systems[n]) for n in names)} |")
    if "trl" in systems and "ours" in systems:
        ratio = systems["trl"]["step_median"] / systems["ours"]["step_median"]
        print(f"TRL step / our step (medians): {ratio:.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--trl-worker":
        trl_worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
