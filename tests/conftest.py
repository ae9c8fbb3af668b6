"""Session-wide fixtures: demo assets built once, one local Ray instance, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Set before anything imports wandb or ray.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Demo assets for the whole session, in a private directory (never the user's cache)."""
    root = tmp_path_factory.mktemp("demo")
    os.environ["ORCHESTRATOR_DEMO_DIR"] = str(root)
    from orchestrator import demo

    demo.ensure_demo_assets(root)
    return root


@pytest.fixture(scope="session")
def demo_model(demo_root) -> Path:
    return demo_root / "tiny-llama"


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance shared by every test that trains (starting Ray costs ~10 s)."""
    import ray

    # Worker logs stay in Ray's session logs: a failed run's error reaches the test through RunFailed.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cli(*args: str, cwd=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m orchestrator ARGS` as a user runs it (with `env` added to the environment),
    its output captured."""
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def train_losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


def train(out: Path, *overrides: str) -> Path:
    """Compose the demo experiment with overrides, validate it as the CLI does, train it on the
    shared Ray instance (needs the ray_local and demo_model fixtures) and return the output dir."""
    from orchestrator import driver
    from orchestrator.config import compose, validate

    cfg = compose(["experiment=demo", f"output_dir={out}", "tracking=none", *overrides])
    driver.train(validate(cfg))
    return out


@pytest.fixture
def train_run(demo_model, ray_local, tmp_path):
    """train_run(*overrides, name=...) -> output dir of a finished run under tmp_path."""

    def run(*overrides: str, name: str = "run") -> Path:
        return train(tmp_path / name, *overrides)

    return run
