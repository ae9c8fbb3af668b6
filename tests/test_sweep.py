"""Hydra multirun sweeps on the local target."""

from __future__ import annotations

import subprocess
import sys


def test_failed_run_does_not_stop_the_sweep(tmp_path, demo_root):
    sweep = tmp_path / "sweep"
    r = subprocess.run(
        [sys.executable, "-m", "orchestrator", "train", "-m", "experiment=demo", "adapter.r=0,4", "trainer.max_steps=2",
         "trainer.save_every=0", "tracking=none", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 run(s) of the sweep failed" in r.stderr and "adapter.r: must be a positive integer, got 0" in r.stdout + r.stderr
    runs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    failed = next(p for n, p in runs.items() if "adapter.r=0" in n)
    done = next(p for n, p in runs.items() if "adapter.r=4" in n)
    assert "error: invalid configuration" in (failed / "train.log").read_text()
    assert not (failed / "adapter").exists()
    assert (done / "adapter" / "COMMITTED").is_file()  # the sweep went on after the failure
