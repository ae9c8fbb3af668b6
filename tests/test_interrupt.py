"""Interrupting a run: SIGINT or SIGTERM, to the command or to its process group, commits a
checkpoint at the next step boundary, says where the run stopped and how to resume it, and exits
128 + signal; a second signal stops at once. The resumed run ends with the adapter of a run that
was never interrupted."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import assert_same_adapter, read_metrics, start_train, train

from orchestrator.interrupt import Interrupted, StopSignals, interrupted_message
from orchestrator.rundir import INTERRUPT, MARKER, PREEMPTION, RunDir, incarnation

# --- the pieces, without training ---------------------------------------------------------------


def test_stop_request_names_incarnation_and_reason(tmp_path):
    rundir = RunDir(tmp_path)
    rundir.request_stop(INTERRUPT)
    assert rundir.stop_request.read_text().splitlines() == [incarnation(), INTERRUPT]
    assert rundir.stop_reason() == INTERRUPT
    rundir.drop_stale_request()  # ours: kept
    assert rundir.stop_requested()
    rundir.request_stop()
    assert rundir.stop_reason() == PREEMPTION
    rundir.stop_request.write_text("4242.0\n")  # what an earlier Slurm job's batch script left
    assert rundir.stop_reason() == PREEMPTION
    rundir.drop_stale_request()
    assert not rundir.stop_requested()
    assert [p.name for p in tmp_path.iterdir()] == []  # no staging file left behind


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_first_signal_requests_a_stop_while_fit_goes_on(tmp_path, signum):
    rundir = RunDir(tmp_path)
    before = signal.getsignal(signum)
    seen = []

    def fit():  # what the workers do: go on until they see the request
        os.kill(os.getpid(), signum)
        deadline = time.monotonic() + 10
        while not rundir.stop_requested() and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(rundir.stop_reason())

    with StopSignals(rundir, "resume-me") as signals:
        signals.run(fit)
    assert signal.getsignal(signum) is before
    assert signals.first == signum
    assert rundir.stop_requested() == (signum == signal.SIGUSR1)  # an interrupt's request ends with the run
    if signum == signal.SIGUSR1:
        assert signals.interrupted is None and seen == [PREEMPTION]
    else:
        assert signals.interrupted == signum and seen == [INTERRUPT]


def test_fit_is_skipped_when_the_signal_came_first(tmp_path):
    with StopSignals(RunDir(tmp_path)) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        signals.run(lambda: pytest.fail("fit ran after the interrupt"))
    assert signals.interrupted == signal.SIGTERM


def test_second_signal_stops_at_once_and_kills_the_children(tmp_path):
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        from orchestrator.interrupt import StopSignals
        from orchestrator.rundir import RunDir
        child = subprocess.Popen(["sleep", "120"], start_new_session=True)  # like Ray's daemons
        print(child.pid, flush=True)
        with StopSignals(RunDir({str(tmp_path)!r}), "python -m orchestrator train x=1") as signals:
            signals.run(lambda: time.sleep(120))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 10
    while not RunDir(tmp_path).stop_requested():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.monotonic() - start < 5
    err = proc.stderr.read()
    assert "stopped at once by SIGINT before any checkpoint was committed" in err, err
    assert "to start it again: python -m orchestrator train x=1" in err
    assert "Traceback" not in err
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE


def test_interrupted_message_names_the_step_and_the_resume_command(tmp_path):
    rundir = RunDir(tmp_path)
    for step in (10, 20):
        rundir.step(step).mkdir(parents=True)
        (rundir.step(step) / MARKER).write_text("")
    rundir.step(30).mkdir()  # torn: not a checkpoint
    message = interrupted_message(signal.SIGTERM, rundir, "orchestrator train a=1")
    assert message == (
        f"interrupted at step 20 by SIGTERM; checkpoint {rundir.step(20)} is committed\n"
        "to resume: orchestrator train a=1"
    )
    e = Interrupted(signal.SIGTERM, message)
    assert e.exit_code == 143 and str(e) == message and isinstance(e, KeyboardInterrupt)


def test_resume_command_adds_output_dir_only_where_hydra_chose_it(monkeypatch):
    from types import SimpleNamespace

    from orchestrator import cli

    monkeypatch.setattr(cli, "_multirun", lambda: False)
    command = cli.TrainCommand(
        problems=[], swept=set(), program=["orchestrator"], argv=["experiment=demo", "adapter.r=8"]
    )
    run = SimpleNamespace(output_dir="/runs/it's here", storage_path=None, name="demo")
    assert (
        command._resume_command(run)
        == "orchestrator train experiment=demo adapter.r=8 'output_dir='\"'\"'/runs/it\\'\"'\"'s here'\"'\"''"
    )
    # Hydra reads back the path from what the shell hands it.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = shlex.split(command._resume_command(run))[-1]
    assert OverridesParser.create().parse_overrides([override])[0].value() == "/runs/it's here"
    command.argv.append("output_dir=/x")
    assert command._resume_command(run) == "orchestrator train experiment=demo adapter.r=8 output_dir=/x"
    command.argv.pop()
    run.storage_path = "/shared"  # <storage_path>/<name> is the same directory every time
    assert command._resume_command(run) == "orchestrator train experiment=demo adapter.r=8"

    # One run of a multirun: its own overrides and directory, Hydra's flags but -m.
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(cli, "_multirun", lambda: True)
    monkeypatch.setattr(
        HydraConfig,
        "get",
        staticmethod(
            lambda: SimpleNamespace(
                overrides=SimpleNamespace(task=["experiment=demo", "adapter.r=8", "output_dir=/ignored"])
            )
        ),
    )
    sweep = cli.TrainCommand(
        problems=[],
        swept={"adapter.r"},
        program=["orchestrator"],
        argv=["-m", "--config-dir", "my conf", "experiment=demo", "adapter.r=4,8"],
        flags=["--config-dir", "my conf"],
    )
    run.output_dir = "/multirun/adapter.r=8"
    words = shlex.split(sweep._resume_command(run))
    assert words[:-1] == ["orchestrator", "train", "--config-dir", "my conf", "experiment=demo", "adapter.r=8"]
    assert (
        OverridesParser.create().parse_overrides(words[-1:])[0].value() == "/multirun/adapter.r=8"
    )  # quoted for Hydra


def test_ray_starts_in_its_own_session_and_our_handlers_survive_its_init(tmp_path):
    from ray._private import services, utils

    with StopSignals(RunDir(tmp_path)) as signals:
        with signals.starting_ray(own_session=True):
            utils.set_sigterm_handler(lambda *_: None)  # what ray.init does, and Ray's C++ then too:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)  # waits for our handler
            p = services.ConsolePopen(["sleep", "10"])
        assert signals.interrupted == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signals._handle
    try:
        assert os.getsid(p.pid) == p.pid != os.getsid(0)
        blocked = next(line for line in open(f"/proc/{p.pid}/status") if line.startswith("SigBlk:"))
        assert int(blocked.split()[1], 16) == 0  # the child's signals are not blocked
        assert services.ConsolePopen is not type(p)  # the patches are undone
        assert utils.set_sigterm_handler.__module__ == utils.__name__
    finally:
        p.kill()
        p.wait()


# --- real runs through the CLI ------------------------------------------------------------------

# ZeRO-3 with dropout: the resumed run must also bring back DeepSpeed's partitioned optimizer state
# and every rank's RNG stream exactly to end with the uninterrupted adapter.
STEPS = 30
RUN = [
    "experiment=demo",
    "tracking=none",
    "data.eval_fraction=0",
    f"trainer.max_steps={STEPS}",
    "trainer.save_every=10",
    "strategy=zero3",
    "adapter.dropout=0.1",
    "optim=paged_adamw_32bit",
]


@pytest.fixture(scope="module")
def reference(demo_model, ray_local, tmp_path_factory) -> Path:
    """The same run, never interrupted (2 workers on the session's Ray: the CLI's numerics)."""
    return train(tmp_path_factory.mktemp("interrupt-reference") / "run", *RUN[1:])


def start(cwd: Path, log: Path, *extra: str) -> subprocess.Popen:
    """`orchestrator train` in a session of its own, as a terminal would start it."""
    return start_train(log, *RUN, *extra, cwd=cwd)


def wait_for_steps(find_run_dir, proc: subprocess.Popen, log: Path, steps: int = 3, timeout: float = 300) -> Path:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"the run ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {steps} steps logged:\n{log.read_text()[-3000:]}"
        out = find_run_dir()
        if out is not None and (out / "metrics.jsonl").is_file():
            logged = [m for m in read_metrics(out) if "loss" in m]
            if len(logged) >= steps:
                return out
        time.sleep(0.1)


def send(proc: subprocess.Popen, signum: int, to_group: bool) -> list[psutil.Process]:
    """Send the signal; return the processes the run had started (Ray's daemons and workers)."""
    family = psutil.Process(proc.pid).children(recursive=True)
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    return family


def assert_all_gone(family: list[psutil.Process]) -> None:
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left running: {[(p.pid, p.name()) for p in alive]}"


# The run is stopped twice: SIGTERM to the command alone (what `kill` and schedulers send) and
# SIGINT to its process group (Ctrl-C in a terminal), so both signals and both targets are covered
# (the handler treats the two signals alike: test_first_signal_requests_a_stop_while_fit_goes_on).
# Every command that resumes it races a twin started at the same moment on the same directory: one
# of the two must be refused at once, the other go on. The last resumption runs to the end.
STOPS = [(signal.SIGTERM, False), (signal.SIGINT, True)]


@pytest.mark.slow
def test_interrupted_twice_and_raced_resumes_end_with_the_uninterrupted_adapter(tmp_path, demo_root, reference):
    # No output_dir: Hydra's fresh timestamped directory, which the resume command must name.
    log = tmp_path / "run-0.log"
    proc = start(tmp_path, log)

    def hydra_dir() -> Path | None:  # outputs/<date>/<time>
        return next((p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()), None)

    out = wait_for_steps(hydra_dir, proc, log)
    stopped, words = 0, []
    for i, (signum, to_group) in enumerate(STOPS):
        if i:
            proc, log = race(words, tmp_path, i)
            wait_for_steps(lambda: out, proc, log, steps=stopped + 3)
        family = send(proc, signum, to_group)
        rc = proc.wait(timeout=180)
        text = log.read_text()
        case = f"{signal.Signals(signum).name} to the {'group' if to_group else 'process'}"
        assert rc == 128 + signum, f"{case}:\n{text[-3000:]}"
        assert not re.search(r"Traceback|Aborted|core dumped|\*\*\* SIG", text), f"{case}:\n{text[-3000:]}"
        step = int(re.search(rf"^interrupted at step (\d+) by {signal.Signals(signum).name}", text, re.M).group(1))
        assert stopped + 3 <= step < STEPS, case
        stopped = step
        assert f"checkpoint {out / 'checkpoints' / f'step-{stopped}'} is committed" in text, case
        assert f"interrupted: committed step-{stopped}, stopping" in text, case  # the workers' own line
        assert (out / "checkpoints" / f"step-{stopped}" / "COMMITTED").is_file(), case
        assert not (out / "adapter").exists(), case
        assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, stopped + 1)), case
        words = shlex.split(re.search(r"^to resume: (.+)$", text, re.M).group(1))
        assert words[:4] == [sys.executable, "-m", "orchestrator", "train"] and words[4 : 4 + len(RUN)] == RUN
        assert words[-1] == f"output_dir={out}", case  # added for Hydra's directory
        assert_all_gone(family)

    proc, log = race(words, tmp_path, len(STOPS))
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert f"resuming from {out / 'checkpoints' / f'step-{stopped}'} at step {stopped}" in log.read_text()
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == list(range(1, STEPS + 1))
    assert [p.name for p in (out / "checkpoints").iterdir() if not (p / MARKER).is_file()] == []  # none torn
    assert not RunDir(out).lock_file.exists()
    assert_same_adapter(reference, out)


def race(words: list[str], cwd: Path, i: int) -> tuple[subprocess.Popen, Path]:
    """Start the resume command twice at once; assert one is refused at once, naming the other as
    the holder of the run directory, and return the one that runs, with its log."""
    logs = [cwd / f"run-{i}{tag}.log" for tag in "ab"]
    procs = [start_train(log, *words[4:], cwd=cwd) for log in logs]
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "neither twin was refused"
        time.sleep(0.05)
    lost = next(k for k, p in enumerate(procs) if p.poll() is not None)
    won = 1 - lost
    refusal = logs[lost].read_text()
    assert procs[lost].returncode == 1, refusal[-3000:]
    # Nothing but the error: the refused twin started no Ray and touched nothing.
    assert refusal.strip().startswith("error:") and len(refusal.strip().splitlines()) == 1, refusal
    assert f"is in use by another run: PID {procs[won].pid} on host {socket.gethostname()}" in refusal, refusal
    return procs[won], logs[won]
