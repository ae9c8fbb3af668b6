"""Session-wide fixtures: demo assets built once, one local Ray instance, W&B offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

# Set before anything imports wandb or ray.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller looks at its workers every 2 s by default, so each run ends up to 2 s after
# its workers did; the suite trains dozens of runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# The job index and the local data cache: the suite's own, not the user's ~/.cache/orchestrator.
os.environ["ORCHESTRATOR_HOME"] = tempfile.mkdtemp(prefix="orchestrator-home-")


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
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def start_train(log: Path, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    """`python -m orchestrator train ARGS` in a session of its own, as a terminal starts it, so that
    a test can signal or kill all of it; its output goes to `log`."""
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train", *args],
        cwd=cwd,
        stdout=open(log, "w"),  # the child writes it; it closes with the test process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def adapter_tensors(out: Path) -> dict:
    """The final adapter's tensors of the run in `out`."""
    from safetensors.torch import load_file

    return load_file(Path(out) / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(a: Path, b: Path) -> None:
    """The final adapters of two runs are equal bit for bit (CPU kernels and the 2-rank gloo sum
    are deterministic)."""
    import torch

    ta, tb = adapter_tensors(a), adapter_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def predicted_and_measured(out: Path, monkeypatch, **strategy) -> tuple[dict, dict, object]:
    """The planner's load and steady-state peaks for a finished run (its config.yaml, with the
    worker baseline the run logged, and `strategy` fields changed) and the peaks its workers
    measured, and the plan itself."""
    import yaml

    from orchestrator.config import RunConfig, to_typed
    from orchestrator.plan import CALIBRATION, make_plan

    run = to_typed(yaml.safe_load((out / "config.yaml").read_text()), RunConfig)
    for k, v in strategy.items():
        setattr(run.strategy, k, v)
    rows = [m for m in read_metrics(out) if "steady_peak_memory_bytes" in m]
    measured = {
        "load": max(m["load_peak_memory_bytes"] for m in rows),
        "steady": max(m["steady_peak_memory_bytes"] for m in rows),
    }
    monkeypatch.setitem(CALIBRATION, "cpu_worker_bytes", max(m["start_memory_bytes"] for m in rows))
    p = make_plan(run, device_memory=2**40).plans[run.strategy.name]
    return {"load": p.load_bytes, "steady": p.steady_bytes}, measured, p


def train_losses(out: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(out) if "loss" in m]


def train(out: Path, *overrides: str) -> Path:
    """Compose the demo experiment with overrides, validate it as the CLI does, train it and return
    the output dir. Several workers train on the shared Ray instance (needs the ray_local and
    demo_model fixtures); one worker runs the same recipe in this process, where Ray would only
    add a worker process to start."""
    from orchestrator import driver
    from orchestrator.config import as_dict, compose, validate
    from orchestrator.train_loop import train_loop

    run = validate(compose(["experiment=demo", f"output_dir={out}", "tracking=none", *overrides]))
    if run.cluster.num_workers > 1:
        driver.train(run)
    elif driver.prepare_output_dir(run):
        train_loop({"run": as_dict(run)})
    return out


@pytest.fixture(scope="session")
def demo_run(demo_model, ray_local, tmp_path_factory) -> Path:
    """The demo experiment as shipped (QLoRA, 2 FSDP workers, 30 steps, W&B offline), trained once
    for every test that needs a real trained adapter."""
    return train(tmp_path_factory.mktemp("demo-run") / "demo", "tracking=wandb", "tracking.mode=offline")


# One worker (the same global batch): such runs train in the test process (see train()).
ONE_PROCESS = ["strategy=single", "cluster.num_workers=1", "trainer.micro_batch_size=8"]

# Equivalence runs: the same 10 steps and global batch under each strategy, compared with one process.
EQUIVALENCE = [
    "trainer.max_steps=10",
    "adapter.dropout=0",
    "trainer.save_every=0",
    "optim=paged_adamw_32bit",
    "data.eval_fraction=0.05",
    "strategy.param_persistence_threshold=0",
]
# Packed rows (the default for the demo's Llama) in every case but bf16, which pads and groups by length.
EQUIVALENCE_CASES = {
    "fp32": ["model.dtype=fp32", "quant=none"],
    "bf16": ["model.dtype=bf16", "quant=none", "data.packing=false", "data.group_by_length=true"],
    "fp32-nf4": ["model.dtype=fp32", "quant=nf4"],
    "bf16-nf4": ["model.dtype=bf16", "quant=nf4"],
}


def equivalence_overrides(case: str, strategy: str) -> list[str]:
    """The overrides of an equivalence run: single runs 1 worker with micro batch 8, the others 2
    workers with 4. The fsdp run of fp32-nf4 also recomputes activations (gradient checkpointing
    over the frozen 4-bit base), which must not change the numbers."""
    shape = ONE_PROCESS if strategy == "single" else ["cluster.num_workers=2", "trainer.micro_batch_size=4"]
    if (case, strategy) == ("fp32-nf4", "fsdp"):
        shape = [*shape, "model.gradient_checkpointing=true"]
    return [*EQUIVALENCE, *EQUIVALENCE_CASES[case], f"strategy={strategy}", *shape]


@pytest.fixture(scope="session")
def equivalence_run(demo_model, ray_local, tmp_path_factory):
    """equivalence_run(case, strategy) -> output dir, trained on first use and shared by the tests
    of every strategy (and by the resume tests, as their uninterrupted reference)."""
    root = tmp_path_factory.mktemp("equivalence")
    done: dict[tuple[str, str], Path] = {}

    def get(case: str, strategy: str) -> Path:
        if (case, strategy) not in done:
            done[case, strategy] = train(root / f"{case}-{strategy}", *equivalence_overrides(case, strategy))
        return done[case, strategy]

    return get


@pytest.fixture
def train_run(demo_model, ray_local, tmp_path):
    """train_run(*overrides, name=...) -> output dir of a finished run under tmp_path."""

    def run(*overrides: str, name: str = "run") -> Path:
        return train(tmp_path / name, *overrides)

    return run
