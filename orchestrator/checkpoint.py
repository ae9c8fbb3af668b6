"""Committing checkpoints to disk, and deciding which ones are valid.

A checkpoint is written into a hidden temporary directory beside its final place, every file
is fsynced, the directory is renamed into place, and only then a marker file is written (and
fsynced). A directory without the marker is a torn write: it is never used.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")


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


def commit(final: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp_dir) and atomically publish tmp_dir as `final`. Refuses to replace an
    existing committed directory: nothing already saved is overwritten."""
    final = Path(final)
    if final.exists():
        if is_committed(final):
            raise FileExistsError(f"{final} is already a committed checkpoint; refusing to overwrite it")
        shutil.rmtree(final)  # an uncommitted leftover of a torn write
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    (final / MARKER).write_text("")
    _fsync_tree(final)
    return final


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


def prune(checkpoints_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` committed checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return []
    old = [p for _, p in step_checkpoints(checkpoints_dir)[:-keep_last]]
    for p in old:
        (p / MARKER).unlink()  # uncommit first, so a crash mid-delete leaves no half checkpoint that looks valid
        shutil.rmtree(p)
    return old
