"""The CPU quickstart's Megatron stage: a tiny TP2 GPT learns the toy task with HAPO (real schedules, gloo)."""

import subprocess
import sys


def test_hapo_on_tensor_parallel_megatron_gpt_learns(repo_root):
    result = subprocess.run(
        [sys.executable, "-m", "megatron_hapo.megatron_selfcheck", "--tp", "2", "--steps", "40"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "megatron self-check passed" in result.stdout
