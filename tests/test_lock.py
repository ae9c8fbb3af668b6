"""One owner per run directory: the lock file and its stale-holder takeover. Real commands racing
for one directory, four rounds of them, are in test_interrupt (every resumption there starts twice
at the same moment)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest
from conftest import cli
from omegaconf import OmegaConf

from orchestrator.config import as_dict, compose
from orchestrator.rundir import LOCK, RunDir, RunDirInUse

HOST = socket.gethostname()


def write_lock(rundir: RunDir, host: str, pid: int, started: float, age_s: float = 0.0, incarnation: str = "") -> None:
    """A lock file as another process would have left it, its heartbeat `age_s` old."""
    rundir.root.mkdir(parents=True, exist_ok=True)
    rundir.lock_file.write_text(
        json.dumps(
            {
                "host": host,
                "pid": pid,
                "started": started,
                "taken": time.time() - age_s,
                "incarnation": incarnation,
                "token": "theirs",
            }
        )
        + "\n"
    )
    if age_s:
        t = time.time() - age_s
        os.utime(rundir.lock_file, (t, t))


def holder(rundir: RunDir) -> dict:
    return json.loads(rundir.lock_file.read_text())


def leftovers(rundir: RunDir) -> list[str]:
    """Files the lock machinery may have left beside LOCK (guards, renamed-aside files, clock probes)."""
    return sorted(p.name for p in rundir.root.iterdir() if LOCK in p.name and p.name != LOCK)


def finished_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not psutil.pid_exists(proc.pid)
    return proc.pid


def test_second_acquire_is_refused_naming_the_holder(tmp_path):
    rundir = RunDir(tmp_path / "run")
    with rundir.lock():
        assert holder(rundir)["pid"] == os.getpid() and holder(rundir)["host"] == HOST
        with pytest.raises(RunDirInUse) as e:
            with rundir.lock():
                pass
        message = str(e.value)
        assert f"PID {os.getpid()} on host {HOST}" in message and "process started" in message
        assert "Wait for that run to end, or stop it" in message and "taken over automatically" in message
        assert holder(rundir)["pid"] == os.getpid()  # the refused attempt left the lock alone
    assert not rundir.lock_file.exists() and leftovers(rundir) == []


def test_released_on_exception(tmp_path):
    rundir = RunDir(tmp_path)
    with pytest.raises(KeyError):
        with rundir.lock():
            raise KeyError("boom")
    assert not rundir.lock_file.exists()
    with rundir.lock():  # and can be taken again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    rundir = RunDir(tmp_path)
    dead = finished_pid()
    write_lock(rundir, HOST, dead, time.time() - 5)
    with rundir.lock() as lock:
        assert holder(rundir)["pid"] == os.getpid() and lock.owned()
    assert f"process {dead} has ended" in caplog.text
    assert not rundir.lock_file.exists() and leftovers(rundir) == []


def test_reused_pid_is_taken_over(tmp_path, caplog):
    """The PID lives, but it is another process than the one that took the lock."""
    rundir = RunDir(tmp_path)
    write_lock(rundir, HOST, os.getpid(), psutil.Process().create_time() - 3600)
    with rundir.lock():
        assert holder(rundir)["token"] != "theirs"
    assert "now belongs to another process" in caplog.text


def test_live_process_on_this_host_is_not_taken_over(tmp_path):
    rundir = RunDir(tmp_path)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(sleeper.pid).create_time()
        write_lock(rundir, HOST, sleeper.pid, started, age_s=3600)  # an old heartbeat does not matter on this host
        t0 = time.monotonic()
        with pytest.raises(RunDirInUse, match=f"PID {sleeper.pid} on host {HOST}"):
            rundir.lock().acquire()
        assert time.monotonic() - t0 < 2  # at once
        assert holder(rundir)["token"] == "theirs" and leftovers(rundir) == []
    finally:
        sleeper.kill()
        sleeper.wait()
    with rundir.lock():  # once it is gone, the lock is taken over
        assert holder(rundir)["pid"] == os.getpid()


def test_other_host_with_fresh_heartbeat_is_refused(tmp_path):
    rundir = RunDir(tmp_path)
    write_lock(rundir, "node-elsewhere", 4242, time.time() - 100, age_s=5)
    with pytest.raises(RunDirInUse, match="PID 4242 on host node-elsewhere") as e:
        rundir.lock().acquire()
    assert "older than 60 s" in str(e.value)
    assert holder(rundir)["token"] == "theirs" and leftovers(rundir) == []


def test_other_host_with_old_heartbeat_is_taken_over(tmp_path, caplog):
    rundir = RunDir(tmp_path)
    write_lock(rundir, "node-elsewhere", 4242, time.time() - 1000, age_s=120)
    with rundir.lock():
        assert holder(rundir)["host"] == HOST
    assert "heartbeat stopped" in caplog.text and "node-elsewhere" in caplog.text
    assert leftovers(rundir) == []


def test_earlier_incarnation_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch):
    """A requeued job may land on another node within the heartbeat timeout: its previous
    incarnation, which Slurm has ended, does not block it."""
    rundir = RunDir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    write_lock(rundir, "node-elsewhere", 4242, time.time() - 100, age_s=1, incarnation="78.0")
    with pytest.raises(RunDirInUse):  # another job: its heartbeat is fresh
        rundir.lock().acquire()
    write_lock(rundir, "node-elsewhere", 4242, time.time() - 100, age_s=1, incarnation="77.0")
    with rundir.lock():
        assert holder(rundir)["incarnation"] == "77.1"


def test_unreadable_lock_is_refused_while_young_and_taken_over_when_old(tmp_path):
    """An empty lock file: its holder has created it and not yet written who it is (or died then)."""
    rundir = RunDir(tmp_path)
    rundir.lock_file.write_text("")
    with pytest.raises(RunDirInUse, match="taking its lock right now"):
        rundir.lock().acquire()
    t = time.time() - 120
    os.utime(rundir.lock_file, (t, t))
    with rundir.lock():
        assert holder(rundir)["pid"] == os.getpid()


def test_heartbeat_refreshes_mtime(tmp_path):
    rundir = RunDir(tmp_path)
    with rundir.lock(heartbeat_s=0.1):
        old = time.time() - 3600
        os.utime(rundir.lock_file, (old, old))
        time.sleep(0.5)
        assert time.time() - rundir.lock_file.stat().st_mtime < 5


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path, caplog):
    """Taken over while we were stalled: release must not remove the new holder's lock."""
    rundir = RunDir(tmp_path)
    lock = rundir.lock()
    lock.acquire()
    os.rename(rundir.lock_file, tmp_path / "aside")  # what a takeover does to our file
    write_lock(rundir, "node-elsewhere", 4242, time.time())
    assert not lock.owned()
    lock.release()
    assert holder(rundir)["token"] == "theirs"
    assert "no longer ours" in caplog.text


def test_takeover_of_one_stale_lock_by_many_gives_one_owner(tmp_path):
    """Several processes find the same dead holder's lock at once: exactly one takes it."""
    rundir = RunDir(tmp_path)
    write_lock(rundir, HOST, finished_pid(), time.time() - 5)
    script = (
        "import sys, time; from pathlib import Path; from orchestrator.rundir import RunDir, RunDirInUse\n"
        "lock = RunDir(Path(sys.argv[1])).lock()\n"
        "try:\n    lock.acquire()\nexcept RunDirInUse:\n    sys.exit(3)\n"
        "time.sleep(3); lock.release()\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)]) for _ in range(6)]
    codes = sorted(p.wait(timeout=60) for p in procs)
    assert codes == [0, 3, 3, 3, 3, 3], codes
    assert not rundir.lock_file.exists() and leftovers(rundir) == []


def test_threads_race_for_a_free_lock(tmp_path):
    rundir = RunDir(tmp_path)
    won, barrier = [], threading.Barrier(8)
    locks = [rundir.lock() for _ in range(8)]

    def attempt(lock):
        barrier.wait()
        try:
            lock.acquire()
            won.append(lock)
        except RunDirInUse:
            pass

    threads = [threading.Thread(target=attempt, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    won[0].release()


# --- through the CLI ------------------------------------------------------------------------------


def test_cli_refuses_a_directory_in_use_before_touching_it(tmp_path, demo_root):
    """`orchestrator train` and `orchestrator run` exit 1 naming the holder, and write nothing."""
    out = tmp_path / "run"
    rundir = RunDir(out)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(rundir, HOST, sleeper.pid, psutil.Process(sleeper.pid).create_time())
        r = cli("train", "experiment=demo", "tracking=none", f"output_dir={out}", cwd=tmp_path)
        assert r.returncode == 1, r.stderr
        assert f"is in use by another run: PID {sleeper.pid} on host {HOST}" in r.stderr, r.stderr
        run = compose(["experiment=demo", "tracking=none", f"output_dir={out}"])
        (tmp_path / "job.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
        r = cli("run", str(tmp_path / "job.yaml"), cwd=tmp_path)
        assert r.returncode == 1 and f"PID {sleeper.pid} on host {HOST}" in r.stderr, r.stderr
        assert sorted(p.name for p in out.iterdir()) == [LOCK] and holder(rundir)["token"] == "theirs"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "run"]  # no Hydra directory either
    finally:
        sleeper.kill()
        sleeper.wait()
