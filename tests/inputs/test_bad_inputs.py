"""The bad-input suite (a start: issue 29): each bad config, override, data file, model directory or launch
environment gives a clear error that names the file, key or row (or, with ``bad_rows=skip``, a counted skip),
no traceback, and no file outside the test's directory. In process where the entry point allows it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from megatron_hapo.config import ConfigError, load_config
from megatron_hapo.data import DataError, read_prompts

REPO = Path(__file__).resolve().parents[2]
HAPO = REPO / "configs" / "algo" / "hapo.yaml"


def _file(tmp: Path, name: str, content: bytes | str) -> Path:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _config(tmp: Path, content: bytes | str, *overrides: str) -> None:
    load_config(_file(tmp, "c.yaml", content), list(overrides))


#: (case, what it does, what the error must say).
CONFIG_CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("config not UTF-8", lambda t: _config(t, b"algo: {clip: {eps_high: \xff}}\n"), "c.yaml: not UTF-8 text"),
    ("config invalid YAML", lambda t: _config(t, "algo: [\n"), "c.yaml: invalid YAML"),
    ("config top level a list", lambda t: _config(t, "- a\n"), "the top level must be a mapping"),
    ("config unknown key", lambda t: _config(t, "optim: {lrr: 1}\n"), "unknown config key 'optim.lrr'"),
    ("config wrong type", lambda t: _config(t, "train: {total_steps: many}\n"), "train.total_steps: expected int"),
    ("config NaN in a file", lambda t: _config(t, "optim: {lr: .nan}\n"), "optim.lr: nan is not a finite number"),
    ("override NaN", lambda t: load_config(HAPO, ["optim.lr=.nan"]), "optim.lr: nan is not a finite number"),
    ("override inf", lambda t: load_config(HAPO, ["output.reward_timeout_s=.inf"]), "reward_timeout_s: inf is not"),
    ("override without =", lambda t: load_config(HAPO, ["optim.lr"]), "is not of the form dotted.key=value"),
    ("override into a value", lambda t: load_config(HAPO, ["optim.lr.x=1"]), "optim.lr: expected float, got dict"),
    ("renamed key", lambda t: load_config(HAPO, ["output.eval_k=4"]), "now 'output.eval.n'"),
    ("base cycle", lambda t: _config(t, "base: c.yaml\n"), "form a cycle"),
    ("missing base", lambda t: _config(t, "base: nowhere.yaml\n"), "nowhere.yaml does not exist"),
    (
        "eval set template",
        lambda t: load_config(HAPO, ["data.eval_sets.a.file=x", "data.eval_sets.a.template=x"]),
        "data.eval_sets.a.template='x'",
    ),
    ("eval set named mean", lambda t: load_config(HAPO, ["data.eval_sets.mean=x"]), "data.eval_sets.mean"),
    ("eval k above n", lambda t: load_config(HAPO, ["output.eval.k=[16]"]), "output.eval.k[0]=16 is out of range"),
    ("YAML tag", lambda t: _config(t, "optim: !!python/object/apply:os.system [ls]\n"), "c.yaml: invalid YAML"),
]


@pytest.mark.parametrize(("case", "run", "says"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(case: str, run: Callable[[Path], object], says: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        run(tmp_path)
    assert says in str(caught.value), (case, str(caught.value))
    assert "Traceback" not in str(caught.value)


#: (case, file name, content, the error (bad_rows=error), skipped rows (bad_rows=skip) or None: no usable row).
DATA_CASES = [
    ("zero-byte parquet", "d.parquet", b"", "not a readable parquet file", None),
    ("parquet of text", "d.parquet", b"not parquet at all", "not a readable parquet file", None),
    ("unsupported type", "d.csv", "a,b\n", "unsupported prompt file type '.csv'", None),
    ("empty jsonl", "d.jsonl", "\n\n", "no usable prompt rows", None),
    (
        "line not UTF-8",
        "d.jsonl",
        b'{"prompt": "\xff", "reward_model": {"ground_truth": "1"}}\n',
        "line 1: not UTF-8",
        1,
    ),
    ("invalid JSON", "d.jsonl", '{"prompt": \n', "line 1: invalid JSON", 1),
    ("nested too deeply", "d.jsonl", "[" * 100000 + "]" * 100000 + "\n", "line 1: JSON nested too deeply", 1),
    ("answer missing", "d.jsonl", '{"prompt": "q"}\n', "line 1: missing key 'reward_model.ground_truth'", 1),
    (
        "answer a mapping",
        "d.jsonl",
        '{"prompt": "q", "reward_model": {"ground_truth": {"a": 1}}}\n',
        "must be a string",
        1,
    ),
    ("prompt an empty list", "d.jsonl", '{"prompt": [], "reward_model": {"ground_truth": "1"}}\n', "non-empty list", 1),
    (
        "message without content",
        "d.jsonl",
        '{"prompt": [{"role": "user"}], "reward_model": {"ground_truth": "1"}}\n',
        "a chat message lacks 'content'",
        1,
    ),
]
GOOD_ROW = json.dumps({"prompt": "What is 1 + 1 ?", "reward_model": {"ground_truth": "2"}}) + "\n"


@pytest.mark.parametrize(("case", "name", "content", "says", "skips"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(case: str, name: str, content: bytes | str, says: str, skips: int | None, tmp_path: Path) -> None:
    path = _file(tmp_path, name, content)
    with pytest.raises(DataError) as caught:
        read_prompts(path)
    assert str(path) in str(caught.value) and says in str(caught.value), (case, str(caught.value))
    if skips is not None:  # bad_rows=skip: the row is skipped and counted, the good rows read
        raw = content if isinstance(content, bytes) else content.encode()
        mixed = _file(tmp_path, "mixed.jsonl", raw + GOOD_ROW.encode())
        read = read_prompts(mixed, bad_rows="skip")
        assert len(read.examples) == 1 and len(read.skipped) == skips, (case, read.skipped)


LAUNCH_CASES = [
    ("GPUS_PER_NODE with a GPU type", {"GPUS_PER_NODE": "h100:8"}, "GPUS_PER_NODE='h100:8': a whole number"),
    ("GPUS_PER_NODE running a command", {"GPUS_PER_NODE": "a[$(touch pwned)]"}, "GPUS_PER_NODE='a[$(touch pwned)]'"),
    ("NNODES zero", {"NNODES": "0"}, "NNODES='0': a whole number"),
    ("MASTER_PORT text", {"MASTER_PORT": "http"}, "MASTER_PORT='http': a whole number"),
]


@pytest.mark.parametrize(("case", "env", "says"), LAUNCH_CASES, ids=[c[0] for c in LAUNCH_CASES])
def test_bad_launch_environment(case: str, env: dict[str, str], says: str, tmp_path: Path) -> None:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}, "RUN_ROOT": str(tmp_path / "runs")}
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "local.sh"), str(HAPO)],
        cwd=tmp_path,
        env={**full, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and says in done.stderr, (case, done.stderr)
    assert list(tmp_path.iterdir()) == [], list(tmp_path.iterdir())  # nothing created, nothing run


def _inputs(**overrides: str) -> None:
    from megatron_hapo.trainer.preflight import check_inputs

    check_inputs(load_config(HAPO, [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]))


def test_bad_model_directories_and_missing_packages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (lambda: _inputs(model__path=str(tmp_path / "nowhere")), "no such directory"),
        (lambda: _inputs(model__path=str(empty)), "config.json missing"),
        (lambda: _inputs(model__path="null"), "model.path=None: no such directory"),
    ]
    for run, says in cases:
        with pytest.raises(SystemExit) as caught:
            run()
        assert says in str(caught.value) and "\n" not in str(caught.value), str(caught.value)
    found = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else found(name, *a)
    )
    with pytest.raises(SystemExit, match="data.math_verify=true: the math-verify package is not installed"):
        _inputs(data__math_verify="true")


def _verify(response: str, answer: str) -> tuple[float, bool]:
    """A verifier that raises on one answer: a broken reward function."""
    if answer == "boom":
        raise ValueError("cannot parse the answer 'boom'")
    return (1.0, True) if response == answer else (-1.0, False)


def test_a_failing_verifier_is_counted_and_stops_the_run_past_its_share() -> None:
    from megatron_hapo.rewards import RewardWorkers
    from megatron_hapo.trainer.scoring import reward_failures, worker_scorer

    workers = RewardWorkers(_verify, workers=1, timeout_s=30.0, failure_value=(-1.0, False))
    try:
        score = worker_scorer(workers, decode=lambda ids: [" ".join(map(str, i)) for i in ids])
        rewards, _ = score([[1], [2], [3], [4]], ["1", "boom", "3", "9"])
        assert rewards.tolist() == [1.0, -1.0, 1.0, -1.0]
        assert reward_failures(score, limit=0.5) == {
            "reward_errors": 1.0,
            "reward_timeouts": 0.0,
            "reward_crashes": 0.0,
        }
        score([[1], [2]], ["boom", "boom"])
        with pytest.raises(RuntimeError, match=r"2 of 2 answers .* first: error: ValueError: cannot parse the answer"):
            reward_failures(score, limit=0.5)
    finally:
        workers.close()


def test_math_verify_scores_equal_answers_written_differently() -> None:
    """After the set-up (math-verify installed), `data.math_verify=true` is no silent -1."""
    from megatron_hapo.rewards.math_answer import math_reward

    assert math_reward("Answer: \\frac{1}{2}", "1/2", math_verify=True) == (1.0, True)
    assert math_reward("Answer: \\frac{1}{2}", "1/2", math_verify=False) == (-1.0, False)


def _failing_rank(rank: int, world: int) -> None:
    raise ValueError(f"rank {rank} cannot go on:\nsecond line")


def test_a_failing_rank_is_one_line_with_the_traceback_in_the_log(tmp_path: Path) -> None:
    from megatron_hapo.parallel.local_launch import RankFailedError, run_local_ranks

    log = tmp_path / "run" / "rank_error.log"
    with pytest.raises(RankFailedError) as caught:
        run_local_ranks(_failing_rank, 1, device="cpu", rendezvous_dir=tmp_path, error_log=log)
    message = str(caught.value)
    assert message.startswith("rank 0 failed: ValueError: rank 0 cannot go on:") and "\n" not in message, message
    assert f"(traceback: {log})" in message and "Traceback" in log.read_text()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "hf"
    done = subprocess.run(
        [sys.executable, "tools/make_tiny_model.py", "--hidden", "64", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return out


def _broken_copy(model: Path, tmp: Path, breaks: str) -> Path:
    import shutil

    broken = tmp / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    if breaks == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif breaks == "missing shard":
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
        (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    elif breaks == "config":
        (broken / "config.json").write_text("{not json")
    elif breaks == "hidden size":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "hidden_size": 128, "num_attention_heads": 4}))
    elif breaks == "layers":
        config = json.loads((broken / "config.json").read_text())
        (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    elif breaks == "header":
        weights.write_bytes(b"\x0e\x00\x00\x00\x00\x00\x00\x00not a json hdr")
    return broken


@pytest.mark.parametrize(
    ("breaks", "says"),
    [
        ("truncated", "model.safetensors: truncated"),
        ("missing shard", "names 1 missing shard(s): model-00002-of-00002.safetensors"),
        ("config", "config.json: unreadable model config"),
        ("header", "model.safetensors: unreadable safetensors header"),
        ("hidden size", "vocabulary x hidden 256 x 128, but model.embed_tokens.weight is 256 x 64"),
        ("layers", "config.json says 3 layers, the weights hold 2"),
    ],
)
def test_bad_hf_directories_for_conversion_and_training(
    breaks: str, says: str, tiny_model: Path, tmp_path: Path
) -> None:
    import sys

    broken = _broken_copy(tiny_model, tmp_path, breaks)
    for args in (
        ["tools/convert_hf_to_mcore.py", "--hf-dir", str(broken), "--out", str(tmp_path / "out")],
        [
            "-m",
            "megatron_hapo.train",
            str(HAPO),
            f"model.path={broken}",
            f"output.dir={tmp_path / 'run'}",
            "data.train_file=megatron_hapo/examples/arithmetic/train.jsonl",
        ],
    ):
        done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)
        last = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr and says in last, (args[0], done.stderr[-2000:])
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_conversion_back_names_what_it_needs(tiny_model: Path, tmp_path: Path) -> None:
    import sys

    run = tmp_path / "run" / "checkpoints"
    (run / "step_000002").mkdir(parents=True)
    (tmp_path / "exists").mkdir()
    cases = [
        (["--ckpt", str(run), "--out", str(tmp_path / "o")], "a directory of checkpoints; pass one of them"),
        (["--ckpt", str(tiny_model), "--out", str(tmp_path / "o")], "not a Megatron checkpoint (.metadata missing)"),
    ]
    for args, says in cases:
        done = subprocess.run(
            [sys.executable, "tools/convert_mcore_to_hf.py", *args], cwd=REPO, capture_output=True, text=True
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
        assert says in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def _viewer_run(tmp: Path, name: str, lines: list[str] | None = None, raw: bytes | None = None) -> Path:
    """A run directory with one dump at step 0 (``lines``, gzip'd, or ``raw`` bytes as the file)."""
    import gzip

    folder = tmp / name / "rollouts"
    folder.mkdir(parents=True)
    path = folder / "step_000000.jsonl.gz"
    path.write_bytes(raw if raw is not None else gzip.compress("".join(f"{line}\n" for line in lines or []).encode()))
    return tmp / name


_ROW = json.dumps({"step": 0, "group": 0, "sample": 0, "reward": 1, "correct": True, "response_ids": [5], "values": {}})
#: (case, arguments after the tool given the test directory, what stderr must say; None: it succeeds).
VIEWER_CASES: list[tuple[str, Callable[[Path], list[str]], str | None]] = [
    ("viewer: no run directory", lambda t: [str(t / "nowhere")], "nowhere: no such run directory"),
    ("viewer: no dumps", lambda t: [str(_viewer_run(t, "r").parent / "r" / "rollouts")], "no rollout dumps"),
    ("viewer: step not saved", lambda t: [str(_viewer_run(t, "r", [_ROW])), "--step", "3"], "step 3 was not saved"),
    (
        "viewer: truncated dump",
        lambda t: [str(_viewer_run(t, "r", raw=__import__("gzip").compress(_ROW.encode() * 50)[:40]))],
        "step_000000.jsonl.gz: cannot read the dump",
    ),
    ("viewer: a bad line is skipped and counted", lambda t: [str(_viewer_run(t, "r", [_ROW, "{oops"]))], None),
    (
        "viewer: compared run lacks the step",
        lambda t: [str(_viewer_run(t, "a", [_ROW])), "--compare", str(_viewer_run(t, "b", [_ROW]).parent / "a2")],
        "a2: no such run directory",
    ),
]


@pytest.mark.parametrize(("case", "args", "says"), VIEWER_CASES, ids=[c[0] for c in VIEWER_CASES])
def test_bad_rollout_dumps(case: str, args: Callable[[Path], list[str]], says: str | None, tmp_path: Path) -> None:
    command = [sys.executable, "tools/inspect_rollouts.py", *args(tmp_path), "--out", str(tmp_path / "page.html")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    if says is None:
        assert result.returncode == 0, result.stderr
        assert '"skipped_lines": 1' in (tmp_path / "page.html").read_text()
        return
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0], result.stderr
