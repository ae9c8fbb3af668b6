"""Committing checkpoints to disk, and deciding which ones are valid.

A checkpoint is written into a hidden temporary directory beside its final place, every file
is fsynced, the directory is renamed into place, and only then a marker file is written (and
fsynced). A directory without the marker is a torn write: it is never used.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from orchestrator.rundir import MARKER, STATE, STEP_DIR, TRAINER_STATE


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_committed(path: Path) -> bool:
    return (path / MARKER).is_file()


def staging_dir(final: Path) -> Path:
    """Where `final` is written before it is published. Deterministic, so that every worker of a
    sharded save (DeepSpeed writes one file per rank) writes into the same directory."""
    return final.parent / f".{final.name}.tmp"


def stage(final: Path) -> Path:
    """Prepare an empty staging directory for `final` (one process calls this)."""
    final = Path(final)
    if is_committed(final):
        raise FileExistsError(f"{final} is already a committed checkpoint; refusing to overwrite it")
    tmp = staging_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a torn write
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> Path:
    """fsync the staged files, rename them into place, then write the marker (one process)."""
    if final.exists():
        shutil.rmtree(final)  # uncommitted: stage() refused committed ones
    _fsync_tree(tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    (final / MARKER).write_text("")
    _fsync_tree(final)
    return final


def commit(final: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir) and atomically publish tmp_dir as `final`. Refuses to replace an
    existing committed directory: nothing already saved is overwritten."""
    final = Path(final)
    tmp = stage(final)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish(tmp, final)


def clean_torn(checkpoints_dir: Path) -> list[Path]:
    """Remove what a crash mid-save left behind (staging dirs, step dirs without the marker)."""
    if not checkpoints_dir.is_dir():
        return []
    torn = [
        p
        for p in checkpoints_dir.iterdir()
        if p.is_dir() and (p.name.endswith(".tmp") or (STEP_DIR.match(p.name) and not is_committed(p)))
    ]
    for p in torn:
        shutil.rmtree(p)
    return torn


def step_checkpoints(checkpoints_dir: Path) -> list[tuple[int, Path]]:
    """Committed step-<N> directories, oldest first."""
    if not checkpoints_dir.is_dir():
        return []
    found = []
    for p in checkpoints_dir.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and is_committed(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def eval_loss(ckpt: Path) -> float | None:
    """The eval loss recorded with a step checkpoint, if its step was evaluated."""
    state = ckpt / STATE / TRAINER_STATE
    return json.loads(state.read_text()).get("eval_loss") if state.is_file() else None


def prune(checkpoints_dir: Path, keep_last: int, keep_best: bool = False) -> list[Path]:
    """Delete all but the newest `keep_last` committed checkpoints (0 keeps all), and with
    keep_best also spare the one with the lowest recorded eval loss."""
    if keep_last <= 0:
        return []
    found = [p for _, p in step_checkpoints(checkpoints_dir)]
    keep = set(found[-keep_last:])
    if keep_best:
        scored = [(loss, p) for p in found if (loss := eval_loss(p)) is not None]
        if scored:
            keep.add(min(scored)[1])
    old = [p for p in found if p not in keep]
    for p in old:
        (p / MARKER).unlink()  # uncommit first, so a crash mid-delete leaves no half checkpoint that looks valid
        shutil.rmtree(p)
    return old


def newest(checkpoints_dir: Path) -> Path | None:
    found = step_checkpoints(checkpoints_dir)
    return found[-1][1] if found else None
