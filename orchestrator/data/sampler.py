"""Which rows each worker reads at each step: deterministic, disjoint, and seekable.

Step s of epoch e takes the global batch perm_e[s*G:(s+1)*G] (G = micro * accum * world);
micro-batch m of rank r is the slice [m*W*micro + r*micro, +micro) of it. One worker with a
W-times larger micro-batch therefore sees exactly the same rows per step as W workers, which
is what makes single-process and sharded runs comparable, and any step's rows can be computed
without replaying the ones before it. With row lengths given (data.group_by_length), the global
batches of each group of GROUP_BATCHES steps are formed from its rows sorted by length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch

# Length grouping sorts rows within groups of this many global batches (transformers' group_by_length
# uses 50 batches): wide enough to find rows of similar length, narrow enough to stay a shuffle.
GROUP_BATCHES = 64


@dataclass(frozen=True)
class GlobalBatchSampler:
    num_rows: int
    micro_batch_size: int
    grad_accum: int
    world_size: int
    rank: int
    seed: int
    lengths: np.ndarray | None = field(default=None, hash=False, compare=False)
    """Row lengths, to group rows of similar length into the same batches (data.group_by_length)."""

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
        batch = self.all_step_indices(step)
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
        if self.lengths is None:
            return self.permutation(epoch)[within * self.global_batch : (within + 1) * self.global_batch]
        group, k = divmod(within, GROUP_BATCHES)
        return self.grouped(epoch, group)[k]

    def grouped(self, epoch: int, group: int) -> list[list[int]]:
        """The global batches of one group: its rows sorted by length (longest first, ties in
        permutation order), cut into batches, the batches in a seeded order. A micro-batch then
        holds rows of similar length, and which rows a step takes is still the same for any
        number of workers."""
        g = self.global_batch
        n = min(GROUP_BATCHES, self.steps_per_epoch - group * GROUP_BATCHES)
        rows = np.asarray(self.permutation(epoch)[group * GROUP_BATCHES * g :][: n * g], np.int64)
        rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch * 7919 + group))
        return [rows[b * g : (b + 1) * g].tolist() for b in order.tolist()]
