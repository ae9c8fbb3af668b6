"""Sharding strategies behind one small Protocol.

A strategy decides how the frozen base is laid out across workers and how adapter gradients
meet; the training loop only talks to this Protocol. A new strategy is one module implementing
it, its name in StrategyConfig.name (and in schema.ZERO_STAGES, with its stage, for a DeepSpeed
one), and a conf/strategy/<name>.yaml that sets `name` and whatever else it changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from orchestrator.config.schema import ZERO_STAGES

if TYPE_CHECKING:
    from orchestrator.config.schema import RunConfig

OptimizerFactory = Callable[[list[nn.Parameter]], torch.optim.Optimizer]


class Strategy(Protocol):
    name: str

    def shard_layer(self, module: nn.Module) -> None:
        """Called by the loader (orchestrator/loading.py) on each decoder layer as soon as its base
        weights are real and its adapter initialised, then once on the whole model: lay out the
        module's frozen base parameters not laid out yet (FSDP2 fully_shard, ZeRO-3 partitioning),
        so that no worker ever holds the whole base. A no-op where every worker keeps the base
        whole (single, ddp, zero2)."""

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap the loaded `model` (its base already laid out by shard_layer) and build the optimizer
        over its trainable parameters."""

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch (gradients accumulate until optimizer_step)."""

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """Combine gradients across workers, clip, step, zero; return the pre-clip global grad norm."""

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Full (unsharded) trainable tensors by parameter name. Collective: every rank calls it."""

    def param_bytes(self, model: nn.Module) -> dict[str, int]:
        """Bytes of frozen and trainable parameters this worker holds."""

    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        """Write the optimizer state for resuming into state_dir. Collective."""

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        """Restore what save_state wrote (adapter weights are restored by the loop). Collective."""


def build_strategy(run: RunConfig) -> Strategy:
    from orchestrator.strategies.replicated_adapter import ReplicatedAdapterStrategy

    cfg = run.strategy
    if cfg.name == "fsdp":
        from orchestrator.strategies.fsdp import shard_module

        return ReplicatedAdapterStrategy(cfg, shard_module)
    if cfg.name in ("ddp", "single"):
        return ReplicatedAdapterStrategy(cfg)
    if cfg.name in ZERO_STAGES:
        from orchestrator.strategies.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, run)
    raise ValueError(f"strategy.name={cfg.name!r} has no implementation")
