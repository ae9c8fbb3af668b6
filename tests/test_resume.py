"""Checkpoints that survive crashes: kill the whole run and resume it, resume on a different
number of workers, and let Ray Train restart a worker group after one worker is SIGKILLed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import cli, read_metrics, train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

COMMON = ["experiment=demo", "tracking=none", "data.eval_fraction=0"]


def start(out: Path, *overrides: str) -> subprocess.Popen:
    """`orchestrator train` in its own session, so that the test can kill all of it."""
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train", *COMMON, f"output_dir={out}", *overrides],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def finish(proc: subprocess.Popen, out: Path) -> None:
    assert proc.wait(timeout=600) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started (driver, Ray daemons, workers)."""
    family = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs([p for p in map(_proc, family) if p], timeout=30)


def _proc(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def steps_logged(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m]


# zero3 trains with dropout, so the resumed RNG states must be the saved ones; fsdp without, so
# that its checkpoint resumed on one worker (other dropout streams) can be compared too.
@pytest.mark.parametrize("strategy,dropout", [("fsdp", 0.0), ("zero3", 0.1)])
def test_killed_run_resumes_to_the_same_adapter(tmp_path, demo_model, ray_local, strategy, dropout):
    # 20 steps, the kill lands right after step 5 is committed: long before the run could end.
    extra = [
        f"strategy={strategy}",
        "optim=paged_adamw_32bit",
        f"adapter.dropout={dropout}",
        "trainer.max_steps=20",
        "trainer.save_every=5",
    ]
    train(tmp_path / "whole", "data.eval_fraction=0", *extra)  # the reference, uninterrupted, on the session's Ray

    out = tmp_path / "killed"
    proc = start(out, *extra)
    wait_for(out / "checkpoints" / "step-5" / "COMMITTED", proc)
    kill_session(proc)
    assert not (out / "adapter").exists()
    # What a kill during a later save leaves on disk: a staging dir, and a step dir whose marker
    # was never written. Neither may be used.
    for torn in (out / "checkpoints" / ".step-15.tmp", out / "checkpoints" / "step-15"):
        shutil.rmtree(torn, ignore_errors=True)
        (torn / "adapter").mkdir(parents=True)
        (torn / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")

    resumed = start(out, *extra)  # the same command again
    finish(resumed, out)
    log = (tmp_path / "killed.log").read_text()
    assert f"resuming from {out / 'checkpoints' / 'step-5'} at step 5" in log
    assert "removed incomplete checkpoint" in log
    a, b = adapter(tmp_path / "whole"), adapter(out)
    assert a.keys() == b.keys()
    for k in a:  # CPU kernels and the 2-rank gloo sum are deterministic: bit for bit
        assert torch.equal(a[k], b[k]), k
    assert steps_logged(out) == list(range(1, 21))

    if strategy == "fsdp":
        # The same checkpoint resumed on 1 worker (micro batch doubled: same global batch).
        one = train(
            tmp_path / "one-worker",
            "data.eval_fraction=0",
            *extra,
            f"resume={out / 'checkpoints' / 'step-5'}",
            "cluster.num_workers=1",
            "strategy=single",
            "trainer.micro_batch_size=8",
        )
        # ...and the reverse: that 1-worker run's step-10 checkpoint resumed on 2 workers.
        two = train(
            tmp_path / "two-workers", "data.eval_fraction=0", *extra, f"resume={one / 'checkpoints' / 'step-10'}"
        )
        for resharded in (adapter(one), adapter(two)):
            for k in a:  # one process sums the batch in another order: equal to rounding
                torch.testing.assert_close(resharded[k], a[k], rtol=1e-5, atol=1e-7)


def test_different_run_in_same_output_dir_is_refused(tmp_path, demo_model, ray_local):
    out = train(tmp_path / "run", "data.eval_fraction=0", "trainer.max_steps=5", "trainer.save_every=5")
    before = {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()}
    proc = cli("train", *COMMON, f"output_dir={out}", "adapter.r=4")
    assert proc.returncode == 1 and "adapter.r: 16 -> 4" in proc.stderr, proc.stderr
    assert {p: p.stat().st_mtime for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_worker_killed_mid_run_is_restarted_from_checkpoint(tmp_path, demo_root):
    out = tmp_path / "crash"
    proc = start(out, "trainer.max_steps=12", "trainer.save_every=3", "cluster.max_failures=1")
    wait_for(out / "checkpoints" / "step-3" / "COMMITTED", proc)
    workers = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())
    ]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    finish(proc, out)
    assert "resuming from" in (tmp_path / "crash.log").read_text()  # the restarted group used step-3 or later
    assert steps_logged(out) == list(range(1, 13))  # no step missing or twice
    assert (out / "adapter" / "COMMITTED").is_file()
