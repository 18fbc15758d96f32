"""A failing launch test shows the trainer's own lines of a rank log (tests/dist/run_logs.py), not the libraries'."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "dist"))
from run_logs import run_report, trainer_lines

RANK_LOG = """\
/work/main/megatron_hapo/train.py:206: ConfigWarning: algo.reward_shaping.buffer_length=2 has no effect
  config = load_config(args.config, args.overrides)
2026-12-07 10:59:01,175 megatron_hapo.train [rank 0]: /runs/train.jsonl: 12 prompts, 0 malformed rows skipped
(MainProcess pid=8826) INFO 12-07 10:58:53 [api_utils.py:286] non-default args: {'skip_tokenizer_init': True}
(MainProcess pid=8826) WARNING 12-07 10:53:14 [base.py:380] Traceback (most recent call last):
(MainProcess pid=8826) WARNING 12-07 10:53:14 [base.py:380]   File "vllm/renderers/base.py", line 373, in warmup
[rank0]:[W1207 10:53:12.820207834 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy
2026-12-07 10:59:01,175 megatron_hapo.trainer.loop [rank 0]: step 0 (1/16) reward -1.000 acc 0.000 len 6.0 time 4.0s
(MainProcess pid=8826) INFO 12-07 10:59:02 [inplace.py:113] Reloading and processing weights took 0.03 seconds
2026-12-07 10:59:29,390 megatron_hapo.processes [rank 0]: signal 10: finishing this step, then checkpointing
Traceback (most recent call last):
  File "megatron_hapo/train.py", line 250, in <module>
    exit_after_cleanup(main())
RuntimeError: a collective timed out

Fatal Python error: Segmentation fault
Current thread 0x00007f (most recent call first):
  File "torch/distributed/distributed_c10d.py", line 10 in destroy_process_group
(MainProcess pid=8826) INFO 12-07 10:59:40 [core.py:1] shutting down
"""


def test_trainer_lines_keep_steps_stops_and_tracebacks_only() -> None:
    lines = trainer_lines(RANK_LOG)
    assert [line.split(": ", 1)[1][:12] for line in lines[:3]] == ["/runs/train.", "step 0 (1/16", "signal 10: f"]
    assert lines[3:7] == RANK_LOG.splitlines()[10:14]  # the traceback whole, to its exception line
    assert "Fatal Python error: Segmentation fault" in lines and "destroy_process_group" in lines[-1]
    assert not [line for line in lines if "MainProcess" in line or "Warning" in line or "[rank0]:[W" in line]
    assert trainer_lines(RANK_LOG, last=2) == lines[-2:]


def test_run_report_names_each_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "7.0" / "rank-0.log"
    log.parent.mkdir(parents=True)
    log.write_text(RANK_LOG)
    report = run_report(tmp_path, "[launch] tiny: a -> b (attempt 0)\nsrun: error: task 1 exited\nnoise\n")
    assert "[launch] tiny" in report and "srun: error: task 1" in report and "noise" not in report
    assert str(log) in report and "step 0 (1/16)" in report and "non-default args" not in report
