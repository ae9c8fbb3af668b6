"""The built wheel works anywhere: installed into a plain directory and run from another one, it
composes configs, renders the sbatch script and trains the demo from its own packaged conf/,
slurm/ and launch/ (orchestrator/conf, orchestrator/slurm, orchestrator.launch), with the
terminal a user sees."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the working tree without what a build never reads.
NOT_SOURCES = {
    ".git",
    ".venv",
    "tests",
    "bench",
    "build",
    "dist",
    "outputs",
    "multirun",
    "wandb",
    ".pytest_cache",
    ".whl",
    ".dev",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> dict:
    """Build the wheel from a copy of the sources (a build writes build/ into its source tree),
    install it with --target and return the paths of both."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for entry in REPO.iterdir():
        if entry.name not in NOT_SOURCES:
            (shutil.copytree(entry, src / entry.name, ignore=skip) if entry.is_dir() else shutil.copy2(entry, src))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", src],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "DS_BUILD_OPS": "0"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / "dist").glob("orchestrator-*.whl")
    r = subprocess.run(
        [*pip, "install", "--no-deps", "--target", tmp / "site", whl], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout + r.stderr
    work = tmp / "work"  # the directory every command runs in: not the repository
    work.mkdir()
    installed = {"whl": whl, "site": tmp / "site", "work": work, "tmp": tmp}
    # The demo model, built once by the wheel's code before the tests (its log would precede a dry run's script).
    r = run(installed, "-c", "from orchestrator import demo; demo.ensure_demo_assets()")
    assert r.returncode == 0, r.stderr
    return installed


def run(wheel: dict, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a directory outside the repository, with the wheel's copy of the package
    ahead of the editable install on sys.path."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_CONF_DIR"},
        "PYTHONPATH": str(wheel["site"]),
        "ORCHESTRATOR_DEMO_DIR": str(wheel["tmp"] / "demo"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "ORCHESTRATOR_HOME": str(wheel["tmp"] / "home"),
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, *args], cwd=wheel["work"], capture_output=True, text=True, timeout=timeout, env=env
    )


def _repo_files(top: str, *patterns: str) -> set[str]:
    return {
        p.relative_to(REPO / top).as_posix()
        for pattern in patterns
        for p in (REPO / top).glob(pattern)
        if "__pycache__" not in p.parts
    }


def test_wheel_carries_code_configs_and_templates(wheel):
    names = set(zipfile.ZipFile(wheel["whl"]).namelist())
    expected = (
        {f"orchestrator/{f}" for f in _repo_files("orchestrator", "**/*.py", "assets/*.jsonl")}
        | {f"orchestrator/launch/{f}" for f in _repo_files("launch", "**/*.py")}
        | {f"orchestrator/conf/{f}" for f in _repo_files("conf", "**/*.yaml")}
        | {"orchestrator/slurm/train.sbatch.j2", "orchestrator/slurm/dev-cluster.sh"}
    )
    assert expected - names == set(), "missing from the wheel (list new subpackages / config groups in pyproject.toml)"
    tops = {n.split("/")[0] for n in names}
    assert tops == {"orchestrator", "orchestrator-0.1.0.dist-info"}, tops


def test_installed_package_is_the_wheels_and_has_no_top_level_launch(wheel):
    r = run(
        wheel,
        "-c",
        """if True:
        import importlib.util, json
        import orchestrator, orchestrator.launch, orchestrator.launch.slurm
        from orchestrator.config import CONF_DIR
        print(json.dumps({"orchestrator": orchestrator.__file__, "launch": orchestrator.launch.__file__,
                          "conf": str(CONF_DIR), "template": str(orchestrator.launch.slurm.TEMPLATE),
                          "top_level_launch": importlib.util.find_spec("launch") is not None}))""",
    )
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    site = wheel["site"].resolve()
    for key in ("orchestrator", "launch", "conf", "template"):
        assert Path(found[key]).resolve().is_relative_to(site), (key, found[key])
    assert not found["top_level_launch"]


def test_composes_a_config(wheel):
    r = run(wheel, "-m", "orchestrator", "train", "experiment=demo", "--cfg", "job")
    assert r.returncode == 0, r.stderr
    assert "name: demo" in r.stdout and "lora" in r.stdout, r.stdout


def test_renders_the_sbatch_script(wheel):
    tmp = wheel["tmp"]
    r = run(
        wheel,
        "-m",
        "orchestrator",
        "train",
        "experiment=demo",
        "cluster=slurm",
        f"storage_path={tmp}/s",
        "name=w",
        f"hydra.run.dir={tmp}/h",
        "--dry-run",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash"), r.stdout[:500]


RAY_NOISE = ("Failed to query", "core_worker", "Traceback", "PlacementGroupCleaner", "Setting up process group")


def bar_percentages(output: str) -> list[int]:
    """The percentage of every drawing of a progress bar, in order (a bar redraws after \\r)."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    return [int(m.group(1)) for seg in re.split(r"[\r\n]", plain) if (m := re.search(r"(\d+)%\|", seg))]


def test_trains_the_demo_with_a_quiet_terminal(wheel):
    """The demo as a user runs it from the installed wheel: our own lines and one progress bar that
    ends at 100%; Ray's internal warnings, C++ log lines and tracebacks stay in Ray's session logs
    (ORCHESTRATOR_VERBOSE=1 shows them: test_sweep.py)."""
    out, ray_tmp = (
        wheel["tmp"] / "out",
        Path(tempfile.mkdtemp(prefix="rq", dir="/tmp")),
    )  # short: Ray's sockets live there
    try:
        r = run(
            wheel,
            "-m",
            "orchestrator",
            "train",
            "experiment=demo",
            "trainer.max_steps=6",
            "trainer.save_every=3",
            f"output_dir={out}",
            f"hydra.run.dir={wheel['tmp']}/h2",
            env={"RAY_TMPDIR": str(ray_tmp)},
            timeout=600,
        )
        ray_driver_log = "".join(p.read_text() for p in ray_tmp.glob("ray/session_*/logs/ray-python-driver-*.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-6000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert f"adapter written to {out / 'adapter'}" in r.stdout

    noisy = [line for line in output.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, "\n".join(noisy)
    assert "trainable params:" in output  # rank 0's own lines come through Ray's log forwarding
    assert "Started a local Ray instance" not in output and "Started a local Ray instance" in ray_driver_log
    pct = bar_percentages(output)
    assert pct and pct[-1] == 100, f"no progress bar ending at 100%: {pct}"
    # tqdm redraws a bar in place (update, refresh, close), so one bar shows 100% a few times in a
    # row; a second bar, or the same one reopened, would start over below 100%.
    assert pct == sorted(pct), f"a progress bar went back (e.g. to 0% after 100%): {pct}"
