"""Checkpoints that survive crashes: kill -9 the whole command and resume it, resume on a different
number of workers, and let Ray Train restart a worker group after one worker is SIGKILLed.
(DeepSpeed's partitioned state and the RNG streams coming back exactly: test_interrupt.py.)

Only the run that is killed needs a command of its own; references and resumptions train on the
test session's Ray (conftest.train), through the same driver.train the command calls."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import (
    ONE_PROCESS,
    adapter_tensors,
    assert_same_adapter,
    cli,
    equivalence_overrides,
    read_metrics,
    start_train,
    train,
)

from orchestrator.rundir import RunDir

pytestmark = pytest.mark.slow


def start(out: Path, *overrides: str) -> subprocess.Popen:
    """`orchestrator train` in its own session, so that the test can kill all of it."""
    return start_train(
        out.parent / f"{out.name}.log", "experiment=demo", "tracking=none", f"output_dir={out}", *overrides
    )


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


def steps_logged(out: Path) -> list[int]:
    return [m["step"] for m in read_metrics(out) if "loss" in m]


def replaced(overrides: list[str], *new: str) -> list[str]:
    """`overrides` with the keys of `new` set to their new values (Hydra refuses a key twice)."""
    keys = {o.split("=", 1)[0] for o in new}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + list(new)


def test_killed_run_resumes_to_the_same_adapter(tmp_path, equivalence_run):
    """The 2-worker FSDP NF4 equivalence run (10 steps), killed with its whole command after step 5
    is committed and run again, ends with the uninterrupted run's adapter; its step-5 checkpoint
    also continues on one worker."""
    reference = equivalence_run("fp32-nf4", "fsdp")
    extra = replaced(equivalence_overrides("fp32-nf4", "fsdp"), "trainer.save_every=5")  # saving changes no numbers

    out = tmp_path / "killed"
    proc = start(out, *extra)
    step5 = out / "checkpoints" / "step-5"
    wait_for(step5 / "COMMITTED", proc)
    kill_session(proc)  # the remaining steps, eval and final save take far longer than this
    assert not (out / "adapter").exists()
    committed_at = (step5 / "COMMITTED").stat().st_mtime_ns
    # What a kill during a later save leaves on disk: a staging dir, and a step dir whose marker
    # was never written. Neither may be used.
    for torn in (out / "checkpoints" / ".step-10.tmp", out / "checkpoints" / "step-10"):
        shutil.rmtree(torn, ignore_errors=True)
        (torn / "adapter").mkdir(parents=True)
        (torn / "adapter" / "adapter_model.safetensors").write_bytes(b"torn")

    assert RunDir(out).lock_file.exists()  # the killed command's lock, its holder dead
    train(out, *extra)  # the same config again: it takes the dead holder's lock over
    assert not RunDir(out).lock_file.exists()  # and releases it when done
    # It resumed from step-5 (a run started over would refuse to overwrite that committed step), and
    # the torn directories were cleaned up, not used.
    assert (step5 / "COMMITTED").stat().st_mtime_ns == committed_at
    assert not (out / "checkpoints" / ".step-10.tmp").exists()
    assert (out / "checkpoints" / "step-10" / "adapter" / "adapter_model.safetensors").read_bytes() != b"torn"
    assert_same_adapter(reference, out)
    assert steps_logged(out) == list(range(1, 11))

    # The same checkpoint continued by one worker (micro batch doubled: same global batch); the
    # optimizer state is one copy that loads on any number of workers.
    one = train(tmp_path / "one-worker", *replaced(extra, f"resume={step5}", *ONE_PROCESS))
    for k, v in adapter_tensors(reference).items():  # one process sums the batch in another order: equal to rounding
        torch.testing.assert_close(adapter_tensors(one)[k], v, rtol=1e-5, atol=1e-7)


def test_different_run_in_same_output_dir_is_refused(demo_run, tmp_path):
    before = {p: p.stat().st_mtime for p in demo_run.rglob("*") if p.is_file()}
    proc = cli("train", "experiment=demo", f"output_dir={demo_run}", "adapter.r=4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1 and "adapter.r: 16 -> 4" in proc.stderr, proc.stderr
    assert {p: p.stat().st_mtime for p in demo_run.rglob("*") if p.is_file()} == before  # nothing touched


def test_worker_killed_mid_run_is_restarted_from_checkpoint(tmp_path, demo_model, ray_local):
    out = tmp_path / "crash"
    failed: list[BaseException] = []

    def run() -> None:
        try:
            train(out, "data.eval_fraction=0", "trainer.max_steps=12", "trainer.save_every=3", "cluster.max_failures=1")
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failed.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-3" / "COMMITTED").exists():
        assert thread.is_alive() and time.time() < deadline, f"no step-3 checkpoint: {failed}"
        time.sleep(0.05)
    workers = [p for p in psutil.Process().children(recursive=True) if "RayTrainWorker" in " ".join(p.cmdline())]
    assert workers, "no Ray Train worker process found"
    workers[-1].send_signal(signal.SIGKILL)
    thread.join(timeout=600)
    assert not failed, failed
    # The restarted group resumed from a committed step (one started over would refuse to overwrite
    # step-3), and logged every step once.
    assert steps_logged(out) == list(range(1, 13))
    assert (out / "adapter" / "COMMITTED").is_file()
