"""Stopping a run on a signal, always at a step boundary and with a committed checkpoint.

SIGINT and SIGTERM (Ctrl-C, `kill`, `kill -- -PGID`, `ray job stop`, `scancel`) interrupt the
run; SIGUSR1 (Slurm's warning before preemption or the time limit) preempts it. Either way the
driver writes the run directory's stop request; the workers see it in the next step's all-reduce,
commit a checkpoint of that step and return, and the driver raises Interrupted (exit 128 +
signal: 130, 143) or Preempted (exit 75, requeue). A second SIGINT or SIGTERM stops at once: Ray's
processes are killed and the command exits; the commit protocol (checkpoint.py) guarantees that a
save cut short is never used.

How Ray treats these signals, and why the handlers are arranged as they are:
- A local ray.init starts Ray's daemons (GCS, raylet, dashboard, log monitor) as children of the
  driver in the driver's process group, with SIGINT blocked but not SIGTERM; the raylet starts
  the workers in process groups of their own, SIGINT blocked too. So SIGINT to the group reached
  only the driver, but SIGTERM reached the daemons as well. A local run here starts them in a
  session of their own (StopSignals.starting_ray): a signal to the command's group is the driver's.
- In the driver, ray.init sets a SIGTERM handler that calls sys.exit, and then Ray's C++ core
  worker one that dumps a stack trace and aborts (exit 134); Ray Train's fit() sets a SIGINT
  handler that asks the controller to abort (the run went on, then failed with a Ray traceback).
  Here the handlers are set again after ray.init, and fit() runs in a thread, where Ray sets none,
  while the main thread handles the signals.
- A Ray Job's entrypoint starts with SIGINT blocked; the handlers unblock it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from orchestrator.rundir import INTERRUPT, PREEMPTION, RunDir

log = logging.getLogger("orchestrator")

INTERRUPTS = (signal.SIGINT, signal.SIGTERM)
PREEMPT = signal.SIGUSR1
HANDLED = (*INTERRUPTS, PREEMPT)


def exit_code(signum: int) -> int:
    """The shell's convention for a command ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; its message says at which step and how to resume.
    A KeyboardInterrupt, so that callers that stop on Ctrl-C (pytest, notebooks) stop here too."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = exit_code(signum)

    def __str__(self) -> str:
        return str(self.args[0])


def committed_step(rundir: RunDir) -> int | None:
    from orchestrator.checkpoint import step_checkpoints

    found = step_checkpoints(rundir.checkpoints)
    return found[-1][0] if found else None


def interrupted_message(signum: int, rundir: RunDir, resume_command: str | None, at_once: bool = False) -> str:
    """What the command prints when it stops on a signal: the step, the checkpoint, the command
    that resumes the run."""
    name = signal.Signals(signum).name
    step = committed_step(rundir)
    how = "stopped at once" if at_once else "interrupted"
    if step is None:
        head = f"{how} by {name} before any checkpoint was committed in {rundir.root}"
        verb = "start it again"
    elif at_once:
        head = f"{how} by {name}; the newest committed checkpoint is {rundir.step(step)} (step {step})"
        verb = "resume from it"
    else:
        head = f"interrupted at step {step} by {name}; checkpoint {rundir.step(step)} is committed"
        verb = "resume"
    if resume_command:
        return f"{head}\nto {verb}: {resume_command}"
    return f"{head}\nto {verb}, run the same config again with output_dir={rundir.root}"


class StopSignals:
    """The driver's handlers for SIGINT, SIGTERM and SIGUSR1 while it trains (a context manager;
    the previous handlers come back on exit). The first signal decides the outcome: `interrupted`
    (SIGINT, SIGTERM) or a preemption (SIGUSR1)."""

    def __init__(self, rundir: RunDir, resume_command: str | None = None) -> None:
        self.rundir = rundir
        self.resume_command = resume_command
        self.first: int | None = None
        self.interrupts = 0
        self._previous: dict[int, Any] = {}
        self._mask: set[int] | None = None

    @property
    def active(self) -> bool:
        return threading.current_thread() is threading.main_thread()

    @property
    def interrupted(self) -> int | None:
        """The interrupting signal, when SIGINT or SIGTERM (not a preemption) came first."""
        return self.first if self.first in INTERRUPTS else None

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()
        if self.interrupted is not None:  # ours, and the workers are done with it (a preemption leaves it to the job)
            self.rundir.stop_request.unlink(missing_ok=True)

    def install(self) -> None:
        """(Again, after ray.init.) Only the main thread handles signals; elsewhere (a Ray Tune
        trial, a thread of a test) nothing is installed."""
        if not self.active:
            return
        for s in HANDLED:
            previous = signal.signal(s, self._handle)
            self._previous.setdefault(s, previous)
        if self._mask is None:
            self._mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)

    def restore(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()
        if self._mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
            self._mask = None

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if signum == PREEMPT:
            log.warning("received %s: checkpointing at the next step boundary", name)
            self.first = self.first or signum
        elif self.interrupts:
            self.stop_now(signum)
        else:
            self.interrupts += 1
            self.first = self.first or signum
            log.warning(
                "received %s: committing a checkpoint at the next step boundary, then stopping "
                "(%s again stops at once)",
                name,
                "Ctrl-C" if signum == signal.SIGINT else name,
            )
        self.rundir.request_stop(PREEMPTION if self.first == PREEMPT else INTERRUPT)

    def stop_now(self, signum: int) -> None:
        """The second SIGINT/SIGTERM: say where the run stands, kill this process's descendants
        (a local run's Ray: daemons and workers; a cluster's workers die with their driver) and
        exit. A save cut short stays uncommitted and is never used."""
        try:
            sys.stdout.flush()
            message = interrupted_message(signum, self.rundir, self.resume_command, at_once=True)
            os.write(sys.stderr.fileno(), f"\n{message}\n".encode())
        except Exception:  # noqa: BLE001 - stopping matters more than the message
            pass
        kill_descendants()
        os._exit(exit_code(signum))

    @contextlib.contextmanager
    def starting_ray(self, own_session: bool) -> Iterator[None]:
        """Around ray.init. It sets a SIGTERM handler that calls sys.exit (kept out here), and
        Ray's C++ core worker one that dumps a stack trace and aborts (exit 134): ours are set
        again afterwards. Meanwhile the handled signals are blocked in the main thread: one sent
        now waits until ours are set again (unless a thread started earlier takes it), and the
        threads Ray starts inherit the block, so that later signals reach the main thread. See
        ray_processes_apart for own_session."""
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED) if self.active else None
        try:
            with ray_processes_apart(own_session):
                yield
        finally:
            self.install()
            if mask is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def run(self, fn: Callable[[], object]) -> None:
        """fn() (trainer.fit) in a thread, while the main thread waits with the handlers in place.
        fn is skipped when a signal came first; its exception is raised here."""
        if self.first is not None:
            return
        if not self.active:
            fn()
            return
        self.install()
        failure: list[BaseException] = []

        def target() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)  # delivered to the main thread
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread
                failure.append(e)

        thread = threading.Thread(target=target, name="trainer.fit", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
        if failure:
            raise failure[0]


class Daemons:
    """The processes a ray.init started (under ray_processes_apart), for kill() to end them, and
    all they started, before that ray.init returns."""

    def __init__(self) -> None:
        self.sessions: set[int] = set()
        self.closed = False
        self.lock = threading.Lock()

    def kill(self) -> None:
        """No process starts after this; every one in the sessions of those started is killed,
        the raylet's children (Ray's agents, its workers) included, which a raylet killed alone
        leaves running for a minute or more. Scanned until none is left: a child forked while
        its parent was being killed is still in the session."""
        import psutil

        with self.lock:
            self.closed = True
        for _ in range(50):
            found = [p for p in psutil.process_iter() if _session(p.pid) in self.sessions]
            if not found:
                return
            for p in found:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(found, timeout=0.2)


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


@contextlib.contextmanager
def ray_processes_apart(own_session: bool, daemons: Daemons | None = None) -> Iterator[None]:
    """Around ray.init: Ray's own SIGTERM handler is not set, and the processes Ray starts begin
    with our signals unblocked. With own_session, the processes of the Ray started here (GCS,
    raylet and, through the raylet, the workers) live in a session of their own, out of reach of
    signals to the command's process group; they still die with the driver (Ray's kernel
    fate-sharing, PR_SET_PDEATHSIG). `daemons` records their sessions (own_session). Through Ray
    internals: a Ray without them keeps its own behaviour."""
    patches = []
    try:
        from ray._private import services, utils

        class Popen(services.ConsolePopen):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                if own_session:
                    kwargs.setdefault("start_new_session", True)
                inner = kwargs.get("preexec_fn")

                def preexec() -> None:  # the child starts with our signals as they were
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED)
                    if inner is not None:
                        inner()

                kwargs["preexec_fn"] = preexec
                if daemons is None:
                    super().__init__(*args, **kwargs)
                    return
                with daemons.lock:
                    if daemons.closed:
                        raise RuntimeError("the command is ending: Ray is not started")
                    super().__init__(*args, **kwargs)
                    daemons.sessions.add(self.pid)  # a session leader: its session is its PID

        patches = [(utils, "set_sigterm_handler", lambda handler: None), (services, "ConsolePopen", Popen)]
    except (ImportError, AttributeError):
        pass
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def kill_descendants() -> None:
    import psutil

    try:
        family = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for p in family:
        with contextlib.suppress(psutil.Error):
            p.kill()


def invocation() -> list[str]:
    """How this command was started, as the user would type it again: `orchestrator` when that
    is the script on PATH, else the script's path, or `python -m orchestrator`."""
    import shutil

    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "orchestrator"
    path = Path(argv0)
    if path.name in ("__main__.py", "-m", "-c"):
        return [sys.executable, "-m", "orchestrator"]
    found = shutil.which(path.name)
    if found and Path(found).resolve() == path.resolve():
        return [path.name]
    return [str(path.resolve()) if path.exists() else argv0]
