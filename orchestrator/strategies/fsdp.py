"""fsdp: FSDP2 fully_shard on every decoder layer and on the root.

The frozen base (bf16, or NF4 packed in a float storage dtype) is sharded, so each worker holds
~1/N of it and gathers one layer at a time. The adapter parameters are `ignored_params`: they
stay replicated (see replicated_adapter) and their gradients are summed once per step.
"""

from __future__ import annotations

from torch import nn

from orchestrator.config.schema import StrategyConfig


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of any HF causal LM: the children of the longest ModuleList."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"{type(model).__name__} has no ModuleList of decoder layers to shard")
    return list(max(lists, key=len))


def shard_base(model: nn.Module, cfg: StrategyConfig, ignored: set) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, ignored_params=ignored)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, ignored_params=ignored)
