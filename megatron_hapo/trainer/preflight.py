"""Checks of a run's inputs before any rank starts: each failure is one line that names the key or file and the
fix (``SystemExit``), not a traceback from inside a spawned rank minutes later.

``python -m megatron_hapo.train`` calls :func:`check_inputs` in the parent process (and every Slurm rank in its
own): the model directories (config, tokenizer, a head size the rollout engine takes), the data files (read
whole here, columns and rows checked; the ranks get the rows), and the devices the config asks for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_hapo.config import Config
    from megatron_hapo.data import PromptSet

#: Head sizes vLLM's CPU attention backend takes (vLLM 0.32,
#: ``vllm/v1/attention/backends/cpu_attn.py``, ``CPUAttentionBackend.get_supported_head_sizes``; a unit test
#: compares the two).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: Any of these makes a directory's tokenizer loadable by ``AutoTokenizer``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass(frozen=True)
class RunData:
    """The rows of the run's prompt files, read and checked once before the ranks start."""

    train: PromptSet
    eval: PromptSet | None


def head_dim(config: dict) -> int:
    """The attention head size of an HF ``config.json`` (``head_dim``, else hidden size / heads)."""
    text = config.get("text_config", config)  # multimodal wrappers keep the decoder's under text_config
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def check_model_dir(path: str | None, key: str, *, vllm_on_cpu: bool) -> None:
    """Refuse a model directory the run cannot use: not an HF directory (a Megatron checkpoint named, with the
    fix), no tokenizer, or a head size vLLM's CPU engine refuses (when that engine will load it)."""
    if not path or not Path(path).is_dir():
        raise SystemExit(f"{key}={path!r}: no such directory (an HF model directory: config.json, weights, tokenizer)")
    model = Path(path)
    if not (model / "config.json").is_file():
        if (model / ".metadata").is_file() or (model / "hf").is_dir() or (model / "latest").is_file():
            raise SystemExit(
                f"{key}={path!r} is a Megatron checkpoint, not an HF model directory: export it with "
                f"tools/convert_mcore_to_hf.py --ckpt {path} --out DIR and pass DIR"
            )
        raise SystemExit(f"{key}={path!r}: not an HF model directory (config.json missing)")
    if not any((model / name).is_file() for name in TOKENIZER_FILES):
        raise SystemExit(
            f"{key}={path!r}: no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the model it "
            "came from into it (tools/make_tiny_model.py writes one for its models)"
        )
    try:
        size = head_dim(json.loads((model / "config.json").read_text()))
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise SystemExit(f"{model / 'config.json'}: unreadable model config ({type(exc).__name__}: {exc})") from None
    if vllm_on_cpu and size not in VLLM_CPU_HEAD_SIZES:
        raise SystemExit(
            f"{key}={path!r}: head size {size} is not one vLLM's CPU engine takes {VLLM_CPU_HEAD_SIZES}; use "
            "engine.kind=hf, or a model with another head size (tools/make_tiny_model.py makes one of 32)"
        )


def read_data(config: Config) -> RunData:
    """Read ``data.train_file`` and ``data.eval_file`` with the run's keys and ``bad_rows`` rule; a missing file,
    column or bad row is one line naming the file, row and key (:class:`~megatron_hapo.data.DataError`)."""
    from megatron_hapo.data import DataError, read_prompts  # noqa: PLC0415

    data = config.data
    if not data.train_file:
        raise SystemExit("data.train_file is not set: a .parquet or .jsonl prompt file")
    sets: dict[str, PromptSet | None] = {}
    for key in ("train_file", "eval_file"):
        path = getattr(data, key)
        if not path:
            sets[key] = None
            continue
        if not Path(path).is_file():
            raise SystemExit(f"data.{key}={path!r}: no such file")
        try:
            sets[key] = read_prompts(
                path, prompt_key=data.prompt_key, answer_key=data.answer_key, bad_rows=data.bad_rows
            )
        except DataError as exc:
            raise SystemExit(
                f"data.{key}: {exc} (keys: data.prompt_key={data.prompt_key!r}, data.answer_key={data.answer_key!r})"
            ) from None
    train = sets["train_file"]
    assert train is not None
    return RunData(train=train, eval=sets["eval_file"])


def check_inputs(config: Config) -> RunData:
    """Every check above for ``config``, and the devices it asks for; the data rows for the ranks."""
    import torch  # noqa: PLC0415  (late: the stop signals are blocked before anything heavy loads)

    on_cpu = not torch.cuda.is_available()
    if (config.model.transformer_engine or config.model.fp8) and on_cpu:
        raise SystemExit(
            "model.transformer_engine / model.fp8 need a CUDA GPU with Transformer Engine; on CPU set "
            "model.transformer_engine=false model.fp8=null"
        )
    vllm_on_cpu = on_cpu and config.engine.kind == "vllm"
    check_model_dir(config.model.path, "model.path", vllm_on_cpu=vllm_on_cpu)
    guide = config.algo.guide_policy
    if guide.kind != "none":  # the guide's engine is of the same kind
        check_model_dir(guide.model_path, "algo.guide_policy.model_path", vllm_on_cpu=vllm_on_cpu)
    return read_data(config)
