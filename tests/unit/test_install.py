"""The environment the README's commands build: pinned stack present, setup idempotent."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def test_pinned_stack_imports():
    import megatron.core
    from megatron.core import parallel_state  # noqa: F401  (pulls in triton via pipeline_parallel)

    assert importlib.metadata.version("megatron-core") == "0.19.2"
    assert megatron.core.__version__.startswith("0.19.2")
    assert torch.__version__.startswith("2.")
    assert sys.version_info >= (3, 11)


def test_second_setup_installs_nothing():
    done = subprocess.run(["bash", str(REPO / "scripts/setup_venv.sh")], capture_output=True, text=True, check=True)
    assert "is up to date (nothing to install)" in done.stdout
    assert "installing" not in done.stdout


def test_a_non_editable_install_finds_its_configs_through_the_package(tmp_path):
    """The presets and run configs ship inside the wheel; the demos find them in an installed copy, away from
    any checkout."""
    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    # a copy of the sources: building in place would leave build/ and egg-info in the checkout
    source = tmp_path / "source"
    archive = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in archive.decode().split("\0"):
        if name and (REPO / name).is_file() and not (REPO / name).is_symlink():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir), str(source)], check=True)
    wheel = next(wheel_dir.glob("megatron_hapo-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True)
    probe = (
        "import sys; sys.path.insert(0, sys.argv[1]);"
        "from megatron_hapo.config import load_config;"
        "from megatron_hapo.config.presets import CONFIG_ROOT, preset_path;"
        "assert CONFIG_ROOT.is_relative_to(sys.argv[1]), CONFIG_ROOT;"
        "assert load_config(preset_path('hapo')).algo.advantage.kind == 'hapo_token';"
        "assert (CONFIG_ROOT / 'runs' / '_hapo_common.yaml').is_file(); print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(site)], capture_output=True, text=True, cwd=tmp_path)
    assert done.stdout.strip() == "ok", done.stderr
