"""Tokenize once: a source's rows encoded into a memory-mapped cache that every worker shares.

    <cache root>/<key>/            (the root: rundir.data_cache_root)
      tokens.bin    int32, every row's input ids end to end
      mask.bin      uint8, 1 where the token is a target (labels are the ids there, -100 elsewhere)
      offsets.bin   int64, n_rows + 1: row i is tokens[offsets[i]:offsets[i+1]]
      targets.bin   int32, each row's target tokens (position 0 excluded: labels are shifted)
      file.bin      uint16, the index (in meta.json's files) of each row's file
      line.bin      int64, each row's line (row index for Parquet/Arrow): problems name it
      meta.json     counts, files, the rows skipped or left without a target, and the key's parts

The key is a digest of the data files (path, size, mtime and sampled bytes, like the base's
fingerprint), format and its options, the tokenizer's files and chat template, max_seq_len and
this module's CACHE_VERSION. A cache is written into a temporary directory beside it and renamed
into place, whole or not at all; one whose files do not have the sizes meta.json says is torn and
built again. Building it is validation's pass over the data: the rows are read, checked and
encoded once, in a few processes, with a progress bar.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.data.formats import MAX_REPORTED, DataError
from orchestrator.data.sources import BadRows, DataFile, SourceSpec, Where, read_source, resolve_files, total_bytes
from orchestrator.data.tokenize import IGNORE_INDEX, encode_batch

log = logging.getLogger("orchestrator")

CACHE_VERSION = 1  # bump when what an encoding produces changes
ARRAYS = {
    "tokens": np.int32,
    "mask": np.uint8,
    "offsets": np.int64,
    "targets": np.int32,
    "file": np.uint16,
    "line": np.int64,
}
SAMPLES, SAMPLE_BYTES = 32, 64 * 1024
CHUNK_ROWS = 2048
# Below this much data a pool's start-up (a Python with transformers per process) costs more than it saves.
POOL_MIN_BYTES = 16 << 20
SHOWN = 3


def file_digest(path: str, h: Any) -> None:
    """Path, size, mtime and 32 slices of 64 KiB spread over the file: a changed file changes it,
    without reading gigabytes."""
    st = os.stat(path)
    h.update(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    with open(path, "rb") as f:
        span = max(st.st_size - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            f.seek(span * i // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))


def tokenizer_digest(model_dir: Path, tokenizer: Any) -> str:
    """The tokenizer's files, its class and the chat template it renders with."""
    from orchestrator.model import TOKENIZER_FILES

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + (model_dir / name).read_bytes())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Encoding:
    """How rows become tokens: everything of the run the cache depends on besides the files."""

    tokenizer: str
    """tokenizer_digest."""
    max_seq_len: int
    train_on: str
    row_cap: int


def cache_key(spec: SourceSpec, files: list[DataFile], enc: Encoding) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    h.update(json.dumps([spec.format, sorted(spec.columns.items()), spec.split, asdict(enc)]).encode())
    for f in files:
        h.update(f.kind.encode())
        file_digest(f.path, h)
    return h.hexdigest()[:32]


@dataclass
class Report:
    """What building (or opening) a source's cache found, for validation to report."""

    spec: SourceSpec
    rows: int = 0
    bad: int = 0
    bad_first: list[str] = field(default_factory=list)
    failed: dict[str, list[str]] = field(default_factory=dict)
    """Why rows could not be encoded -> where (the first few of each reason)."""
    failed_count: dict[str, int] = field(default_factory=dict)
    targetless: int = 0
    targetless_first: list[str] = field(default_factory=list)
    tokens: int = 0


class SourceCache:
    """One source's cache, memory-mapped: nothing is read until a row is."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.meta = json.loads((self.dir / "meta.json").read_text())
        self.files: list[str] = self.meta["files"]
        for name, dtype in ARRAYS.items():
            n = os.path.getsize(self.dir / f"{name}.bin") // np.dtype(dtype).itemsize
            setattr(
                self,
                name,
                np.memmap(self.dir / f"{name}.bin", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype),
            )

    def __len__(self) -> int:
        return self.meta["rows"]

    def example(self, i: int) -> tuple[list[int], list[int]]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.tokens[a:b]
        return ids.tolist(), np.where(self.mask[a:b] != 0, ids, IGNORE_INDEX).tolist()

    def where(self, i: int) -> str:
        f = self.files[int(self.file[i])]
        return str(Where(f["path"], int(self.line[i]), f["kind"] in ("parquet", "arrow")))

    def report(self, spec: SourceSpec) -> Report:
        m = self.meta
        return Report(
            spec,
            rows=m["rows"],
            bad=m["bad"],
            bad_first=m["bad_first"],
            failed=m["failed"],
            failed_count=m["failed_count"],
            targetless=m["targetless"],
            targetless_first=m["targetless_first"],
            tokens=m["tokens"],
        )


def is_whole(directory: Path) -> bool:
    """Whether a cache directory holds every file at the size its meta.json says."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
        n, t = meta["rows"], meta["tokens"]
        sizes = {"tokens": t, "mask": t, "offsets": n + 1, "targets": n, "file": n, "line": n}
        return all(os.path.getsize(directory / f"{k}.bin") == sizes[k] * np.dtype(ARRAYS[k]).itemsize for k in ARRAYS)
    except (OSError, ValueError, KeyError, TypeError):
        return False


# --- building -----------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One chunk of rows encoded, as arrays: the tokens and loss mask of its rows that encoded,
    end to end, with their lengths and target counts, and why each other row failed (by its
    position in the chunk). Arrays, so that a pool process hands them back in one pickle and
    nothing per token runs in Python on the driver."""

    ids: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray
    failed: dict[int, str]


def encode_chunk(rows: list[dict], fmt: str, tok: Any, max_len: int, train_on: str) -> Encoded:
    results = encode_batch(rows, fmt, tok, max_len, train_on)
    failed = {i: _message(r) for i, r in enumerate(results) if isinstance(r, BaseException)}
    good = [r for r in results if not isinstance(r, BaseException)]
    lengths = np.fromiter((len(ids) for ids, _ in good), np.int64, len(good))
    total = int(lengths.sum())
    ids = np.fromiter(itertools.chain.from_iterable(i for i, _ in good), np.int32, total)
    mask = np.fromiter(itertools.chain.from_iterable(lab for _, lab in good), np.int64, total) != IGNORE_INDEX
    starts = np.cumsum(lengths) - lengths
    shifted = mask.copy()
    shifted[starts[lengths > 0]] = False  # position 0 is never a target (labels are shifted)
    targets = np.bincount(np.repeat(np.arange(len(good)), lengths), shifted, minlength=len(good)).astype(np.int32)
    return Encoded(ids, mask.astype(np.uint8), lengths, targets, failed)


_POOL_STATE: dict[str, Any] = {}


def _pool_init(model: Any, fmt: str, max_len: int, train_on: str) -> None:
    from orchestrator.model import load_tokenizer

    _POOL_STATE.update(tok=load_tokenizer(model), fmt=fmt, max_len=max_len, train_on=train_on)


def _pool_encode(rows: list[dict]) -> Encoded:
    s = _POOL_STATE
    return encode_chunk(rows, s["fmt"], s["tok"], s["max_len"], s["train_on"])


def _message(e: BaseException) -> str:
    # An exception travels between processes as its message (some do not pickle).
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _chunks(rows: Iterator[tuple[Where, dict]]) -> Iterator[tuple[list[Where], list[dict]]]:
    while True:
        chunk = list(itertools.islice(rows, CHUNK_ROWS))
        if not chunk:
            return
        yield [w for w, _ in chunk], [r for _, r in chunk]


def build(
    spec: SourceSpec,
    files: list[DataFile],
    root: Path,
    key: str,
    tokenizer: Any,
    model: Any,
    max_len: int,
    train_on: str,
    cap: int,
    num_proc: int = 1,
    progress: bool = True,
    commit: bool = True,
    skip_bad: bool = False,
) -> tuple[Report, Path | None]:
    """Read, check and encode every row of a source into root/<key>. Returns the report and the
    committed directory; None when nothing was committed: commit=False, or what was read is an
    error (no usable row, no row with a target, or bad rows without skip_bad)."""
    from tqdm import tqdm

    if commit:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
        except OSError as e:
            raise DataError(
                [
                    f"{spec.path}: the tokenized data cannot be cached in {root} ({e.strerror or e}); set data.cache_dir "
                    "to a writable directory"
                ]
            ) from None
    else:  # a check only: encoded into a scratch directory, nothing written beside the run
        tmp = Path(tempfile.mkdtemp(prefix="orchestrator-data-"))
    report = Report(spec)
    bad = BadRows()
    file_index = {f.path: i for i, f in enumerate(files)}
    bar = tqdm(
        total=total_bytes(files),
        unit="B",
        unit_scale=True,
        desc=f"tokenizing {spec.path}",
        disable=not progress or None,
        leave=False,
    )
    lengths, targets, file_ids, lines = [], [], [], []
    pool = None
    try:
        chunks = _chunks(read_source(spec, cap, bad, bar.update, files))
        if num_proc > 1 and total_bytes(files) >= POOL_MIN_BYTES:
            ctx = multiprocessing.get_context("spawn")  # never fork a process that holds Ray or tokenizer threads
            pool = ctx.Pool(num_proc, _pool_init, (model, spec.format, max_len, train_on))
            wheres_q: list[list[Where]] = []

            def rows_only() -> Iterator[list[dict]]:
                for wheres, rows in chunks:
                    wheres_q.append(wheres)
                    yield rows

            encoded = ((wheres_q.pop(0), res) for res in pool.imap(_pool_encode, rows_only()))
        else:
            encoded = ((w, encode_chunk(r, spec.format, tokenizer, max_len, train_on)) for w, r in chunks)
        with open(tmp / "tokens.bin", "wb") as ft, open(tmp / "mask.bin", "wb") as fm:
            for wheres, enc in encoded:
                for i, why in enc.failed.items():
                    report.failed_count[why] = report.failed_count.get(why, 0) + 1
                    if len(report.failed.setdefault(why, [])) < 1 + SHOWN:
                        report.failed[why].append(str(wheres[i]))
                kept = [w for i, w in enumerate(wheres) if i not in enc.failed] if enc.failed else wheres
                for k in np.flatnonzero(enc.targets == 0).tolist():
                    report.targetless += 1
                    if len(report.targetless_first) < SHOWN:
                        report.targetless_first.append(str(kept[k]))
                enc.ids.tofile(ft)
                enc.mask.tofile(fm)
                lengths.append(enc.lengths)
                targets.append(enc.targets)
                file_ids.append(np.fromiter((file_index[w.file] for w in kept), np.uint16, len(kept)))
                lines.append(np.fromiter((w.line for w in kept), np.int64, len(kept)))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    lengths, targets, file_ids, lines = (
        np.concatenate(parts) if parts else np.zeros(0, dtype)
        for parts, dtype in ((lengths, np.int64), (targets, np.int32), (file_ids, np.uint16), (lines, np.int64))
    )
    report.rows, report.bad, report.bad_first = len(lengths), bad.count, bad.first
    report.tokens = int(lengths.sum())
    usable = report.rows > report.targetless and (skip_bad or not (report.bad or report.failed))
    if not commit or not usable:
        shutil.rmtree(tmp, ignore_errors=True)
        return report, None
    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / "offsets.bin")
    targets.tofile(tmp / "targets.bin")
    file_ids.tofile(tmp / "file.bin")
    lines.tofile(tmp / "line.bin")
    meta = {
        "version": CACHE_VERSION,
        "source": asdict(spec),
        "files": [{"path": f.path, "kind": f.kind} for f in files],
        "max_seq_len": max_len,
        "train_on": train_on,
        **{k: v for k, v in asdict(report).items() if k != "spec"},
    }
    (tmp / "meta.json").write_text(json.dumps(meta))
    final = root / key
    try:
        os.rename(tmp, final)
    except OSError:  # built meanwhile by another process (the same inputs give the same cache)
        shutil.rmtree(tmp, ignore_errors=True)
        if not is_whole(final):
            raise
    return report, final


def open_or_build(
    spec: SourceSpec,
    root: Path,
    enc: Encoding,
    tokenizer: Any,
    model: Any,
    num_proc: int = 1,
    progress: bool = True,
    commit: bool = True,
    skip_bad: bool = False,
) -> tuple[Report, SourceCache | None]:
    """The source's cache, built first if there is none (or a torn one). DataError when the source
    names no readable file."""
    files = resolve_files(spec)
    key = cache_key(spec, files, enc)
    final = root / key
    if final.exists():
        if is_whole(final):
            cache = SourceCache(final)
            return cache.report(spec), cache
        log.warning("the data cache %s is incomplete (torn); building it again", final)
        shutil.rmtree(final, ignore_errors=True)
    report, built = build(
        spec,
        files,
        root,
        key,
        tokenizer,
        model,
        enc.max_seq_len,
        enc.train_on,
        enc.row_cap,
        num_proc,
        progress,
        commit,
        skip_bad,
    )
    return report, SourceCache(built) if built is not None else None


def default_num_proc() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


__all__ = ["MAX_REPORTED", "Encoding", "Report", "SourceCache", "open_or_build"]
