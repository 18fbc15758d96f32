"""Run-level configuration: rollout shape, optimizer and batch layout (spec 2.7 defaults).

Later components (model, parallel layout, data, checkpointing) add their own dataclasses beside these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_hapo.config.algo import AlgoConfig


@dataclass(kw_only=True, slots=True)
class RolloutConfig:
    """Shape of the rollout."""

    num_samples_per_prompt: int = 16
    """Responses generated per prompt (the group size G, >= 1)."""
    max_prompt_length: int = 1024
    """Longest prompt in tokens; longer prompts are dropped and counted (> 0)."""
    max_response_length: int = 4096
    """Longest response in tokens (L_max, > 0); generation stops there."""


@dataclass(kw_only=True, slots=True)
class OptimConfig:
    """AdamW with linear warm-up then constant learning rate (HAPO recipes)."""

    lr: float = 1e-6
    """Peak learning rate (> 0)."""
    warmup_steps: int = 10
    """Optimizer steps of linear warm-up (>= 0)."""
    weight_decay: float = 0.1
    """Decoupled weight decay (>= 0)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (> 0); a non-finite norm skips the step."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas, each in [0, 1)."""


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Batch layout of one RL step."""

    prompts_per_step: int = 512
    """Prompts per rollout step (after group filtering, >= 1)."""
    mini_batch_prompts: int = 32
    """Prompts per optimizer step; must divide ``prompts_per_step``."""
    ppo_epochs: int = 1
    """Passes over the rollout batch per step (>= 1)."""
    total_steps: int = 1000
    """RL steps to run (>= 1)."""
    seed: int = 1
    """Global random seed."""


@dataclass(kw_only=True, slots=True)
class Config:
    """The whole resolved configuration of a run."""

    algo: AlgoConfig = field(default_factory=AlgoConfig)
    """The RL algorithm as a composition of components."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Rollout shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Batch layout and length of training."""
