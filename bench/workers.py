"""Watching a command's Ray Train workers from outside: their peak private memory."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import psutil


def peak_worker_uss(proc: subprocess.Popen, tick: Callable[[], None] | None = None) -> dict[int, int]:
    """Sample the USS (private resident bytes) of every Ray Train worker under `proc` every 50 ms
    until it exits; return each worker's peak by PID. `tick` runs at every sample."""
    me, peaks = psutil.Process(proc.pid), {}
    while proc.poll() is None:
        if tick is not None:
            tick()
        try:
            kids = me.children(recursive=True)
        except psutil.Error:
            break
        for p in kids:
            try:
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_full_info().uss)
            except psutil.Error:
                pass
        time.sleep(0.05)
    return peaks
