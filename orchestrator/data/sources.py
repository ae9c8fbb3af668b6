"""Where rows come from: what a data.path names, and reading its files row by row.

A data.path is one of (tried in this order):
  - a glob (`/data/shards/*.parquet`, `/data/**/*.jsonl`): the matching data files, sorted;
  - a file: .jsonl, .json (an array of objects, or JSON lines), .csv, .parquet, .arrow (Arrow IPC
    file or stream); any other name is read as JSON lines;
  - a directory written by `datasets`' save_to_disk (a Dataset, or a DatasetDict whose split
    data.split is taken): its Arrow files;
  - any other directory: its data files, split by name the way `datasets` splits a hub repository
    (train-*.parquet, data/test.jsonl...; files without a split name are all `train`);
  - a hub dataset name (`org/name`): the snapshot in the local Hugging Face cache (HF_HUB_CACHE),
    downloaded first unless HF_HUB_OFFLINE=1, then read as a directory.

Every row is located for problem reports: `file:line` for line-based files (JSON lines, JSON
arrays, CSV), `file:row N` (0-based, as `dataset[N]`) for Parquet and Arrow.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.data.formats import (
    MAX_REPORTED,
    DataError,
    _human,
    canonical,
    field_at_end,
    jsonl_rows,
)

KINDS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
# A hub repository id: owner/name, as the Hub spells them (and not a path to a data file).
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
COLUMNAR = ("parquet", "arrow")
_BATCH = 1024


@dataclass(frozen=True)
class SourceSpec:
    """One source of rows: a data.path (or a data.mix entry) and how its rows are read."""

    path: str
    format: str = "alpaca"
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"


@dataclass(frozen=True)
class DataFile:
    path: str
    kind: str


@dataclass(frozen=True)
class Where:
    """Where a row is: its file and line (line-based files) or 0-based row index (columnar)."""

    file: str
    line: int
    columnar: bool = False

    def __str__(self) -> str:
        return f"{self.file}:row {self.line}" if self.columnar else f"{self.file}:{self.line}"


class BadRows:
    """The rows that are not rows of the format: how many, and the first MAX_REPORTED of them."""

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, where: Where | str, reason: str) -> None:
        self.count += 1
        if len(self.first) < MAX_REPORTED:
            self.first.append(f"{where}: {reason}")

    def error(self) -> DataError:
        return DataError(self.first, total=self.count)


# --- what a data.path names ---------------------------------------------------------------------


def _kind(path: str) -> str:
    return KINDS.get(Path(path).suffix.lower(), "jsonl")


def _supported(paths: list[str]) -> list[DataFile]:
    return [DataFile(p, KINDS[Path(p).suffix.lower()]) for p in paths if Path(p).suffix.lower() in KINDS]


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def resolve_files(spec: SourceSpec) -> list[DataFile]:
    """The data files `spec.path` names, in reading order, or DataError saying why there are none."""
    path = spec.path
    if glob.has_magic(path):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        files = _supported(matches)
        if not files:
            found = f"; it matches {len(matches)} file(s) of no data kind ({_listing(matches)})" if matches else ""
            raise DataError([f"{path}: matches no data file ({', '.join(KINDS)}){found}"])
        return files
    p = Path(path)
    if p.is_file():
        return [DataFile(path, _kind(path))]
    if p.is_dir():
        return _directory(p, spec.split)
    if p.exists():
        raise DataError([f"{path}: is not a regular file; expected a data file, a directory of them, or a glob"])
    if _REPO_ID.match(path) and Path(path).suffix.lower() not in KINDS:
        return _directory(_hub_snapshot(path), spec.split, shown=path)
    raise DataError([f"{path}: no such file"])


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot of a hub dataset, or DataError. Never downloaded: every worker resolves
    the name again, and N workers fetching one dataset at start-up is no place for a download."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not in the cache, or an unknown name: said as such
        offline = " and HF_HUB_OFFLINE=1" if constants.HF_HUB_OFFLINE else ""
        raise DataError(
            [
                f"{repo_id}: no such file or directory, and not a dataset in the local Hugging Face cache "
                f"({constants.HF_HUB_CACHE}){offline}: {type(e).__name__}; download it first "
                f"(`hf download --repo-type dataset {repo_id}`) or give a local path"
            ]
        ) from None


def _directory(d: Path, split: str, shown: str | None = None) -> list[DataFile]:
    shown = shown or str(d)
    if (d / "state.json").is_file() or (d / "dataset_dict.json").is_file():
        return _saved_dataset(d, split, shown)
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        splits = DataFilesDict.from_patterns(get_data_patterns(str(d)), base_path=str(d))
    except Exception:  # noqa: BLE001 - datasets' EmptyDatasetError and kin: no data file at all
        splits = {}
    by_split = {str(k): _supported([str(f) for f in v]) for k, v in splits.items()}
    by_split = {k: v for k, v in by_split.items() if v}
    if not by_split:
        raise DataError([f"{shown}: is a directory that holds no data files ({', '.join(KINDS)})"])
    if split not in by_split:
        raise DataError([f"{shown}: has no split {split!r} (data.split); its splits: {', '.join(sorted(by_split))}"])
    return by_split[split]


def _saved_dataset(d: Path, split: str, shown: str) -> list[DataFile]:
    """The Arrow files of a `save_to_disk` directory, through `datasets` (memory-mapped, not copied)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(d))
    except Exception as e:  # noqa: BLE001 - a damaged save: named with datasets' reason
        raise DataError([f"{shown}: cannot be loaded as a saved dataset: {type(e).__name__}: {e}"]) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError([f"{shown}: has no split {split!r} (data.split); its splits: {', '.join(sorted(ds))}"])
        ds = ds[split]
    return [DataFile(f["filename"], "arrow") for f in ds.cache_files]


# --- reading rows -------------------------------------------------------------------------------


def read_raw(
    f: DataFile, cap: int | None, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[Where, dict | None, str | None]]:
    """(where, row, None) or (where, None, why it is not a row) for every row of one file."""
    try:
        if f.kind == "jsonl":
            with open(f.path, "rb") as fh:
                for line, row, why in jsonl_rows(fh, cap, progress):
                    yield Where(f.path, line), row, why
        elif f.kind == "json":
            yield from _json_rows(f, cap, progress)
        elif f.kind == "csv":
            yield from _csv_rows(f, cap, progress)
        else:
            yield from _columnar_rows(f, cap, progress)
    except OSError as e:
        raise DataError([f"{f.path}: cannot be read ({e.strerror or e})"]) from None


def _json_rows(f: DataFile, cap: int | None, progress: Callable[[int], None] | None) -> Iterator:
    raw = Path(f.path).read_bytes()
    body = raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw
    if not body.lstrip().startswith(b"["):  # JSON lines under a .json name, as `datasets` reads them
        with open(f.path, "rb") as fh:
            for line, row, why in jsonl_rows(fh, cap, progress):
                yield Where(f.path, line), row, why
        return
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        start = e.start + len(raw) - len(body)
        line = raw.count(b"\n", 0, start) + 1
        column = start - (raw.rfind(b"\n", 0, start) + 1) + 1
        yield (
            Where(f.path, line),
            None,
            f"not valid UTF-8: byte 0x{raw[start]:02x} at column {column} (file offset {start}); save the file as UTF-8",
        )
        return
    decoder = json.JSONDecoder()
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    ws = re.compile(r"[\s,]*")
    while True:
        skip = ws.match(text, pos).end()
        line += text.count("\n", pos, skip)
        pos = skip
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError) as e:
            yield Where(f.path, line), None, f"not valid JSON ({getattr(e, 'msg', e)}); the rest of the array is unread"
            return
        if cap is not None and end - pos > cap:
            yield Where(f.path, line), None, _over_cap(end - pos, cap, text[pos : pos + cap])
        elif not isinstance(value, dict):
            yield Where(f.path, line), None, f"expected a JSON object, got {type(value).__name__}"
        else:
            yield Where(f.path, line), value, None
        line += text.count("\n", pos, end)
        if progress is not None:
            progress(end - pos)
        pos = end


def _over_cap(size: int, cap: int, prefix: str) -> str:
    from orchestrator.data.formats import MIN_ROW_CAP, ROW_BYTES_PER_TOKEN

    inside = field_at_end(prefix)
    return (
        f"row of {_human(size)} is over the cap of {_human(cap)}{f' in field {inside!r}' if inside else ''} "
        f"({ROW_BYTES_PER_TOKEN} bytes per token of data.max_seq_len, at least {_human(MIN_ROW_CAP)}): "
        "truncation would drop nearly all of it; split or shorten the row, or raise data.max_seq_len"
    )


def _csv_rows(f: DataFile, cap: int | None, progress: Callable[[int], None] | None) -> Iterator:
    bad_lines: dict[int, str] = {}

    def lines() -> Iterator[str]:
        with open(f.path, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if progress is not None:
                    progress(len(raw))
                if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    bad_lines[n] = (
                        f"not valid UTF-8: byte 0x{raw[e.start]:02x} at column {e.start + 1}; save the file as UTF-8"
                    )
                    yield raw.decode("utf-8", errors="replace")

    csv.field_size_limit(max(cap or 0, 1 << 30))
    reader = csv.reader(lines())
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        yield Where(f.path, 1), None, f"not valid CSV ({e})"
        return
    end = reader.line_num
    while True:
        start = end + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield Where(f.path, start), None, f"not valid CSV ({e}); the rest of the file is unread"
            return
        end = reader.line_num
        why = next((bad_lines[n] for n in range(start, end + 1) if n in bad_lines), None)
        if why:
            yield Where(f.path, start), None, why
        elif not any(values):
            continue
        elif len(values) != len(header):
            yield Where(f.path, start), None, f"has {len(values)} fields but the header names {len(header)}"
        elif cap is not None and (size := sum(len(v) for v in values)) > cap:
            widest = header[max(range(len(values)), key=lambda i: len(values[i]))]
            yield Where(f.path, start), None, _over_cap(size, cap, "") + f" (field {widest!r})"
        else:
            yield Where(f.path, start), dict(zip(header, values)), None


def _size(value: object) -> int:
    """Roughly the bytes of JSON a value takes (its strings' lengths)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, dict):
        return sum(len(str(k)) + _size(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return 8


def _columnar_rows(f: DataFile, cap: int | None, progress: Callable[[int], None] | None) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = os.path.getsize(f.path)
    try:
        if f.kind == "parquet":
            pf = pq.ParquetFile(f.path)
            total, batches = pf.metadata.num_rows, pf.iter_batches(batch_size=_BATCH)
        else:
            source = pa.memory_map(f.path)
            try:
                reader = pa.ipc.open_file(source)
                total = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_stream(source)
                total, batches = None, iter(reader)
    except (pa.ArrowException, OSError) as e:
        what = "Parquet" if f.kind == "parquet" else "Arrow (IPC file or stream)"
        raise DataError([f"{f.path}: is not a readable {what} file ({e})"]) from None
    index = 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                if cap is not None and (n := _size(row)) > cap:
                    widest = max(row, key=lambda k: _size(row[k]))
                    yield Where(f.path, index, True), None, _over_cap(n, cap, "") + f" (field {widest!r})"
                else:
                    yield Where(f.path, index, True), row, None
                index += 1
            if progress is not None:
                progress(int(size * batch.num_rows / total) if total else 0)
    except (pa.ArrowException, OSError) as e:
        yield Where(f.path, index, True), None, f"cannot be read from here on ({e})"


def read_source(
    spec: SourceSpec,
    cap: int | None = None,
    bad: BadRows | None = None,
    progress: Callable[[int], None] | None = None,
    files: list[DataFile] | None = None,
) -> Iterator[tuple[Where, dict]]:
    """(where, canonical row) of every good row of the source, in one pass. Bad rows go to `bad`
    when given (the caller decides); without it, DataError names them once the source is read.
    DataError too when the source holds no row at all."""
    mine = bad is None
    bad = BadRows() if mine else bad
    files = resolve_files(spec) if files is None else files
    n = 0
    for f in files:
        for where, row, why in read_raw(f, cap, progress):
            if row is not None:
                row, why = canonical(row, spec.format, spec.columns)
            if why:
                bad.add(where, why)
            else:
                n += 1
                yield where, row
    if mine and bad.count:
        raise bad.error()
    if not n and not bad.count:
        raise DataError([f"{spec.path}: contains no rows"])


def total_bytes(files: list[DataFile]) -> int:
    return sum(os.path.getsize(f.path) for f in files)
