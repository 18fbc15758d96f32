"""Checks of a run's inputs before any rank starts: each failure is one line that names the key or file and the
fix (``SystemExit``), not a traceback from inside a spawned rank minutes later.

``python -m megatron_hapo.train`` calls :func:`check_inputs` in the parent process (and every Slurm rank in its
own): the model directories (config, tokenizer, a head size the rollout engine takes), the data files (read
whole here, columns and rows checked; the ranks get the rows), and the devices the config asks for.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megatron_hapo.config import Config
    from megatron_hapo.config.run import EvalSetConfig
    from megatron_hapo.data import PromptExample, PromptSet

#: Head sizes vLLM's CPU attention backend takes (vLLM 0.32,
#: ``vllm/v1/attention/backends/cpu_attn.py``, ``CPUAttentionBackend.get_supported_head_sizes``; a unit test
#: compares the two).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: Any of these makes a directory's tokenizer loadable by ``AutoTokenizer``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass(frozen=True)
class EvalData:
    """An evaluation benchmark read and checked: its prompts in its template, its answer rule."""

    name: str
    path: str
    examples: list[PromptExample]
    skipped: int
    """Malformed rows skipped (``data.bad_rows=skip``)."""
    reward: str
    """The answer rule (``dapo_math`` / ``boxed_math``)."""


@dataclass(frozen=True)
class RunData:
    """The rows of the run's prompt files, read and checked once before the ranks start."""

    train: PromptSet
    evals: tuple[EvalData, ...] = ()
    resume: Path | None = None
    """The checkpoint to resume from when ``train.resume_from`` applies (:func:`resume_source`); else the run's
    own latest, if any."""


def head_dim(config: dict) -> int:
    """The attention head size of an HF ``config.json`` (``head_dim``, else hidden size / heads)."""
    text = config.get("text_config", config)  # multimodal wrappers keep the decoder's under text_config
    return int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])


def check_model_dir(path: str | None, key: str, *, vllm_on_cpu: bool, tokenizer: bool = True) -> None:
    """Refuse a model directory the run cannot use: not an HF directory (a Megatron checkpoint named, with the
    fix), no tokenizer (unless ``tokenizer`` is off: a conversion), unreadable safetensors (a truncated file, a
    missing shard: named), or a head size vLLM's CPU engine refuses (when that engine will load it)."""
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
    if tokenizer and not any((model / name).is_file() for name in TOKENIZER_FILES):
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
    from megatron_hapo.models.hf_io import check_hf_weights, config_weights_mismatch  # noqa: PLC0415

    problem = check_hf_weights(model) or config_weights_mismatch(model, json.loads((model / "config.json").read_text()))
    if problem is not None:
        raise SystemExit(f"{key}={path!r}: {problem}")


def read_data(config: Config) -> RunData:
    """Read ``data.train_file`` with the run's keys and ``bad_rows`` rule, and the evaluation sets
    (:func:`read_eval_sets`); a missing file, column or bad row is one line naming the file, row and key."""
    from megatron_hapo.data import DataError, read_prompts  # noqa: PLC0415

    data = config.data
    if not data.train_file:
        raise SystemExit("data.train_file is not set: a .parquet or .jsonl prompt file")
    if not Path(data.train_file).is_file():
        raise SystemExit(f"data.train_file={data.train_file!r}: no such file")
    try:
        train = read_prompts(data.train_file, **row_settings(config, data.prompt_key, data.answer_key))
    except DataError as exc:
        raise SystemExit(
            f"data.train_file: {exc} (keys: data.prompt_key={data.prompt_key!r}, data.answer_key={data.answer_key!r})"
        ) from None
    return RunData(train=train, evals=read_eval_sets(config, eval_specs(config)))


def eval_specs(config: Config, extra: dict[str, str] | None = None) -> dict[str, tuple[str, EvalSetConfig]]:
    """The evaluation sets as ``{name: (the key that named it, its settings)}``: ``data.eval_file`` (named after
    its stem), ``data.eval_sets``, then ``extra`` (``--set NAME=FILE`` of the evaluate command; a name given
    again replaces the config's set)."""
    from megatron_hapo.config.run import EvalSetConfig  # noqa: PLC0415

    specs: dict[str, tuple[str, EvalSetConfig]] = {}
    if config.data.eval_file:
        specs[Path(config.data.eval_file).stem] = ("data.eval_file", EvalSetConfig(file=config.data.eval_file))
    for name, spec in config.data.eval_sets.items():
        if name in specs:
            raise SystemExit(f"data.eval_sets.{name}: also the name of data.eval_file's set (its stem); rename one")
        specs[name] = (f"data.eval_sets.{name}", spec)
    for name, path in (extra or {}).items():
        specs[name] = (f"--set {name}", EvalSetConfig(file=path))
    return specs


def row_settings(config: Config, prompt_key: str, answer_key: str) -> dict[str, Any]:
    """How ``read_prompts`` reads a file's rows under ``data.*`` (keys, bad rows, extra keys, the row adapter,
    loaded here: a failure is one line naming ``data.row_adapter``)."""
    from megatron_hapo.plugins import PluginError, load_function  # noqa: PLC0415

    data = config.data
    try:
        adapter = load_function(data.row_adapter, "data.row_adapter") if data.row_adapter else None
    except PluginError as exc:
        raise SystemExit(str(exc)) from None
    return {
        "prompt_key": prompt_key,
        "answer_key": answer_key,
        "bad_rows": data.bad_rows,
        "extra_keys": tuple(data.extra_keys),
        "row_adapter": adapter,
    }


def read_eval_sets(config: Config, specs: dict[str, tuple[str, EvalSetConfig]]) -> tuple[EvalData, ...]:
    """Each set read (columns found: :func:`~megatron_hapo.data.prompts.detect_keys`, unless set), put into its
    template, with its answer rule; a missing file or column is one line naming the key that named the set."""
    from megatron_hapo.data import DataError, read_prompts  # noqa: PLC0415
    from megatron_hapo.data.prompts import TEMPLATE_REWARDS, apply_template, detect_keys  # noqa: PLC0415

    out = []
    for name, (key, spec) in specs.items():
        if not Path(spec.file).is_file():
            raise SystemExit(f"{key}={spec.file!r}: no such file")
        prompt_key, answer_key = detect_keys(spec.file, config.data.prompt_key, config.data.answer_key)
        prompt_key, answer_key = spec.prompt_key or prompt_key, spec.answer_key or answer_key
        try:
            read = read_prompts(spec.file, **row_settings(config, prompt_key, answer_key))
        except DataError as exc:
            raise SystemExit(
                f"{key}: {exc} (keys {prompt_key!r} / {answer_key!r}; name them with data.eval_sets.{name}.prompt_key"
                " / answer_key)"
            ) from None
        reward = spec.reward or TEMPLATE_REWARDS.get(spec.template, config.data.reward)
        examples = apply_template(read.examples, spec.template)
        out.append(EvalData(name, spec.file, examples, len(read.skipped), reward))
    return tuple(out)


def check_inputs(config: Config, *, compare_config: bool = True) -> RunData:
    """Every check here for ``config`` (the devices it asks for, the models, the resume, the data); the data rows
    and the checkpoint to resume from, for the ranks."""
    import torch  # noqa: PLC0415  (late: the stop signals are blocked before anything heavy loads)

    on_cpu = not torch.cuda.is_available()
    if (config.model.transformer_engine or config.model.fp8) and on_cpu:
        raise SystemExit(
            "model.transformer_engine / model.fp8 need a CUDA GPU with Transformer Engine; on CPU set "
            "model.transformer_engine=false model.fp8=null"
        )
    if config.data.math_verify and importlib.util.find_spec("math_verify") is None:
        raise SystemExit(
            "data.math_verify=true: the math-verify package is not installed, so every answer that is not an exact "
            "match would score -1; pip install math-verify (scripts/setup_venv.sh installs it), or set "
            "data.math_verify=false"
        )
    if config.output.wandb_project is not None and importlib.util.find_spec("wandb") is None:
        raise SystemExit(
            f"output.wandb_project={config.output.wandb_project!r}: wandb is not installed; pip install "
            "'megatron_hapo[wandb]' (or pip install wandb), or leave output.wandb_project unset"
        )
    vllm_on_cpu = on_cpu and config.engine.kind == "vllm"
    check_model_dir(config.model.path, "model.path", vllm_on_cpu=vllm_on_cpu)
    guide = config.algo.guide_policy
    if guide.kind != "none":  # the guide's engine is of the same kind
        check_model_dir(guide.model_path, "algo.guide_policy.model_path", vllm_on_cpu=vllm_on_cpu)
    _, resume = resume_source(config, compare_config=compare_config)
    data = read_data(config)
    check_reward_functions(config, data.evals, data.train)
    return RunData(train=data.train, evals=data.evals, resume=resume)


def check_reward_functions(config: Config, evals: Sequence[EvalData], train: PromptSet | None = None) -> None:
    """Each user-named reward function (``data.reward`` with the ``train`` rows, an evaluation set's ``reward``)
    loaded and called once on a probe (an empty response and its file's first answer), before a step is spent
    (the trainer's and the evaluator's start-up): a module that fails to import, a wrong signature, an exception
    or a result that is not a score is one line naming the key."""
    from megatron_hapo.rewards.custom import RewardFunctionError, custom_reward, is_reference  # noqa: PLC0415

    uses = [("data.reward", config.data.reward, train.examples)] if train is not None else []
    uses += [(f"data.eval_sets.{one.name}.reward", one.reward, one.examples) for one in evals]
    for key, rule, examples in uses:
        if not is_reference(rule):
            continue
        answer = examples[0].answer if examples else ""
        try:
            custom_reward("", answer, {}, reference=rule)
        except RewardFunctionError as exc:
            raise SystemExit(f"{key}: {exc}") from None
        except Exception as exc:
            raise SystemExit(
                f"{key}: reward {rule!r} raised {type(exc).__name__}: {exc} on a probe (response '', answer "
                f"{answer!r}); a reward function must score any text, an empty response included"
            ) from None


#: Config keys a resumed run may change (dotted, or a section prefix ending in "."): how long it runs, how often
#: it evaluates, saves and logs, where it writes, and where it starts from. Anything else changes the run.
RESUME_MAY_CHANGE = ("train.total_steps", "train.resume_from", "model.init_from", "output.")
#: ...except these output keys, which change how the saved state is read or what the run computes.
RESUME_MUST_KEEP = ("output.optimizer_sharding",)
#: In a run directory: the ``train.resume_from`` checkpoint this run has already resumed from (once resumed,
#: the same command continues from the run's own latest checkpoint, e.g. after a requeue).
RESUMED_FROM = "resumed_from.txt"


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A config tree as ``{dotted key: value}``."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def _may_change(key: str) -> bool:
    return key not in RESUME_MUST_KEEP and any(
        key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUME_MAY_CHANGE
    )


def config_changes(saved: dict, config: Config) -> list[str]:
    """``key (old -> new)`` for each key of ``config`` that differs from the ``saved`` tree and may not change on a
    resume (:data:`RESUME_MAY_CHANGE`)."""
    from megatron_hapo.config.loader import to_tree  # noqa: PLC0415

    old, new = _flat(saved), _flat(json.loads(json.dumps(to_tree(config))))
    missing = object()
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, missing) != new.get(k, missing))
    return [f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in keys if not _may_change(k)]


def check_checkpoint_data(path: str | Path, key: str) -> None:
    """One line naming ``key`` when the Megatron checkpoint ``path`` holds anything but plain data (a pickle that
    would run code: :mod:`megatron_hapo.models.safe_checkpoint`)."""
    from megatron_hapo.models.safe_checkpoint import UnsafeCheckpointError, require_data_only  # noqa: PLC0415

    try:
        require_data_only(path)
    except UnsafeCheckpointError as exc:
        raise SystemExit(f"{key}: {exc}") from None


def resume_source(config: Config, *, compare_config: bool) -> tuple[bool, Path | None]:
    """Whether this run resumes, and from which explicit checkpoint (``None``: the run's own latest, or none).

    Refuses, in one line each: a ``train.resume_from`` that is not a run checkpoint, a ``model.init_from`` that is
    not a Megatron checkpoint, and a resume whose config differs from the saved ``config.json`` in a key that may
    not change (listed), when ``compare_config`` (one process of the job does; ``--allow-config-change`` skips it).
    """
    from megatron_hapo.trainer.checkpoint import TRAINER_STATE  # noqa: PLC0415

    run_dir, resume_from, init_from = Path(config.output.dir), config.train.resume_from, config.model.init_from
    if resume_from and not (Path(resume_from) / TRAINER_STATE).is_file():
        raise SystemExit(
            f"train.resume_from={resume_from!r}: not a run checkpoint ({TRAINER_STATE} missing); pass a "
            "checkpoints/step_* directory"
        )
    if init_from and not (Path(init_from) / ".metadata").is_file():
        raise SystemExit(
            f"model.init_from={init_from!r}: not a Megatron checkpoint (.metadata missing); pass the output of "
            "tools/convert_hf_to_mcore.py or a checkpoints/step_* directory"
        )
    for key, path in (("train.resume_from", resume_from), ("model.init_from", init_from)):
        if path:
            check_checkpoint_data(path, key)
    own_latest = (run_dir / "checkpoints" / "latest").is_file()
    if own_latest:  # the one a resume of the run's own checkpoints reads first
        named = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        if (named / ".metadata").is_file():
            check_checkpoint_data(named, f"output.dir's latest checkpoint ({named})")
    consumed = (run_dir / RESUMED_FROM).read_text().strip() if (run_dir / RESUMED_FROM).is_file() else None
    explicit = Path(resume_from) if resume_from and not (own_latest and consumed == resume_from) else None
    resuming = explicit is not None or own_latest
    saved = explicit.parent.parent / "config.json" if explicit is not None else run_dir / "config.json"
    if resuming and saved.is_file() and compare_config:
        changes = config_changes(json.loads(saved.read_text()), config)
        if changes:
            shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
            raise SystemExit(
                f"{saved}: this resume changes {shown}. Resume with the saved settings (only "
                f"{', '.join(RESUME_MAY_CHANGE)}* may change), or pass --allow-config-change"
            )
    return resuming, explicit
