"""The run's data: its sources (data.path or data.mix, and data.eval_path), each tokenized once
into a shared cache (cache.py), mixed by weight and split into train and eval rows by index.

Validation prepares the caches on the driver (`prepare`, its pass over the data); each worker then
opens them memory-mapped (`open_data`) and reads only the rows of its own micro-batches. The split
and the mixture are index arrays computed from row counts and trainer.seed, the same on every
worker, so changing eval_fraction or the weights reuses the caches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config.schema import RunConfig
from orchestrator.data import packing
from orchestrator.data.cache import Encoding, Report, SourceCache, default_num_proc, open_or_build, tokenizer_digest
from orchestrator.data.formats import DataError, row_byte_cap, split_indices
from orchestrator.data.sources import SourceSpec
from orchestrator.data.tokenize import collate

log = logging.getLogger("orchestrator")


@dataclass
class Source:
    field: str
    """How problems name it: data.path, data.mix[1], data.eval_path."""
    spec: SourceSpec
    weight: float = 1.0


def train_sources(run: RunConfig) -> list[Source]:
    d = run.data
    if d.mix:
        return [
            Source(
                f"data.mix[{i}]",
                SourceSpec(
                    m.path,
                    m.format or d.format,
                    dict(d.columns if m.columns is None else m.columns),
                    m.split or d.split,
                ),
                m.weight,
            )
            for i, m in enumerate(d.mix)
        ]
    return [Source("data.path", SourceSpec(d.path, d.format, dict(d.columns), d.split))] if d.path else []


def eval_source(run: RunConfig) -> Source | None:
    d = run.data
    if not d.eval_path:
        return None
    return Source("data.eval_path", SourceSpec(d.eval_path, d.format, dict(d.columns), d.eval_split or d.split))


def encoding(run: RunConfig, tokenizer: Any) -> Encoding:
    from orchestrator.model import resolve_model_path

    d = run.data
    return Encoding(
        tokenizer_digest(resolve_model_path(run.model.path), tokenizer),
        d.max_seq_len,
        d.train_on,
        row_byte_cap(min(max(d.max_seq_len, 0), 1 << 24)),
    )


def cache_root(run: RunConfig) -> Path:
    from orchestrator.rundir import data_cache_root

    return data_cache_root(run.storage_path, run.data.cache_dir)


@dataclass
class Prepared:
    source: Source
    report: Report | None
    cache: SourceCache | None
    error: DataError | None = None


def prepare(run: RunConfig, tokenizer: Any, progress: bool = True, commit: bool = True) -> list[Prepared]:
    """Every source of the run, its cache opened or built (validation's one pass over the rows)."""
    enc = encoding(run, tokenizer)
    root = cache_root(run)
    out = []
    sources = [*train_sources(run), *filter(None, [eval_source(run)])]
    for s in sources:
        try:
            report, cache = open_or_build(
                s.spec,
                root,
                enc,
                tokenizer,
                run.model,
                run.data.num_proc or default_num_proc(),
                progress,
                commit,
                skip_bad=run.data.on_bad_row == "skip",
            )
        except DataError as e:
            out.append(Prepared(s, None, None, e))
            continue
        out.append(Prepared(s, report, cache))
    return out


class TokenizedRows:
    """Rows of one or more source caches, by index: what the sampler and the steps index into.
    Reading a row touches only its slice of the memory-mapped tokens."""

    def __init__(self, caches: list[SourceCache], src: np.ndarray, row: np.ndarray):
        self.caches, self.src, self.row = caches, src.astype(np.int32), row.astype(np.int64)

    def __len__(self) -> int:
        return len(self.row)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self.caches[self.src[i]].example(int(self.row[i]))

    def length(self, i: int) -> int:
        c, r = self.caches[self.src[i]], int(self.row[i])
        return int(c.offsets[r + 1] - c.offsets[r])

    collate = staticmethod(collate)

    def example_lengths(self, i: int) -> list[int]:
        """The lengths of the examples in row i (one; a packed row has several)."""
        return [self.length(i)]

    def lengths(self) -> np.ndarray:
        """Every row's token count, from the offsets alone."""
        out = np.empty(len(self), np.int64)
        for k, c in enumerate(self.caches):
            sel = self.src == k
            r = self.row[sel]
            out[sel] = c.offsets[r + 1] - c.offsets[r]
        return out

    def target_tokens(self, indices: Any) -> int:
        return sum(int(self.caches[self.src[i]].targets[self.row[i]]) for i in indices)

    def where(self, i: int) -> str:
        return self.caches[self.src[i]].where(int(self.row[i]))


def _weighted(idx: np.ndarray, weight: float, seed: int) -> np.ndarray:
    """Each row `int(weight)` times, and a seeded `weight % 1` share of them once more."""
    import torch

    whole, frac = int(weight), weight - int(weight)
    extra = round(frac * len(idx))
    parts = [np.tile(idx, whole)]
    if extra:
        perm = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed)).numpy()
        parts.append(idx[np.sort(perm[:extra])])
    return np.concatenate(parts)


def split(
    run: RunConfig, caches: list[SourceCache], eval_cache: SourceCache | None
) -> tuple[TokenizedRows, TokenizedRows]:
    """Train rows (each source's, weighted, less its eval share) and eval rows, by index."""
    d, seed = run.data, run.trainer.seed
    sources = train_sources(run)
    t_src, t_row, e_src, e_row = [], [], [], []
    for k, (s, c) in enumerate(zip(sources, caches)):
        if eval_cache is None:
            train_idx, eval_idx = (np.asarray(x, np.int64) for x in split_indices(len(c), d.eval_fraction, seed))
        else:
            train_idx, eval_idx = np.arange(len(c), dtype=np.int64), np.zeros(0, np.int64)
        train_idx = train_idx if s.weight == 1 else _weighted(train_idx, s.weight, seed + k)
        t_src.append(np.full(len(train_idx), k)), t_row.append(train_idx)
        e_src.append(np.full(len(eval_idx), k)), e_row.append(eval_idx)
    all_caches = list(caches)
    if eval_cache is not None:
        all_caches.append(eval_cache)
        e_src, e_row = [np.full(len(eval_cache), len(caches))], [np.arange(len(eval_cache), dtype=np.int64)]
    train = TokenizedRows(all_caches, np.concatenate(t_src), np.concatenate(t_row))
    evals = TokenizedRows(
        all_caches, np.concatenate(e_src) if e_src else np.zeros(0), np.concatenate(e_row) if e_row else np.zeros(0)
    )
    return train, evals


def train_rows(run: RunConfig, sizes: list[int], eval_given: bool) -> int:
    """How many training rows the sources of these sizes give (for validation's batch check)."""
    n = 0
    for s, size in zip(train_sources(run), sizes):
        kept = size if eval_given else size - int(size * run.data.eval_fraction)
        n += int(s.weight) * kept + round((s.weight - int(s.weight)) * kept)
    return n


def open_data(run: RunConfig, tokenizer: Any) -> tuple[TokenizedRows | packing.PackedRows, TokenizedRows]:
    """A worker's view of the run's data, from the caches validation built (built here, without a
    progress bar, should one be missing: a worker restarted after the cache was removed)."""
    prepared = prepare(run, tokenizer, progress=False)
    missing = [p for p in prepared if p.cache is None]
    if missing:
        p = missing[0]
        raise DataError([f"{p.source.field}: {p.error or 'no usable rows'} (validation reports why)"])
    train, evals = _split(run, prepared)
    if not packing.enabled(run):
        return train, evals
    packed = packing.PackedRows(train, run.data.max_seq_len, run.trainer.seed)
    log.info(
        "data.packing: %d examples in %d rows of up to %d tokens, %.0f%% of them real tokens",
        len(train),
        len(packed),
        run.data.max_seq_len,
        100 * packed.fill(),
    )
    return packed, evals


def packed_train_rows(run: RunConfig, prepared: list[Prepared]) -> packing.PackedRows:
    """The packed training rows of prepared sources (validation's count of them)."""
    return packing.PackedRows(_split(run, prepared)[0], run.data.max_seq_len, run.trainer.seed)


def _split(run: RunConfig, prepared: list[Prepared]) -> tuple[TokenizedRows, TokenizedRows]:
    caches = [p.cache for p in prepared]
    eval_cache = caches.pop() if eval_source(run) is not None else None
    return split(run, caches, eval_cache)
