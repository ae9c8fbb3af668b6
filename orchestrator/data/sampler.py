"""Which rows each worker reads at each step: deterministic, disjoint, and seekable.

Step s of epoch e takes the global batch perm_e[s*G:(s+1)*G] (G = micro * accum * world);
micro-batch m of rank r is the slice [m*W*micro + r*micro, +micro) of it. One worker with a
W-times larger micro-batch therefore sees exactly the same rows per step as W workers, which
is what makes single-process and sharded runs comparable, and any step's rows can be computed
without replaying the ones before it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalBatchSampler:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        # The incomplete last global batch is dropped so every worker runs the same steps.
        return self.num_rows // self.global_batch

    @functools.lru_cache(maxsize=2)  # noqa: B019 - frozen and hashable; two epochs are live at most
    def permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.num_rows, generator=g).tolist()

    def step_indices(self, step: int) -> list[list[int]]:
        """Row indices of this rank's micro-batches for global step `step` (0-based)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        batch = self.permutation(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
        per_micro = self.micro_batch_size * self.world_size
        return [
            batch[
                m * per_micro + self.rank * self.micro_batch_size : m * per_micro
                + (self.rank + 1) * self.micro_batch_size
            ]
            for m in range(self.grad_accum)
        ]

    def all_step_indices(self, step: int) -> list[int]:
        """Row indices of the whole global batch (every rank), to count its loss tokens."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
