"""Strategies that keep the adapter replicated: single, ddp and fsdp.

Adapters are small next to the base (well under 1% of its parameters), so these strategies keep
them as plain fp32 tensors on every worker and differ only in what they do with the base:
single and ddp leave it whole on each worker, fsdp shards it with FSDP2. The optimizer
(bitsandbytes kernels do not take DTensors) then sees plain tensors. Its state is the one part
of the adapter that grows large (8 bytes per parameter for AdamW 32-bit): with
strategy.shard_optimizer each worker keeps only its share of it (optimizer_shard.py, ZeRO-1),
otherwise every worker holds all of it. Either way one optimizer.pt of the same format is saved,
which loads on any number of workers.

torch's DDP wrapper is not used for ddp: with a frozen base it would only all-reduce the adapter
gradients, which the one flat collective here does too, without the wrapper's name prefixes and
its reentrant-checkpointing pitfalls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from orchestrator.config.schema import StrategyConfig
from orchestrator.strategies import OptimizerFactory
from orchestrator.strategies.optimizer_shard import OptimizerShard

log = logging.getLogger("orchestrator")

ShardModule = Callable[[nn.Module, StrategyConfig], None]


def allreduce_grads(params: list[nn.Parameter]) -> None:
    """Sum gradients over workers in one flat collective (losses are already normalised by the
    global token count, so a sum, not a mean, gives the single-process gradient)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def local_param_bytes(model: nn.Module) -> dict[str, int]:
    from torch.distributed.tensor import DTensor

    out = {"frozen": 0, "trainable": 0}
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        out["trainable" if p.requires_grad else "frozen"] += t.numel() * t.element_size()
    return out


class ReplicatedAdapterStrategy:
    def __init__(self, cfg: StrategyConfig, shard_module: ShardModule | None = None):
        self.name = cfg.name
        self.cfg = cfg
        self.shard_module = shard_module
        self._params: list[nn.Parameter] = []
        self.shard: OptimizerShard | None = None

    def shard_layer(self, module: nn.Module) -> None:
        if self.shard_module is not None:
            self.shard_module(module, self.cfg)

    def prepare(self, model: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        self._params = [p for p in model.parameters() if p.requires_grad]
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.shard = None
        if self.cfg.shard_optimizer and world > 1:
            if len(self._params) >= world:
                self.shard = OptimizerShard(self._params, dist.get_rank(), world)
            else:  # a worker with no tensor of its own would have an optimizer over nothing
                log.warning(
                    "strategy.shard_optimizer: %d adapter tensors for %d workers; the optimizer state stays replicated",
                    len(self._params),
                    world,
                )
        optimizer = make_optimizer(self.shard.mine if self.shard else self._params)
        if self.shard and len(optimizer.param_groups) != 1:
            raise ValueError("strategy.shard_optimizer needs an optimizer with one parameter group")
        return model, optimizer

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        allreduce_grads(self._params)
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
        # All gradients, not only those of the optimizer's own tensors when it holds a share.
        for p in self._params:
            p.grad = None
        if self.shard:
            self.shard.gather_params()
        return norm.detach()

    def adapter_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def param_bytes(self, model: nn.Module) -> dict[str, int]:
        return local_param_bytes(model)

    # One full copy of the optimizer state is saved, gathered from the shares when sharded, and
    # any number of workers, sharded or not, can load it: no resharding between worker counts.
    def save_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        if self.shard:
            self.shard.save(optimizer, state_dir / "optimizer.pt")
        elif not dist.is_initialized() or dist.get_rank() == 0:
            torch.save(optimizer.state_dict(), state_dir / "optimizer.pt")

    def load_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state_dir: Path) -> None:
        if self.shard:
            self.shard.load(optimizer, state_dir / "optimizer.pt")
        else:
            optimizer.load_state_dict(torch.load(state_dir / "optimizer.pt", map_location="cpu", weights_only=False))
