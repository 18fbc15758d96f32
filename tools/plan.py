"""Check a run config against a cluster and print per-GPU memory for training and rollout; no GPU needed.

    .venv/bin/python tools/plan.py configs/runs/llama-3.3-70b-hapo.yaml --nodes 8 --gpus-per-node 8 [key=value ...]

The architecture comes from ``model.config_file`` (an architecture-only HF config.json, ``configs/models/``) or
else from ``model.path``. The HF model is also built on the meta device (no memory) and its parameter count
must equal the planner's own count of the Megatron layout. Exit status 1, with one line per reason, when a
divisibility constraint fails or the estimate does not fit ``--gpu-gib``. The estimate's model is in
``megatron_hapo/models/plan.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_hapo.config import load_config
from megatron_hapo.config.errors import ConfigError
from megatron_hapo.models.hf_config import decoder_spec
from megatron_hapo.models.plan import (
    GIB,
    Layout,
    Plan,
    fit_errors,
    full_length_sequences,
    plan_run,
    trainer_resident_bytes,
)


def _architecture(config: object) -> dict:
    model = config.model
    source = model.config_file or (str(Path(model.path) / "config.json") if model.path else None)
    if source is None or not Path(source).is_file():
        raise SystemExit(
            f"no architecture: set model.config_file (configs/models/*/config.json) or model.path (got {source!r})"
        )
    return json.loads(Path(source).read_text())


def _guide_architecture(config: object) -> object:
    """The mixed-policy guide's architecture from ``algo.guide_policy.model_path``'s config.json (``None``: no
    guide, or no such file: the planner assumes the policy's and says so)."""
    path = config.algo.guide_policy.model_path
    if config.algo.guide_policy.kind == "none" or not path or not (Path(path) / "config.json").is_file():
        return None
    return decoder_spec(json.loads((Path(path) / "config.json").read_text()))


def meta_device_params(hf_config: dict) -> int:
    """Parameters of the HF model built on the meta device (transformers; no memory is allocated)."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    config = transformers.AutoConfig.for_model(**hf_config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def _report(plan: Plan, layout: Layout, config: object, gpu_bytes: float) -> None:
    print(
        f"GPUs {layout.world} = {layout.nodes} nodes x {layout.gpus_per_node}; trainer TP {layout.tp} x PP "
        f"{layout.pp}{f' x VPP {layout.vpp}' if layout.vpp else ''} x DP {layout.dp}; engine TP "
        f"{layout.engine_tp} ({layout.world // layout.engine_tp} engines)"
    )
    print(
        f"parameters {plan.total_params / 1e9:.2f} B; per TP rank and stage: "
        + ", ".join(f"{p / 1e9:.2f} B" for p in plan.params_per_stage)
    )
    detail = ", ".join(f"{name} {value / GIB:.1f}" for name, value in plan.training.items())
    print(f"training (heaviest stage): {sum(plan.training.values()) / GIB:.1f} GiB per GPU ({detail})")
    print(
        f"rollout: the trainer keeps {trainer_resident_bytes(plan) / GIB:.1f} GiB per GPU; the engine asks for "
        f"{config.engine.gpu_memory_utilization * gpu_bytes / GIB:.1f} GiB (engine.gpu_memory_utilization)"
    )
    if plan.guide:
        print(
            f"guide engine (vLLM, awake all run): weights {plan.guide['weights'] / GIB:.1f} GiB per GPU in "
            f"{config.engine.guide_gpu_memory_utilization * gpu_bytes / GIB:.1f} GiB "
            "(engine.guide_gpu_memory_utilization)"
        )
    print(
        f"rollout (vLLM): weights {plan.rollout['weights'] / GIB:.1f} GiB per GPU, KV cache "
        f"{plan.rollout['kv_per_sequence'] / GIB:.2f} GiB per full-length sequence; "
        f"{full_length_sequences(plan, config, gpu_bytes)} full-length sequences fit per engine"
    )


def _report_stop_lead(config: object, num_params: int, layout: Layout) -> None:
    """The ``--signal=USR1@T`` a launch script of this run should ask for (an ESTIMATE; the formula is in
    ``megatron_hapo.studies.throughput.stop_lead_time``)."""
    from megatron_hapo.studies.throughput import stop_lead_time  # noqa: PLC0415

    lead = stop_lead_time(config, num_params, nodes=layout.nodes, gpus_per_node=layout.gpus_per_node)
    print(
        f"preemption: #SBATCH --signal=USR1@{int(lead['lead_s'])} (ESTIMATED: step {lead['step_s']:.0f} s, rollout "
        f"{lead['rollout_s']:.0f} s, updates {lead['updates_s']:.0f} s, checkpoint {lead['save_s']:.0f} s)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory per GPU (H100 / A100 80 GB: 80)")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides, warn=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print(f"{args.config}: invalid configuration")
        return 1
    hf_config = _architecture(config)
    spec = decoder_spec(hf_config)
    model = config.model
    layout = Layout(
        args.nodes,
        args.gpus_per_node,
        model.tensor_parallel,
        model.pipeline_parallel,
        model.virtual_pipeline,
        config.engine.tensor_parallel,
    )
    plan = plan_run(spec, config, layout, guide_spec=_guide_architecture(config))
    counted = meta_device_params(hf_config)
    if counted != plan.total_params:
        plan.errors.append(f"the planner counts {plan.total_params} parameters, transformers builds {counted}")
    if not plan.errors:
        _report(plan, layout, config, args.gpu_gib * GIB)
        _report_stop_lead(config, plan.total_params, layout)
        plan.errors = fit_errors(plan, config, args.gpu_gib * GIB)
        for note in plan.notes:
            print(f"note: {note}")
    for error in plan.errors:
        print(f"error: {error}", file=sys.stderr)
    print(f"{args.config}: {'does not fit' if plan.errors else 'fits'} ({args.gpu_gib:.0f} GiB GPUs)")
    return 1 if plan.errors else 0


if __name__ == "__main__":
    sys.exit(main())
