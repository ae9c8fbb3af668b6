"""Sample packing: several examples in one row of at most data.max_seq_len tokens, each attending
only to itself.

The examples are shuffled with trainer.seed and filled into rows in that order, a new row opening
when the next example does not fit (next-fit: one pass, linear, and the same on every worker, as
it depends only on the row lengths and the seed). The rows are fixed for the run; the sampler
shuffles them per epoch like unpacked rows, so a step is a global batch of packed rows, every
step's rows are computable without replay, and one worker sees the same rows as N.

A packed row carries `position_ids` that restart at 0 for each example and no attention mask:
transformers then keeps attention inside each example (a block-diagonal causal mask with SDPA or
eager attention; cu_seqlens, padding-free, with flash attention). Labels at the first token of each
example are ignored, as the shift makes position 0 of an unpacked row no target: an example's loss
and its target-token count are the same packed or not.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from orchestrator.data.tokenize import IGNORE_INDEX, target_tokens

Example = tuple[list[int], list[int]]


# transformers' masking_utils reads packed rows from position ids, for architectures that hand it
# theirs (a mask call or mask_kwargs naming position_ids). Layers with a recurrent state (Mamba,
# linear attention, short convolutions) would still carry it across examples.
_MASK_WITH_POSITIONS = re.compile(r"(?:mask\w*\(|mask_kwargs\s*=\s*\{)(?:[^(){}]|\([^()]*\))*?\bposition_ids\b", re.S)
_RECURRENT = re.compile(r"mamba|ssm_state|conv_state|recurrent|linear_attn|deltanet|delta_net|short_conv", re.I)


def supported(model_dir: Path) -> bool:
    """Whether the model's transformers implementation keeps packed examples apart (see above).
    Read from its source, without importing it; models with remote code are not known to."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
        kind = cfg["model_type"].replace("-", "_")
        spec = importlib.util.find_spec(f"transformers.models.{kind}.modeling_{kind}")
    except (OSError, ValueError, KeyError, AttributeError, ModuleNotFoundError):
        return False
    if cfg.get("auto_map") or spec is None or not spec.origin:
        return False
    source = Path(spec.origin).read_text()
    return (
        "masking_utils import" in source and bool(_MASK_WITH_POSITIONS.search(source)) and not _RECURRENT.search(source)
    )


def enabled(run: Any) -> bool:
    """data.packing as the run uses it (None resolved by the model)."""
    if run.data.packing is not None:
        return run.data.packing
    from orchestrator.model import resolve_model_path

    return supported(resolve_model_path(run.model.path))


def pack(lengths: np.ndarray, capacity: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed rows of example indices, as (members, starts): row b holds members[starts[b]:starts[b+1]]."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).numpy()
    starts, used = [0], 0
    for k, n in enumerate(lengths[order].tolist()):
        if used + n > capacity and used:
            starts.append(k)
            used = 0
        used += n
    if len(order):
        starts.append(len(order))
    return order.astype(np.int64), np.asarray(starts, np.int64)


def collate_packed(packed: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch of packed rows, right-padded to its longest; the padding is a sequence of its
    own (positions from 0, no targets), so no real token attends to it."""
    width = max(sum(len(ids) for ids, _ in row) for row in packed)
    input_ids = torch.full((len(packed), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packed), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(packed), width), dtype=torch.long)
    for r, row in enumerate(packed):
        at = 0
        for ids, lab in row:
            n = len(ids)
            input_ids[r, at : at + n] = torch.tensor(ids)
            labels[r, at + 1 : at + n] = torch.tensor(lab[1:])
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": positions}


class PackedRows:
    """Packed rows over tokenized rows (TokenizedRows or a list of examples), by index, with the
    interface the sampler and the steps use: len, [b] (the row's examples), length, target_tokens."""

    def __init__(self, rows: Any, capacity: int, seed: int):
        self.rows = rows
        self.lengths = _lengths(rows)
        self.members, self.starts = pack(self.lengths, capacity, seed)
        self.capacity = capacity

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, b: int) -> list[Example]:
        return [self.rows[int(i)] for i in self._of(b)]

    collate = staticmethod(collate_packed)

    def _of(self, b: int) -> np.ndarray:
        return self.members[self.starts[b] : self.starts[b + 1]]

    def example_lengths(self, b: int) -> list[int]:
        return self.lengths[self._of(b)].tolist()

    def length(self, b: int) -> int:
        return int(self.lengths[self._of(b)].sum())

    def target_tokens(self, indices: Any) -> int:
        return target_tokens(self.rows, [int(i) for b in indices for i in self._of(b)])

    def fill(self) -> float:
        """The share of the packed rows' tokens that are real tokens (the rest is padding)."""
        return float(self.lengths.sum()) / max(len(self) * self.capacity, 1)


def _lengths(rows: Any) -> np.ndarray:
    if hasattr(rows, "lengths"):
        return rows.lengths()
    return np.asarray([len(ids) for ids, _ in rows], np.int64)
