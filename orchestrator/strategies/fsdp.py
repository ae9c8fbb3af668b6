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


def root_units(model: nn.Module) -> list[nn.Module]:
    """The input embeddings and the output head, when untied: units of their own for the loader
    and FSDP, since at a 128k vocabulary each outweighs a decoder layer of an 8B model (1 GiB in
    bf16 against 0.4). Tied, they are one parameter, which must stay in one unit: the root's."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is None or head is None or head.weight is emb.weight:
        return []
    return [emb, head]


def shard_module(module: nn.Module, cfg: StrategyConfig) -> None:
    """fully_shard one unit as the loader completes it: a decoder layer, the embeddings, the
    output head, and last the root (what is left: the final norm; the units inside are already
    sharded). The adapter stays out of it."""
    from torch.distributed.fsdp import fully_shard

    adapter = {p for p in module.parameters() if p.requires_grad}
    fully_shard(module, reshard_after_forward=cfg.reshard_after_forward, ignored_params=adapter)
