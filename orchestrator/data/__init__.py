"""Instruction data: row formats, tokenization with prompt masking, and the sharded sampler.

The names below are imported on first use: validating a config reads `formats` alone, and the
command starts its local Ray once those checks pass, without waiting for torch (which `sampler`
and `tokenize` import) to load."""

from __future__ import annotations

import importlib
from typing import Any

_HOME = {
    "DataError": "formats",
    "read_rows": "formats",
    "split_rows": "formats",
    "GlobalBatchSampler": "sampler",
    "IGNORE_INDEX": "tokenize",
    "collate": "tokenize",
    "encode_rows": "tokenize",
    "target_tokens": "tokenize",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
