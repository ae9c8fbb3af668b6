"""The run directory: the one owner of every path, marker and file name of a run.

    <output_dir>/
      LOCK                     who runs in the directory now (host, PID, start time); see RunLock
      config.yaml              the composed config; a resumed run must match it
      metrics.jsonl            one JSON row per logged step and per evaluation
      summary.json             the run's figures (parameters, bytes per worker, the load's peak), written
                               when loading ends and updated after the first step, as W&B's summary
      wandb_run_id             the W&B run id, so a resumed run continues the same W&B run
      PREEMPT_REQUESTED        asks the workers to commit a checkpoint and stop (holds who asked, and why)
      checkpoints/step-<N>/    adapter/ (PEFT format + manifest), state/, COMMITTED
      adapter/                 the final adapter, COMMITTED once complete
      ray/                     Ray Train's own storage
      slurm/                   sbatch scripts, their logs, and each job's composed config

    <data cache root>/<key>/   the tokenized data (orchestrator/data/cache.py), shared by runs:
                               data.cache_dir, else <storage_path>/.data-cache on a cluster, else
                               <orchestrator home>/data (every local run, sweep, resume and day shares it)

    <orchestrator home>/       $ORCHESTRATOR_HOME, else ~/.cache/orchestrator: the job index (jobs/),
                               the local data cache (data/) and the demo's assets (demo/)

The Slurm batch script reaches the stop request through `python -m orchestrator.rundir`, so the
file name and the incarnation formula live here only. Only the standard library is imported at
module level: that command runs inside a signal trap (the lock imports psutil when taken).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

# A directory is a checkpoint only once this marker is written, last (see checkpoint.py).
MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKPOINTS = "checkpoints"
# Inside a step checkpoint (and the final adapter/): the adapter as PEFT loads it, and what
# resuming needs besides.
ADAPTER = "adapter"
STATE = "state"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# EX_TEMPFAIL: the run committed a checkpoint on a stop request and should be requeued.
PREEMPTED_EXIT = 75
# The run directory's lock (see RunLock), and the guard held while a stale lock is replaced.
LOCK = "LOCK"
LOCK_GUARD = "LOCK.takeover"
# The holder refreshes the lock file's mtime this often; a lock of another host whose mtime is
# older than LOCK_STALE_S is a dead holder's (generous: NFS attribute caches, clock skew, GC pauses).
LOCK_HEARTBEAT_S = 5.0
LOCK_STALE_S = 60.0
# A guard is held for the milliseconds a takeover takes: older than this, its holder died.
GUARD_STALE_S = 10.0

log = logging.getLogger("orchestrator")

# Why a stop was requested: Slurm's preemption warning, or a signal to the command (Ctrl-C, kill).
PREEMPTION = "preemption"
INTERRUPT = "interrupt"


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def lock_file(self) -> Path:
        return self.root / LOCK

    @property
    def lock_guard(self) -> Path:
        return self.root / LOCK_GUARD

    def lock(self, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_after_s: float = LOCK_STALE_S) -> RunLock:
        """The run directory's lock, as a context manager: `with rundir.lock(): ...` takes it (or
        raises RunDirInUse at once, naming the holder) and releases it on every exit."""
        return RunLock(self, heartbeat_s, stale_after_s)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def stop_request(self) -> Path:
        return self.root / "PREEMPT_REQUESTED"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    def slurm_log(self, job_id: str) -> Path:
        """A Slurm job's log; the job id "%j" is the pattern sbatch fills in."""
        return self.slurm / f"slurm-{job_id}.out"

    def step(self, n: int) -> Path:
        return self.checkpoints / f"step-{n}"

    def is_complete(self) -> bool:
        return (self.adapter / MARKER).is_file()

    def request_stop(self, reason: str = PREEMPTION) -> None:
        """Ask the workers to commit a checkpoint at the next step boundary and stop. The
        request's first line names who asked, so that a later incarnation of the run ignores it;
        the second says why. Written whole (renamed into place): a worker that sees the file
        reads all of it."""
        tmp = self.stop_request.with_name(f".{self.stop_request.name}.{os.getpid()}")
        tmp.write_text(f"{incarnation()}\n{reason}\n")
        os.replace(tmp, self.stop_request)

    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def _request_lines(self) -> list[str]:
        try:
            return self.stop_request.read_text().splitlines()
        except OSError:
            return []

    def stop_reason(self) -> str:
        """PREEMPTION or INTERRUPT; a request without a reason is a preemption."""
        lines = self._request_lines()
        return lines[1].strip() if len(lines) > 1 and lines[1].strip() else PREEMPTION

    def drop_stale_request(self) -> None:
        """Forget a request left by an earlier incarnation (a previous job, or a killed run)."""
        lines = self._request_lines()
        if self.stop_request.is_file() and (lines[0].strip() if lines else "") != incarnation():
            self.stop_request.unlink()


DATA_CACHE = ".data-cache"


def orchestrator_home() -> Path:
    """The user's own files that outlive any one run (see the layout above)."""
    home = os.environ.get("ORCHESTRATOR_HOME")
    return Path(home).absolute() if home else Path.home() / ".cache" / "orchestrator"


def data_cache_root(storage_path: str | None = None, cache_dir: str | None = None) -> Path:
    """Where tokenized data is cached: outside any one run, keyed by its fingerprint, so every run
    of a sweep, a resumed run, a requeued job and tomorrow's run find it (see the layout above).
    On a cluster it lives in storage_path, which every node mounts; a local run uses the user's
    cache rather than Hydra's dated output directory, which changes every day."""
    if cache_dir:
        return Path(cache_dir).absolute()
    if storage_path:
        return Path(storage_path).absolute() / DATA_CACHE
    return orchestrator_home() / "data"


def incarnation() -> str:
    """Who may ask this run to stop: the Slurm job and its restart count (its batch script asks
    too, possibly before the driver starts), else this process."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return f"pid.{os.getpid()}"


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory's lock."""


@dataclass(frozen=True)
class Holder:
    """What a lock file says about the process that took it."""

    host: str
    pid: int
    started: float
    """The process's start time (seconds since the epoch): tells a live holder from a reused PID."""
    taken: float
    incarnation: str
    token: str

    @classmethod
    def me(cls) -> Holder:
        import psutil

        return cls(
            socket.gethostname(),
            os.getpid(),
            psutil.Process().create_time(),
            time.time(),
            incarnation(),
            uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            d = json.loads(text)
            return cls(
                str(d["host"]),
                int(d["pid"]),
                float(d["started"]),
                float(d["taken"]),
                str(d.get("incarnation", "")),
                str(d.get("token", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None  # being written (created, not yet filled), or not a lock of ours

    def dump(self) -> str:
        return json.dumps(self.__dict__) + "\n"

    def describe(self) -> str:
        return (
            f"PID {self.pid} on host {self.host} (process started {_when(self.started)}, "
            f"lock taken {_when(self.taken)})"
        )


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


class RunLock:
    """One owner at a time for a run directory, also on shared filesystems (NFS v3+, Lustre),
    where flock() cannot be trusted across hosts.

    The lock is the file LOCK, created with O_CREAT|O_EXCL (atomic, NFS v3+ included) and holding
    the holder's host, PID, process start time and the time it was taken. While held, a daemon
    thread refreshes its mtime every `heartbeat_s` (through the open descriptor, so it can only
    ever touch our own file). A lock is stale, and taken over, when its holder is dead:
      - on this host: its PID is gone, or now belongs to a process started at another time;
      - an earlier incarnation of this same Slurm job (the job was requeued; Slurm runs one at a time);
      - on another host: its heartbeat (mtime) is older than `stale_after_s`, measured against
        the filesystem's own clock (the mtime of a file created for the purpose).
    Taking over is serialised by a second O_EXCL file (LOCK.takeover), under which the stale
    lock is checked again and renamed aside; a file is only ever removed after being renamed to
    a unique name and checked to be the very file (inode and token) judged removable, and put
    back otherwise. The same goes for release, which removes the lock only while it is ours."""

    def __init__(self, rundir: RunDir, heartbeat_s: float = LOCK_HEARTBEAT_S, stale_after_s: float = LOCK_STALE_S):
        self.rundir, self.heartbeat_s, self.stale_after_s = rundir, heartbeat_s, stale_after_s
        self.path = rundir.lock_file
        self.holder: Holder | None = None
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # --- taking and giving back ---------------------------------------------------------------

    def check_free(self) -> None:
        """RunDirInUse when a live process holds the lock now; reads only. A command calls it before
        its validation, which may spend minutes tokenizing the data into the shared cache."""
        found = self._read(self.path)
        if found is not None and self._stale(found[1], found[2], self.stale_after_s) is None:
            raise RunDirInUse(self._in_use(found[1]))

    def acquire(self) -> None:
        """Take the lock, taking over a dead holder's, or raise RunDirInUse at once."""
        self.rundir.root.mkdir(parents=True, exist_ok=True)
        me = Holder.me()
        for _ in range(20):  # each turn either takes the lock, refuses, or removed a stale one
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = self._read(self.path)
                if found is None:
                    continue  # released meanwhile
                ident, holder, mtime = found
                stale = self._stale(holder, mtime, self.stale_after_s)
                if stale is None:
                    raise RunDirInUse(self._in_use(holder)) from None
                self._take_over(ident, holder, stale)
                continue
            try:
                os.write(fd, me.dump().encode())
                os.fsync(fd)
            except BaseException:
                ident = _ident(os.fstat(fd))
                os.close(fd)
                _remove_if(self.path, ident, None)
                raise
            self._fd, self.holder = fd, me
            self._stop.clear()
            self._thread = threading.Thread(target=self._heartbeat, name="run-dir-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunDirInUse(
            f"output_dir {self.rundir.root}: could not take its lock {self.path}; other processes keep "
            "taking it. Run one command per output_dir at a time"
        )

    def release(self) -> None:
        """Give the lock back, removing the file only if it is still ours."""
        if self._fd is None or os.getpid() != self.holder.pid:
            return  # not taken, or a forked child unwinding: the lock is its parent's
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        fd, self._fd = self._fd, None
        try:
            ident = _ident(os.fstat(fd))
        finally:
            os.close(fd)  # before the file is removed: NFS would keep an open one as .nfsXXXX
        try:
            if not _remove_if(self.path, ident, self.holder.token):
                log.error(
                    "the lock %s was no longer ours (taken over after our heartbeat stopped); left it alone", self.path
                )
        except OSError as e:
            log.error("could not release the lock %s: %s", self.path, e)

    def owned(self) -> bool:
        """Whether the file at LOCK is still the one we created."""
        if self._fd is None:
            return False
        try:
            return _ident(os.stat(self.path)) == _ident(os.fstat(self._fd))
        except OSError:
            return False

    def _heartbeat(self) -> None:
        warned = False
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self._fd)  # our own inode, even if someone renamed it away
                ours = self.owned()
            except OSError as e:
                ours, reason = False, str(e)
            else:
                reason = "another process replaced it"
            if not ours and not warned:
                log.error(
                    "lost the lock on %s (%s): another run may be writing in this directory", self.rundir.root, reason
                )
                warned = True

    def _in_use(self, holder: Holder | None) -> str:
        if holder is None:
            who, what = "a process that is taking its lock right now", "Wait for that run to end"
        else:
            who, what = holder.describe(), f"Wait for that run to end, or stop it (PID {holder.pid} on {holder.host})"
        return (
            f"output_dir {self.rundir.root} is in use by another run: {who}. {what}, then run the command again. "
            "A lock left by a process that died is taken over automatically (from another host once its "
            f"heartbeat, the mtime of {self.path}, is older than {self.stale_after_s:g} s)."
        )

    # --- stale locks --------------------------------------------------------------------------

    def _read(self, path: Path, patience_s: float = 1.0) -> tuple[tuple[int, int], Holder | None, float] | None:
        """(identity, holder, mtime) of the file at path, None if there is none. A file that does
        not parse yet is being written: read again for a moment before calling its holder unknown."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    holder = Holder.parse(f.read().decode(errors="replace"))
            except FileNotFoundError:
                return None
            if holder is not None or time.monotonic() > deadline:
                return _ident(st), holder, st.st_mtime
            time.sleep(0.05)

    def _stale(self, holder: Holder | None, mtime: float, stale_after_s: float) -> str | None:
        """Why the lock (or guard) of `holder` is a dead process's, or None while it may be alive."""
        if holder is not None:
            ours = incarnation()
            if (
                not ours.startswith("pid.")
                and not holder.incarnation.startswith("pid.")
                and ours.split(".")[0] == holder.incarnation.split(".")[0]
                and ours != holder.incarnation
            ):
                return f"left by an earlier incarnation ({holder.incarnation}) of this Slurm job"
            if holder.host == socket.gethostname():
                return _dead(holder)
        age = _fs_now(self.rundir.root) - mtime
        if age > stale_after_s:
            return f"its heartbeat stopped {age:.0f} s ago"
        return None

    def _take_over(self, ident: tuple[int, int], holder: Holder | None, why: str) -> None:
        """Remove the stale lock `ident`, under the guard, after checking again that it is still
        that file and still stale. Returns with nothing done when the guard is busy."""
        if not self._guard():
            return
        try:
            found = self._read(self.path, patience_s=0)
            if found is None or found[0] != ident:
                return  # replaced meanwhile: the caller looks again
            if self._stale(found[1], found[2], self.stale_after_s) is None:
                return
            if _remove_if(self.path, ident, holder.token if holder else None):
                log.warning(
                    "took over the lock of %s from %s: %s",
                    self.rundir.root,
                    holder.describe() if holder else "an unreadable lock file",
                    why,
                )
        finally:
            _remove_if(self.rundir.lock_guard, self._guard_ident, self._guard_token)

    def _guard(self, wait_s: float = 5.0) -> bool:
        """Take LOCK.takeover, waiting a moment for another taker; a dead taker's guard is removed."""
        me = Holder.me()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fd = os.open(self.rundir.lock_guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                found = self._read(self.rundir.lock_guard)
                if found is not None and self._stale(found[1], found[2], GUARD_STALE_S) is not None:
                    _remove_if(self.rundir.lock_guard, found[0], found[1].token if found[1] else None)
                    continue
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.05)
                continue
            try:
                os.write(fd, me.dump().encode())
                self._guard_ident, self._guard_token = _ident(os.fstat(fd)), me.token
            finally:
                os.close(fd)
            return True


def _dead(holder: Holder) -> str | None:
    """Why a process of this host is not the lock's holder any more, or None while it is."""
    import psutil

    try:
        proc = psutil.Process(holder.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return f"process {holder.pid} has ended"
        if abs(proc.create_time() - holder.started) > 1.0:
            return f"PID {holder.pid} now belongs to another process (started {_when(proc.create_time())})"
    except psutil.NoSuchProcess:
        return f"process {holder.pid} has ended"
    except psutil.AccessDenied:
        pass  # someone else's live process
    return None


def _fs_now(directory: Path) -> float:
    """The time by the clock that stamps mtimes in `directory` (on NFS: the server's)."""
    probe = directory / f".{LOCK}.clock-{uuid.uuid4().hex}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        os.unlink(probe)


def _remove_if(path: Path, ident: tuple[int, int], token: str | None) -> bool:
    """Remove `path` only if it is still the file `ident` (and holds `token`, when given). It is
    renamed to a unique name first (atomic), checked there, and put back if it was another file:
    a lock someone else has just taken is never removed."""
    aside = path.with_name(f"{path.name}.gone-{uuid.uuid4().hex}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    try:
        same = _ident(os.stat(aside)) == ident
        if same and token:
            holder = Holder.parse(aside.read_text(errors="replace"))
            same = holder is not None and holder.token == token
        if not same:
            try:
                os.link(aside, path)  # no-clobber: if yet another file took the name, that one stays
            except FileExistsError:
                pass
        return same
    finally:
        os.unlink(aside)


def main(argv: list[str]) -> int:
    """`python -m orchestrator.rundir request-stop RUN_DIR`: what the Slurm batch script runs
    when Slurm warns of preemption or the time limit."""
    if len(argv) != 2 or argv[0] != "request-stop":
        print("usage: python -m orchestrator.rundir request-stop RUN_DIR", file=sys.stderr)
        return 2
    RunDir(Path(argv[1])).request_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
