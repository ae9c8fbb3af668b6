"""Cheap integrity checks of weight files from their headers: no tensor is read.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON naming each tensor's
dtype, shape and data_offsets (relative to the end of the header), then the tensor data, packed
with no gaps. So a file cut short, a header overwritten, or shards missing from a sharded
checkpoint all show in its size and its first bytes: checked in milliseconds before any worker
spends a minute loading the model to fail on it.
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

# safetensors refuses headers above 100 MB: a larger length is garbage read as a number.
MAX_HEADER = 100_000_000
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# What transformers' from_pretrained loads from a directory, in its order of preference.
SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
MAX_NAMED = 5


class WeightsError(ValueError):
    """A weight file (or a checkpoint's index) is truncated, garbled or missing; the message names it."""


def _named(items: list[str]) -> str:
    more = f" and {len(items) - MAX_NAMED} more" if len(items) > MAX_NAMED else ""
    return ", ".join(items[:MAX_NAMED]) + more


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file ({tensor name: {dtype, shape, data_offsets}}), after
    checking that it describes exactly the bytes the file holds; WeightsError says what is wrong."""
    path = Path(path)
    try:
        if path.is_dir():
            raise WeightsError(f"{path}: is a directory, expected a safetensors file")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(
                    f"{path}: truncated: {size} bytes, shorter than the 8-byte header length "
                    "every safetensors file starts with"
                )
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER:
                raise WeightsError(
                    f"{path}: truncated or garbled: its first 8 bytes give a header of {n} bytes, "
                    f"but the file holds {size} bytes"
                )
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: garbled header: its {n} header bytes are not JSON ({e})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: garbled header: expected a JSON object of tensors, got {type(header).__name__}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise WeightsError(f"{path}: garbled header: tensor {name!r} has data_offsets {offsets!r}")
        if not (isinstance(shape, list) and all(_count(d) for d in shape)):
            raise WeightsError(f"{path}: garbled header: tensor {name!r} has shape {shape!r}")
        begin, end = offsets
        per = DTYPE_BYTES.get(info.get("dtype"))
        if per is not None and math.prod(shape) * per != end - begin:
            raise WeightsError(
                f"{path}: garbled header: tensor {name!r} ({info['dtype']} {shape}) needs "
                f"{math.prod(shape) * per} bytes but its data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise WeightsError(
                f"{path}: garbled header: tensor {name!r} starts at data byte {begin}, "
                f"expected {pos} (tensors are packed without gaps)"
            )
        pos = end
    data = size - 8 - n
    if pos > data:
        cut = next(name for begin, end, name in spans if end > data)
        raise WeightsError(
            f"{path}: truncated: {size} bytes on disk, but its header describes {8 + n + pos} "
            f"(8 + {n} header + {pos} tensor data); tensor {cut!r} and those after it lie past the end of the "
            "file. Copy or download it again"
        )
    if pos < data:
        raise WeightsError(
            f"{path}: corrupt: {data - pos} bytes after the last tensor its header describes "
            f"({size} bytes on disk, {8 + n + pos} expected)"
        )
    return header


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _index_shards(index: Path) -> dict[str, list[str]]:
    """{shard file: tensor names} of a sharded checkpoint's index."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:
        raise WeightsError(f"{index}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{index}: garbled: not JSON ({e})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: garbled: no 'weight_map' of tensor name -> shard file")
    shards: dict[str, list[str]] = {}
    for tensor, shard in weight_map.items():
        shards.setdefault(shard, []).append(tensor)
    return shards


def _check_bin(path: Path) -> None:
    """A torch.save file is a zip archive whose directory sits at its end: cutting it loses that."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"PK\x03\x04":
            zipfile.ZipFile(path).close()
    except zipfile.BadZipFile as e:
        raise WeightsError(f"{path}: truncated or garbled ({e}); copy or download it again") from None
    except OSError as e:
        raise WeightsError(f"{path}: cannot be read ({e.strerror or e})") from None


def model_weight_problems(model_dir: Path) -> list[str]:
    """What is wrong with the weight files from_pretrained would load from `model_dir` (none: [])."""
    model_dir = Path(model_dir)
    problems: list[str] = []
    for index_name, single, check in (
        (SAFE_INDEX, SAFE_SINGLE, safetensors_header),
        (BIN_INDEX, BIN_SINGLE, _check_bin),
    ):
        index = model_dir / index_name
        if index.exists():
            try:
                shards = _index_shards(index)
            except WeightsError as e:
                return [str(e)]
            missing = sorted(s for s in shards if not (model_dir / s).is_file())
            if missing:
                problems.append(
                    f"{index} names {len(missing)} of its {len(shards)} shard file(s) that are missing "
                    f"from {model_dir}: {_named(missing)} (an interrupted download?)"
                )
            for shard in sorted(set(shards) - set(missing)):
                try:
                    header = check(model_dir / shard)
                except WeightsError as e:
                    problems.append(str(e))
                    continue
                absent = [t for t in shards[shard] if header is not None and t not in header]
                if absent:
                    problems.append(
                        f"{index} places {len(absent)} tensor(s) in {shard} whose header lacks them: {_named(absent)}"
                    )
            return problems
        if (model_dir / single).exists():
            try:
                check(model_dir / single)
            except WeightsError as e:
                problems.append(str(e))
            return problems
    return [f"{model_dir} holds no weights: none of {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, {BIN_INDEX}"]
