"""ZeRO-1 for the replicated adapter: each worker keeps optimizer state for its share of it.

The adapter's parameters are dealt out to the workers as whole tensors, balanced by size. A
worker's optimizer holds state only for its own tensors, so with N workers each holds about 1/N
of the state (for a 70B base with r=64 on all linear layers, ~6.6 GB of AdamW 32-bit state, or
~1.7 GB 8-bit, becomes that divided by N). After a step every worker holds the whole adapter again.

Why this is bit-identical to the replicated path (and so the default):
- gradients are summed with the very all-reduce the replicated path uses, so every worker holds
  the same summed gradients for every parameter, and clipping is the same clip_grad_norm_ call
  over all of them (same norm, same coefficient). A reduce-scatter would move half the bytes, but
  its sums (and a norm pieced together from per-worker parts) can round differently from the
  all-reduce's with more than two workers, and the gradients are held whole anyway (ZeRO-1);
- whole tensors, not flat slices, go to the optimizers: AdamW updates and bitsandbytes' blockwise
  8-bit quantization work tensor by tensor, so an optimizer that sees a subset of the tensors
  computes exactly what the replicated optimizer computes for them;
- the updated tensors travel unchanged (fp32 bits) in one all-gather from their owners.
The price is that all-gather: one adapter's worth of bytes per step on top of the all-reduce
(small next to what FSDP gathers of the base every step).

Checkpoints keep the replicated path's format: one optimizer.pt with state for every parameter
index in the replicated order, so a run resumes on any number of workers, sharded or not. It is
assembled through the checkpoint's own (shared) directory, not a collective: every rank writes
its part, rank 0 merges them, so no accelerator buffer ever holds the whole state.
"""

from __future__ import annotations

import functools
import heapq
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

# torch 2.13 renamed all_gather_into_tensor (deprecated there); older releases have only that.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def partition(numels: list[int], world: int) -> list[list[int]]:
    """Indices of `numels` for each of `world` ranks, whole tensors balanced by numel: largest
    first, each to the least loaded rank (ties: the lower index, the lower rank), each rank's
    indices ascending. Deterministic from the sizes alone, so every rank computes the same."""
    loads = [(0, r) for r in range(world)]
    owned: list[list[int]] = [[] for _ in range(world)]
    for i in sorted(range(len(numels)), key=lambda i: (-numels[i], i)):
        load, r = heapq.heappop(loads)
        owned[r].append(i)
        heapq.heappush(loads, (load + numels[i], r))
    return [sorted(o) for o in owned]


class OptimizerShard:
    """One rank's share of the adapter's optimizer: which tensors it steps, how the updated ones
    reach every rank, and how the full state is saved and loaded."""

    def __init__(self, params: list[nn.Parameter], rank: int, world: int):
        self.params, self.rank, self.world = params, rank, world
        self.owned = partition([p.numel() for p in params], world)
        self.mine = [params[i] for i in self.owned[rank]]
        self.loads = [sum(params[i].numel() for i in o) for o in self.owned]
        # The adapter is fp32 (PEFT's autocast_adapter_dtype); a narrower float tensor would
        # travel in it unchanged too.
        self.dtype = functools.reduce(torch.promote_types, {p.dtype for p in params})

    @torch.no_grad()
    def gather_params(self) -> None:
        """Every rank's updated tensors to every rank, in one all-gather of flat buffers (each
        rank's segment padded to the largest share)."""
        size = max(self.loads)
        send = torch.zeros(size, dtype=self.dtype, device=self.params[0].device)
        torch.cat([p.reshape(-1).to(self.dtype) for p in self.mine], out=send[: self.loads[self.rank]])
        recv = torch.empty(size * self.world, dtype=send.dtype, device=send.device)
        _all_gather_single(recv, send)
        for r, indices in enumerate(self.owned):
            if r == self.rank:
                continue
            offset = r * size
            for i in indices:
                p = self.params[i]
                p.copy_(recv[offset : offset + p.numel()].view_as(p))
                offset += p.numel()

    def save(self, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """Write the replicated path's optimizer.pt at `path`: state for every parameter index,
        one param group over all of them. Collective."""
        part = path.parent / f".{path.stem}-part-{self.rank}.pt"
        torch.save(optimizer.state_dict(), part)
        dist.barrier()
        if self.rank != 0:
            return
        parts = [path.parent / f".{path.stem}-part-{r}.pt" for r in range(self.world)]
        # mmap: the parts are read as the merged file is written, never all held at once.
        loaded = [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in parts]
        by_index = {}
        for indices, sd in zip(self.owned, loaded):
            for local, i in enumerate(indices):
                if local in sd["state"]:
                    by_index[i] = sd["state"][local]
        full = {
            "state": {i: by_index[i] for i in sorted(by_index)},
            "param_groups": [{**loaded[0]["param_groups"][0], "params": list(range(len(self.params)))}],
        }
        torch.save(full, path)
        for f in parts:
            f.unlink()

    def load(self, optimizer: torch.optim.Optimizer, path: Path) -> None:
        """Give this rank's optimizer its share of a full optimizer.pt (written by any number of
        workers, sharded or not)."""
        full = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        (group,) = full["param_groups"]
        if len(group["params"]) != len(self.params):
            raise ValueError(
                f"{path} holds optimizer state for {len(group['params'])} adapter tensors; this run's adapter "
                f"has {len(self.params)}"
            )
        # Cloned out of the mapped file: the optimizer updates its state in place.
        local = {
            "state": {
                local: _clone(full["state"][i]) for local, i in enumerate(self.owned[self.rank]) if i in full["state"]
            },
            "param_groups": [{**group, "params": list(range(len(self.mine)))}],
        }
        optimizer.load_state_dict(local)


def _clone(value: object) -> object:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value
