"""What `orchestrator train` does before the first step (issue 15, item 4): bitsandbytes imported
without compiling anything, and the local Ray started while the model and data are validated,
gone with the command when validation fails."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from orchestrator._lazy_compile import lazily


def test_bitsandbytes_is_imported_without_dynamo_or_inductor():
    code = (
        "import sys, orchestrator, torch\n"
        "eager = torch.compile\n"
        "import peft, bitsandbytes\n"
        "print(torch.compile is eager, 'torch._inductor.compile_fx' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "False"], r.stdout  # restored after the import, nothing compiled


def test_lazily_compiles_on_the_first_call_once():
    compiled = []

    def compile_fn(fn, **options):
        compiled.append(options)
        return lambda *a: ("compiled", fn(*a))

    def double(x):
        return 2 * x

    decorated = lazily(compile_fn)(dynamic=False)(double)  # as @torch.compile(dynamic=False)
    wrapped = lazily(compile_fn)(double)  # as torch.compile(fn)
    assert compiled == [] and decorated.__name__ == "double"
    assert decorated(3) == ("compiled", 6) and decorated(4) == ("compiled", 8)
    assert wrapped(1) == ("compiled", 2)
    assert compiled == [{"dynamic": False}, {}]


def train_command(tmp_path: Path, *overrides: str) -> tuple[int, int, str, list[psutil.Process]]:
    """`orchestrator train experiment=demo OVERRIDES`: its PID, exit code, stderr, and every process
    it started (seen every 20 ms while it ran)."""
    command = [sys.executable, "-m", "orchestrator", "train", "experiment=demo", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen([*command, *overrides], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    started: dict[int, psutil.Process] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            started.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.Error:
            pass
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.pid, proc.returncode, err, list(started.values())


def ray_sessions(pid: int) -> list[Path]:
    """Ray's session directories of a driver with this PID (their names end in it)."""
    return list(Path("/tmp/ray").glob(f"session_*_{pid}"))


def still_running(processes: list[psutil.Process]) -> list[str]:
    """Those of `processes` still alive (psutil tells a reused PID apart by its start time)."""
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    return left


@pytest.mark.slow
def test_ray_started_during_validation_ends_with_a_failed_command(tmp_path, demo_root):
    """A config.json that is not JSON is found a second or two in, while the command's Ray is
    still starting: the error is the model's, and none of the processes the command started
    outlive it (killed mid-start, Ray's agents outlived the raylet by a minute or more)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{not json")
    pid, code, err, started = train_command(tmp_path, f"model.path={model}")
    assert code == 2 and f"cannot read {model / 'config.json'}" in err, err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    assert ray_sessions(pid) and started, "the command's Ray never started"
    assert not still_running(started)


def test_an_invalid_config_starts_no_ray(tmp_path, demo_root):
    pid, code, err, started = train_command(tmp_path, "adapter.r=-1")
    assert code == 2 and "adapter.r: must be a positive integer" in err, err
    assert not ray_sessions(pid) and not started
