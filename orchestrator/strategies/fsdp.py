"""fsdp: FSDP2 fully_shard on every decoder layer and on the root, each as it loads.

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


def shard_module(module: nn.Module, cfg: StrategyConfig) -> None:
    """fully_shard one decoder layer as the loader completes it, and last the root (embeddings,
    norm, head; the layers inside are already sharded). The adapter stays out of it."""
    from torch.distributed.fsdp import fully_shard

    adapter = {p for p in module.parameters() if p.requires_grad}
    fully_shard(module, reshard_after_forward=cfg.reshard_after_forward, ignored_params=adapter)
