"""The rollout dumps' pieces and the viewer's reading of them, without a run (the whole path runs in
tests/dist/test_rollout_dump.py and tests/dist/test_inspect_rollouts.py)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def test_selection_takes_whole_kept_groups_by_seed() -> None:
    from megatron_hapo.trainer.rollout_dump import select_rows

    keep = torch.tensor([True] * 4 + [False] * 4 + [True] * 8)  # groups 0, 2, 3 of 4 samples kept
    rows = select_rows(keep, 4, samples=8, seed=3)
    assert len(rows) == 8 and torch.equal(rows, rows.sort().values)
    groups = set((rows // 4).tolist())
    assert len(groups) == 2 and 1 not in groups  # whole groups, never a dropped one
    assert torch.equal(rows.view(2, 4) % 4, torch.arange(4).expand(2, 4))
    assert torch.equal(select_rows(keep, 4, samples=8, seed=3), rows)  # the same on every rank
    assert len({tuple(select_rows(keep, 4, samples=4, seed=s).tolist()) for s in range(20)}) == 3  # seed chooses
    assert len(select_rows(keep, 4, samples=100, seed=0)) == 12  # at most what was kept
    assert len(select_rows(keep, 4, samples=1, seed=0)) == 4  # at least one group


def test_float_lists_read_back_exactly() -> None:
    from megatron_hapo.trainer.dump_files import float_list

    values = torch.randn(1000) * torch.logspace(-6, 6, 1000)
    values[3], values[4] = float("nan"), float("inf")
    parsed = json.loads(float_list(values.numpy()))
    assert parsed[3] is None and parsed[4] is None
    finite = torch.ones(1000, dtype=torch.bool)
    finite[3:5] = False
    back = torch.tensor([0.0 if v is None else v for v in parsed], dtype=torch.float32)
    assert torch.equal(back[finite], values[finite])  # float32 exactly, from their shortest text


def _record(step: int = 0) -> object:
    from megatron_hapo.trainer.rollout_dump import DumpRecord

    head = {"step": step, "group": 0, "sample": 0, "reward": 1.0, "correct": True, "answer": object()}
    head |= {"prompt_ids": [1, 2], "response_ids": [3, 4, 5], "finish_reason": "stop"}
    return DumpRecord(head, {"entropy": torch.tensor([0.5, 1.5, 2.5]), "loss_mask": torch.ones(3)})


def test_a_failed_write_is_counted_not_raised(tmp_path: Path) -> None:
    from megatron_hapo.trainer.rollout_dump import DumpWriter, dump_path

    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    writer = DumpWriter()
    writer.submit(dump_path(blocker, 0), [_record()])  # its folder cannot be made
    writer.submit(dump_path(tmp_path / "good", 1), [_record(1)])
    writer.close()
    assert writer.errors == 1 and writer.written == [dump_path(tmp_path / "good", 1)]
    with gzip.open(writer.written[0], "rt") as lines:
        row = json.loads(lines.read())
    assert row["values"]["entropy"] == [0.5, 1.5, 2.5] and row["answer"].startswith("<object")


def _write_dump(run: Path, step: int, rows: list[dict], extra_lines: tuple[str, ...] = ()) -> None:
    folder = run / "rollouts"
    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(folder / f"step_{step:06d}.jsonl.gz", "wt") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")
        for line in extra_lines:
            out.write(line + "\n")


def _row(group: int, sample: int, entropy: list[float], tokens: list[str], correct: bool = True) -> dict:
    n = len(entropy)
    values = {"entropy": entropy, "temperature": [1.0] * n, "advantage": [0.5] * n, "loss_mask": [1.0] * n}
    return {
        "step": 0,
        "group": group,
        "sample": sample,
        "reward": 1.0 if correct else -1.0,
        "correct": correct,
        "response_ids": list(range(n)),
        "tokens": tokens,
        "values": values,
    }


def test_reading_counts_bad_lines_and_finds_forking_tokens(tmp_path: Path) -> None:
    from megatron_hapo.viewer.dumps import forking_tokens, read_dump, saved_steps, summary

    rows = [
        _row(0, 0, [0.1, 3.0, 0.2, 2.9], ["a", "wait", "b", "so"]),
        _row(0, 1, [0.1, 3.1, 0.1, 0.3], ["a", "wait", "c", "d"], correct=False),
    ]
    _write_dump(tmp_path, 4, rows, extra_lines=("{not json", json.dumps({"step": 4})))
    dump = read_dump(saved_steps(tmp_path)[4], "run")
    assert dump.step == 4 and len(dump.responses) == 2 and dump.skipped == 2
    forking = forking_tokens(dump, top_share=0.25)
    assert forking[0] == {"token": "wait", "count": 2, "share": 1.0, "mean_entropy": pytest.approx(3.05)}
    row = summary(dump)
    assert row["accuracy"] == 0.5 and row["length"] == 4 and row["skipped_lines"] == 2
    assert row["entropy"] == pytest.approx(sum([0.1, 3.0, 0.2, 2.9, 0.1, 3.1, 0.1, 0.3]) / 8)


def test_the_tool_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("inspect_rollouts", REPO / "tools" / "inspect_rollouts.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "empty").mkdir()
    assert tool.main([str(tmp_path / "empty")]) == 2
    assert "no rollout dumps; train with output.save_rollouts_every=N" in capsys.readouterr().err
    _write_dump(tmp_path / "run", 3, [_row(0, 0, [1.0], ["x"])])
    assert tool.main([str(tmp_path / "run"), "--step", "5"]) == 2
    assert "step 5 was not saved; saved steps: [3]" in capsys.readouterr().err
    assert (
        tool.main([str(tmp_path / "run"), "--out", str(tmp_path / "run" / "rollouts" / "step_000003.jsonl.gz" / "p")])
        == 2
    )
    assert "cannot write the page" in capsys.readouterr().err
    out = tmp_path / "page.html"
    assert tool.main([str(tmp_path / "run"), "--out", str(out)]) == 0
    page = out.read_text()
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing fetched
    assert "<script src" not in page and "</script>" not in page.split("id='data'>")[1].split("</script>")[0]


def test_config_keys_are_checked() -> None:
    from megatron_hapo.config import ConfigError, load_config

    config = load_config(REPO / "configs" / "algo" / "hapo.yaml", ["output.save_rollouts_every=5"], warn=False)
    assert config.output.save_rollouts_every == 5 and config.output.save_rollouts_samples == 32
    with pytest.raises(ConfigError, match="output.save_rollouts_samples"):
        load_config(REPO / "configs" / "algo" / "hapo.yaml", ["output.save_rollouts_samples=0"], warn=False)
    with pytest.raises(ConfigError, match="output.save_rollouts_every"):
        load_config(REPO / "configs" / "algo" / "hapo.yaml", ["output.save_rollouts_every=-1"], warn=False)


def test_the_writer_process_does_not_outlive_its_run(tmp_path: Path) -> None:
    """A run killed outright (SIGKILL: no clean-up runs) leaves no writer process behind: it sees its parent gone."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import sys, time\n"
        "from megatron_hapo.trainer.rollout_dump import DumpWriter\n"
        "writer = DumpWriter()\n"
        "print(writer._process.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    run = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert run.stdout is not None
    child = int(run.stdout.readline())
    os.kill(child, 0)  # running
    run.send_signal(signal.SIGKILL)
    run.wait()
    deadline = time.monotonic() + 120  # the writer polls its parent every second
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        with open(f"/proc/{child}/stat") as stat:  # a zombie (exited, not yet reaped by its forkserver) is gone
            if stat.read().split(")")[-1].split()[0] == "Z":
                return
        time.sleep(0.2)
    raise AssertionError(f"the writer process {child} outlived its run")


class BlockingTokenizer:
    """Decodes once ``release`` exists, after marking ``started`` (a writer busy for as long as the test wants)."""

    def __init__(self, folder: Path) -> None:
        self.started, self.release = folder / "started", folder / "release"

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        import time

        self.started.touch()
        while not self.release.exists():
            time.sleep(0.02)
        return " ".join(map(str, ids))

    def batch_decode(self, batch: list[list[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids) for ids in batch]


def _wait_for(path: Path) -> None:
    import time

    deadline = time.monotonic() + 120
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_busy_writer_drops_a_dump_instead_of_holding_the_step(tmp_path: Path) -> None:
    from megatron_hapo.trainer.rollout_dump import DumpWriter, dump_path

    tokenizer = BlockingTokenizer(tmp_path)
    writer = DumpWriter(tokenizer, depth=1)
    writer.submit(dump_path(tmp_path / "run", 0), [_record(0)])
    _wait_for(tokenizer.started)  # the writer holds step 0
    writer.submit(dump_path(tmp_path / "run", 1), [_record(1)])  # queued
    writer.submit(dump_path(tmp_path / "run", 2), [_record(2)])  # the queue is full: dropped, no wait
    assert writer.errors == 1
    tokenizer.release.touch()
    writer.close()
    assert writer.written == [dump_path(tmp_path / "run", 0), dump_path(tmp_path / "run", 1)] and writer.errors == 1


def test_a_hung_writer_is_killed_at_the_end_of_the_run(tmp_path: Path) -> None:
    from megatron_hapo.trainer.rollout_dump import DumpWriter, dump_path

    tokenizer = BlockingTokenizer(tmp_path)  # never released: a hung file system
    writer = DumpWriter(tokenizer)
    writer.submit(dump_path(tmp_path / "run", 0), [_record(0)])
    _wait_for(tokenizer.started)
    writer.submit(dump_path(tmp_path / "run", 1), [_record(1)])  # queued behind it
    writer.close(timeout_s=1.0)
    assert not writer._process.is_alive() and writer.errors == 2 and writer.written == []  # both lost, counted
    assert not dump_path(tmp_path / "run", 0).exists()


def test_a_dead_writer_drops_dumps_and_the_run_still_exits(tmp_path: Path) -> None:
    """The writer killed mid-run (the OOM killer): later dumps are dropped and counted, and the process that
    started it exits even without closing it (nothing waits on a pipe nobody reads)."""
    import subprocess
    import sys

    script = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import torch
from test_rollout_viewer import BlockingTokenizer, _record, _wait_for
from megatron_hapo.trainer.rollout_dump import DumpWriter, dump_path
folder = Path({str(tmp_path)!r})
tokenizer = BlockingTokenizer(folder)
writer = DumpWriter(tokenizer)
writer.submit(dump_path(folder / "run", 0), [_record(0)])
_wait_for(tokenizer.started)
big = _record(1)
big.values["entropy"] = torch.randn(1_000_000)  # 4 MB: the queue's feeder thread blocks on the full pipe
writer.submit(dump_path(folder / "run", 1), [big])
writer._process.kill()
writer._process.join()
writer.submit(dump_path(folder / "run", 2), [_record(2)])
print("errors", writer.errors, flush=True)
"""  # exits without close(): the finalizer must not wait on the feeder thread stuck on the dead writer's pipe
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "errors 1" in result.stdout
