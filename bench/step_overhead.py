"""What the step loop's host work costs per step: the sync (stop-file check, the all-reduce of
losses, grad norms to the host, the loss checks, metrics rows, memory figures, the progress bar)
timed apart from the steps, once syncing after every step (trainer.sync_every_s=0, what every
step paid before) and once with the default windows.

    python bench/step_overhead.py            # the demo model in this process, one worker, CPU

One worker in this process (the recipe the tests run in-process): the all-reduce of a real
multi-worker run adds one collective per sync on top. Writes bench/results/step-overhead-cpu.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 120


def measure(out: Path, sync_every_s: float) -> dict:
    from orchestrator import driver, train_loop
    from orchestrator.config import as_dict, compose, validate

    run = validate(
        compose(
            [
                "experiment=demo",
                "tracking=none",
                "strategy=single",
                "cluster.num_workers=1",
                "trainer.micro_batch_size=8",
                f"trainer.max_steps={STEPS}",
                "trainer.save_every=0",
                "data.eval_fraction=0",
                f"trainer.sync_every_s={sync_every_s}",
                f"output_dir={out}",
            ]
        )
    )
    syncs: list[tuple[int, float]] = []
    real_sync = train_loop.sync

    def timed(job, pending, window_start):
        t0 = time.perf_counter()
        stop = real_sync(job, pending, window_start)
        syncs.append((len(pending), time.perf_counter() - t0))
        return stop

    train_loop.sync = timed
    try:
        driver.prepare_output_dir(run)
        t0 = time.perf_counter()
        train_loop.train_loop({"run": as_dict(run)})
        wall = time.perf_counter() - t0
    finally:
        train_loop.sync = real_sync
    later = syncs[2:]  # the first two windows are one step each, while step time is measured
    host = sum(s for _, s in later) / sum(n for n, _ in later)
    return {
        "sync_every_s": sync_every_s,
        "syncs": len(syncs),
        "steps": STEPS,
        "median_sync_ms": 1e3 * statistics.median(s for _, s in later),
        "host_ms_per_step": 1e3 * host,
        "run_s": wall,
    }


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="step-overhead-"))
    results = [measure(work / f"{i}-sync-{s}", s) for i, s in enumerate((0.0, 1.0, 0.0, 1.0))]
    by = {
        s: min((r for r in results if r["sync_every_s"] == s), key=lambda r: r["host_ms_per_step"]) for s in (0.0, 1.0)
    }
    for r in by.values():
        print(
            f"sync_every_s={r['sync_every_s']:g}: {r['syncs']} syncs for {r['steps']} steps, "
            f"{r['median_sync_ms']:.2f} ms per sync, {r['host_ms_per_step']:.3f} ms of host work per step"
        )
    dest = HERE / "results" / "step-overhead-cpu.json"
    dest.write_text(json.dumps({"machine": sys.platform, "results": list(by.values())}, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
