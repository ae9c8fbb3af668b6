"""Watching a command's Ray Train workers from outside: their peak private memory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def peak_worker_uss(
    proc: subprocess.Popen, tick: Callable[[], None] | None = None, load_end: Path | None = None
) -> dict[str, dict[int, int]]:
    """Sample the USS (private resident bytes) of every Ray Train worker under `proc` every 20 ms
    until it exits. Returns each worker's peak by PID over the whole run ("run") and, with
    `load_end` (the run's summary.json, written when loading ends), before that file appeared
    ("load"). `tick` runs at every sample."""
    me, peaks, load = psutil.Process(proc.pid), {}, {}
    loading = load_end is not None
    while proc.poll() is None:
        if tick is not None:
            tick()
        loading = loading and not load_end.exists()
        try:
            kids = me.children(recursive=True)
        except psutil.Error:
            break
        for p in kids:
            try:
                if "RayTrainWorker" not in " ".join(p.cmdline()):
                    continue
                uss = p.memory_full_info().uss
            except psutil.Error:
                continue
            peaks[p.pid] = max(peaks.get(p.pid, 0), uss)
            if loading:
                load[p.pid] = max(load.get(p.pid, 0), uss)
        time.sleep(0.02)
    return {"run": peaks, "load": load}
