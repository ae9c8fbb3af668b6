"""Instruction data: row formats, tokenization with prompt masking, and the sharded sampler."""

from orchestrator.data.formats import DataError, read_rows, split_rows
from orchestrator.data.sampler import GlobalBatchSampler
from orchestrator.data.tokenize import IGNORE_INDEX, collate, encode_rows, target_tokens

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "GlobalBatchSampler",
    "collate",
    "encode_rows",
    "read_rows",
    "split_rows",
    "target_tokens",
]
