"""This worker's place in the process group, and the few collectives the loop needs."""

from __future__ import annotations

import ctypes
import functools
import os
import resource
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @classmethod
    def current(cls, use_gpu: bool) -> Dist:
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device("cpu")
        if use_gpu:
            from ray.train.torch import get_device  # the GPU Ray assigned to this worker

            device = get_device()
            torch.cuda.set_device(device)
        return cls(rank, world, local, device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce(self, value: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
        value = value.detach().clone().to(self.device)
        if self.world > 1:
            dist.all_reduce(value, op=op)
        return value

    def max(self, value: float) -> float:
        return self.all_reduce(torch.tensor(float(value)), op=dist.ReduceOp.MAX).item()


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this worker has held since reset_peak_memory: CUDA's allocated bytes, or on
    CPU the process's resident high-water mark (VmHWM; ru_maxrss where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    hwm = _proc_status_bytes("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _proc_status_bytes("VmRSS") or 0


# glibc's mallopt parameter: the size from which a block is mapped on its own, and unmapped when freed.
# At 1 MiB a short sequence's activations (a 64-token hidden state of 1536: 384 KiB) and NF4's
# dequantization scratch came from the heap and their holes stayed resident through the step.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 10


def unmaps_freed_blocks(device: str, workers: int) -> bool:
    """Whether a worker on `device` among `workers` calls keep_freed_blocks_unmapped and returns
    its free heap pages after each step (train_loop.setup; the planner counts less retained
    activation memory for it): CPU workers of a distributed run, whose memory the planner's
    figures are for. A single local worker keeps glibc's defaults: its steps are the throughput
    benchmark's, and page faults on every large block cost it up to 15% there (README)."""
    return device == "cpu" and workers > 1 and "MALLOC_MMAP_THRESHOLD_" not in os.environ


def keep_freed_blocks_unmapped() -> None:
    """Have glibc return freed blocks of 128 KiB and more to the OS from now on (a CPU worker of a
    distributed run calls it; see the README, "Memory planner").

    By default glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB);
    blocks under it then come from the heap and stay resident once freed, so a worker that
    gathers and frees every layer each step grows far past what it holds, by a different amount
    each run (bench/results/plan-calibration-cpu-glibc.json). A threshold the user set
    (MALLOC_MMAP_THRESHOLD_) is left alone, and so is a libc that is not glibc."""
    mallopt = _glibc("mallopt")
    if mallopt is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_freed_heap() -> None:
    """Hand the heap's free pages back to the OS (glibc's malloc_trim), after each step of a worker
    that keeps freed blocks unmapped: blocks under the threshold come from the heap, and the holes
    they leave between blocks still in use stay resident, so the next step's peak began a step's
    worth of them higher (the 1.6 GB base under zero3 at a 1 MiB threshold: 250 MiB). A few
    milliseconds a step; nothing on other libcs."""
    malloc_trim = _glibc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


@functools.cache
def _glibc(name: str) -> Callable[..., int] | None:
    """glibc's function `name`, looked up once per process (release_freed_heap runs every step);
    None on a libc without it."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak from what is held now, so that loading and the steps are measured apart
    (and a run in a long-lived process, like a test's, is not charged with what came before)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the peak then stays the process's own since it started


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None
