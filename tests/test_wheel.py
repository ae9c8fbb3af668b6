"""The built wheel works anywhere: installed into a plain directory and run from another one, it
composes configs, renders the sbatch script and trains the demo from its own packaged conf/,
slurm/ and launch/ (orchestrator/conf, orchestrator/slurm, orchestrator.launch)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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


def run(wheel: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python ARGS` in a directory outside the repository, with the wheel's copy of the package
    ahead of the editable install on sys.path."""
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_CONF_DIR"}
    env.update(
        PYTHONPATH=str(wheel["site"]),
        ORCHESTRATOR_DEMO_DIR=str(wheel["tmp"] / "demo"),
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        ORCHESTRATOR_HOME=str(wheel["tmp"] / "home"),
    )
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


def test_trains_the_demo(wheel):
    out = wheel["tmp"] / "out"
    r = run(
        wheel,
        "-m",
        "orchestrator",
        "train",
        "experiment=demo",
        "trainer.max_steps=2",
        "trainer.save_every=0",
        "tracking=none",
        "data.eval_fraction=0",
        f"output_dir={out}",
        f"hydra.run.dir={wheel['tmp']}/h2",
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
