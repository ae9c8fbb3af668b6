"""Optimizer and learning-rate schedule over the adapter parameters."""

from __future__ import annotations

import math

import torch

from orchestrator.config.schema import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    cls = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }[cfg.name]
    return cls(params, **kwargs)


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return math.ceil(cfg.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_scheduler

    name = "constant_with_warmup" if cfg.scheduler == "constant" else cfg.scheduler
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps(cfg, total_steps), num_training_steps=total_steps
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer state this worker holds (moments, 8-bit quantization constants),
    each storage counted once (bitsandbytes shares one quantization map among all tensors)."""
    seen: dict[tuple, int] = {}
    for s in optimizer.state.values():
        for t in s.values():
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                seen[st.device, st.data_ptr()] = st.nbytes()
    return sum(seen.values())
