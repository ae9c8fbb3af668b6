"""A CPU worker of a distributed run (2 workers or more, any strategy) has glibc unmap freed
blocks of 128 KiB and more (orchestrator.distributed.keep_freed_blocks_unmapped): without it, once a
larger block has been freed, smaller ones come from the heap and stay resident after they are
freed. Blocks under that threshold still come from the heap: after each step the worker hands its
free pages back (release_freed_heap)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from orchestrator.distributed import current_memory_bytes, keep_freed_blocks_unmapped

    if sys.argv[1] == "release":
        keep_freed_blocks_unmapped()
    big = torch.ones((8 << 20) // 4)  # a mapped 8 MiB block: freeing it raises glibc's threshold
    del big
    # 200 MiB in 2 MiB blocks, like a step's gathered layers, each followed by a small tensor that
    # stays (the step's other allocations), so that freeing them leaves holes glibc cannot trim.
    blocks, pins = [], []
    for _ in range(100):
        blocks.append(torch.ones((2 << 20) // 4))
        pins.append(torch.ones((100 << 10) // 4))
    held = current_memory_bytes(torch.device("cpu"))
    del blocks
    print((held - current_memory_bytes(torch.device("cpu"))) >> 20)
""")


def released_mib(mode: str, env: dict | None = None, script: str = SCRIPT) -> int:
    r = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, env=env, check=True)
    return int(r.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_go_back_to_the_os_only_when_asked():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert released_mib("keep", env) < 20  # glibc's default: the freed 200 MiB stays resident
    assert released_mib("release", env) > 180
    # A threshold the user chose is theirs: 32 MiB keeps the 2 MiB blocks in the heap.
    assert released_mib("release", {**env, "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}) < 20


TRIM = textwrap.dedent("""
    import sys
    import torch
    from orchestrator.distributed import current_memory_bytes, keep_freed_blocks_unmapped, release_freed_heap

    keep_freed_blocks_unmapped()
    # 200 MiB of 64 KiB blocks (a short sequence's small activations: under the 128 KiB threshold,
    # so from the heap), each followed by a small tensor that stays, as a step leaves them.
    blocks, pins = [], []
    for _ in range(3200):
        blocks.append(torch.ones((64 << 10) // 4))
        pins.append(torch.ones((2 << 10) // 4))
    held = current_memory_bytes(torch.device("cpu"))
    del blocks
    if sys.argv[1] == "trim":
        release_freed_heap()
    print((held - current_memory_bytes(torch.device("cpu"))) >> 20)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_free_heap_pages_go_back_after_a_step():
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    assert released_mib("keep", env, TRIM) < 20  # under the threshold: held in the heap's holes once freed
    assert released_mib("trim", env, TRIM) > 180
