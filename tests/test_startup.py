"""What `orchestrator train` does before the first step (issue 15, item 4): bitsandbytes imported
without compiling anything; the local Ray and the run's workers started while the model and data
are validated, the workers waiting for the validated run and gone with the command when validation
fails; Ray Train's controller without torch."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from orchestrator import start_gate
from orchestrator._lazy_compile import lazily
from orchestrator.imports import preload
from orchestrator.start_gate import StartGate


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


def test_start_gate_hands_the_first_word_to_every_worker():
    """Workers wait until the command says; what it said first stands (a cancel after the run was
    handed over changes nothing, nor the reverse), and saying anything once it is removed is a no-op."""
    gate = StartGate()
    try:
        run = {"trainer": {"lr": 2e-4, "max_steps": None}, "adapter": {"target_modules": ["q_proj", "v_proj"]}}
        threading.Timer(0.3, gate.open, args=(run,)).start()
        assert start_gate.wait(str(gate.path)) == run  # blocked until then
        gate.cancel()
        assert start_gate.wait(str(gate.path)) == run and gate.waiting() == 1
    finally:
        gate.remove()
    gate = StartGate()
    gate.cancel()
    gate.open({"trainer": {}})
    assert start_gate.wait(str(gate.path)) is None
    gate.remove()
    gate.open({"trainer": {}})
    assert not gate.dir.exists()


def test_preload_pauses_the_collector_and_freezes_a_start():
    """The collector is off while modules import and back on after, frozen objects included, where
    the imports were new (a process's start); never turned on where the caller had it off."""
    code = (
        "import gc\n"
        "from orchestrator.imports import preload\n"
        "frozen = gc.get_freeze_count()\n"
        "preload('fractions')\n"
        "print(gc.isenabled(), gc.get_freeze_count() > frozen)\n"
        "frozen = gc.get_freeze_count()\n"
        "preload('fractions')\n"
        "print(gc.isenabled(), gc.get_freeze_count() > frozen)\n"
        "gc.disable()\n"
        "preload('decimal')\n"
        "print(gc.isenabled())\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["True", "True", "True", "False", "False"], r.stdout
    with pytest.raises(ModuleNotFoundError):
        preload("no_such_module_here")
    assert gc.isenabled()


def train_command(
    tmp_path: Path,
    *overrides: str,
    program: tuple[str, ...] = ("-m", "orchestrator"),
    watch: Callable[[list[psutil.Process]], None] = lambda processes: None,
) -> tuple[int, int, str, list[psutil.Process]]:
    """`orchestrator train experiment=demo OVERRIDES`: its PID, exit code, stderr, and every process
    it started (seen every 20 ms while it ran, and shown to `watch`)."""
    command = [sys.executable, *program, "train", "experiment=demo", f"output_dir={tmp_path / 'out'}"]
    proc = subprocess.Popen([*command, *overrides], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    started: dict[int, psutil.Process] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            started.update((p.pid, p) for p in root.children(recursive=True))
        except psutil.Error:
            pass
        watch(list(started.values()))
        time.sleep(0.02)
    _, err = proc.communicate(timeout=120)
    return proc.pid, proc.returncode, err, list(started.values())


# `orchestrator train`, whose validation begins only once the run's workers wait at the start gate,
# and says how many did: what the command does whenever validation takes longer than the workers'
# start (a large dataset), made certain.
HELD_VALIDATION = """
import sys, time
from pathlib import Path

import orchestrator.config
from orchestrator import driver

report = Path(sys.argv[1])
validate = orchestrator.config.validate


def validate_once_workers_wait(run, *args, **kwargs):
    fit, deadline = None, time.monotonic() + 120
    while time.monotonic() < deadline:
        fit = driver._early_ray and driver._early_ray.fit
        if fit and fit.gate.waiting() == run.cluster.num_workers:
            break
        time.sleep(0.05)
    report.write_text(f"{fit.gate.waiting() if fit else 0} {fit.gate.dir if fit else ''}")
    return validate(run, *args, **kwargs)


orchestrator.config.validate = validate_once_workers_wait
from orchestrator.cli import main

sys.argv = ["orchestrator", *sys.argv[2:]]
main()
"""


def held_validation(tmp_path: Path) -> tuple[tuple[str, ...], Path]:
    script, report = tmp_path / "held_validation.py", tmp_path / "waiting"
    script.write_text(HELD_VALIDATION)
    return (str(script), str(report)), report


def process_names(seen: set[str]) -> Callable[[list[psutil.Process]], None]:
    """A `watch` that adds the names of the processes it is shown (ray::RayTrainWorker, ...) to `seen`."""

    def watch(processes: list[psutil.Process]) -> None:
        for p in processes:
            with contextlib.suppress(psutil.Error, IndexError):
                seen.add(p.cmdline()[0].split(".")[0])

    return watch


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


@pytest.mark.slow
def test_workers_wait_for_validation_then_train_the_validated_run(tmp_path, demo_root):
    """Both workers reach the start gate before validation begins, and the run then trains: the
    gate hands them the run the command validated (not one they had before) and nothing else."""
    program, report = held_validation(tmp_path)
    controller_maps: list[str] = []

    def look_at_the_controller(processes: list[psutil.Process]) -> None:
        if controller_maps or not (tmp_path / "out" / "metrics.jsonl").is_file():
            return
        for p in processes:  # by the first step it has set the workers' process group up
            with contextlib.suppress(psutil.Error, IndexError):
                if p.cmdline()[0].startswith("ray::TrainController"):
                    controller_maps.extend(m.path for m in p.memory_maps())

    _, code, err, started = train_command(
        tmp_path, "trainer.max_steps=2", program=program, watch=look_at_the_controller
    )
    assert code == 0, err
    assert controller_maps, "Ray Train's controller was not seen at the first step"
    assert not [m for m in controller_maps if "libtorch" in m], "the controller loaded torch"
    waiting, gate = report.read_text().split()
    assert waiting == "2", "the workers did not wait at the start gate while validation had not begun"
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) >= 2
    assert not Path(gate).exists() and not (tmp_path / "out" / "ray").exists()
    assert not still_running(started)


@pytest.mark.slow
def test_workers_waiting_for_validation_end_with_a_failed_command(tmp_path, demo_root):
    """Validation fails while the workers wait: the error is the data's, they load nothing and are
    gone with the command, and nothing is written (no output_dir, no start gate left)."""
    data = tmp_path / "rows.jsonl"
    data.write_text('{"instruction": "hi"}\n')
    program, report = held_validation(tmp_path)
    names: set[str] = set()
    _, code, err, started = train_command(tmp_path, f"data.path={data}", program=program, watch=process_names(names))
    assert code == 2 and f"{data}:1: missing field 'output'" in err, err
    waiting, gate = report.read_text().split()
    assert waiting == "2" and "ray::RayTrainWorker" in names, names
    assert "Traceback" not in err and not (tmp_path / "out").exists() and not Path(gate).exists()
    assert not still_running(started)


@pytest.mark.slow
def test_a_sweeps_first_run_failing_validation_leaves_the_next_its_own_workers(tmp_path, demo_root):
    """The first run of a local sweep starts the workers and then fails validation (its
    max_seq_len exceeds the model's context): they are told there is no run, and the next run
    trains on workers of its own, to a committed adapter, not on the ones already told to stop."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "orchestrator", "train", "-m", "experiment=demo", "tracking=none"]
    overrides = ["data.max_seq_len=100000,128", "trainer.max_steps=2", f"hydra.sweep.dir={sweep}"]
    r = subprocess.run([*command, *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "exceeds the model's context" in r.stdout + r.stderr, r.stderr[-2000:]
    trained = [p for p in sweep.iterdir() if "max_seq_len=128" in p.name]
    assert len(trained) == 1 and (trained[0] / "adapter" / "COMMITTED").is_file(), r.stderr[-2000:]
