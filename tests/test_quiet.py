"""The demo's terminal, as a user sees it: our own lines and one progress bar, not Ray's internal
warnings, C++ log lines and tracebacks (those stay in Ray's session logs unless ORCHESTRATOR_VERBOSE)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import cli

pytestmark = pytest.mark.slow

RAY_NOISE = ("Failed to query", "core_worker", "Traceback", "PlacementGroupCleaner")


def run_demo(tmp_path: Path, demo_root: Path, verbose: bool):
    """The demo through the CLI with its output (stdout and stderr together) and Ray's temp dir, a
    private one (short: Ray's socket paths live under it)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rq", dir="/tmp"))
    try:
        proc = cli(
            "train",
            "experiment=demo",
            "trainer.max_steps=6",
            "trainer.save_every=3",
            f"output_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'h'}",
            env={
                "ORCHESTRATOR_DEMO_DIR": str(demo_root),
                "ORCHESTRATOR_VERBOSE": "1" if verbose else "0",
                "RAY_TMPDIR": str(ray_tmp),
            },
        )
        ray_driver_log = "".join(p.read_text() for p in ray_tmp.glob("ray/session_*/logs/ray-python-driver-*.log"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    return output, ray_driver_log


def bar_percentages(output: str) -> list[int]:
    """The percentage of every drawing of a progress bar, in order (a bar redraws after \\r)."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output)
    return [int(m.group(1)) for seg in re.split(r"[\r\n]", plain) if (m := re.search(r"(\d+)%\|", seg))]


def check_one_bar(output: str) -> None:
    pct = bar_percentages(output)
    assert pct and pct[-1] == 100, f"no progress bar ending at 100%: {pct}"
    # tqdm redraws a bar in place (update, refresh, close), so one bar shows 100% a few times in a
    # row; a second bar, or the same one reopened, would start over below 100%.
    assert pct == sorted(pct), f"a progress bar went back (e.g. to 0% after 100%): {pct}"
    finished = sum(1 for prev, cur in zip([0, *pct], pct) if cur == 100 and prev != 100)
    assert finished == 1, pct


def test_demo_terminal_is_quiet(tmp_path, demo_root):
    output, ray_driver_log = run_demo(tmp_path, demo_root, verbose=False)
    noisy = [line for line in output.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noisy, "\n".join(noisy)
    assert "Started a local Ray instance" not in output
    check_one_bar(output)
    assert "trainable params:" in output  # rank 0's own lines still come through Ray's log forwarding
    assert "adapter written to" in output
    # Ray's own driver-side lines went to its session's logs, not away.
    assert "Started a local Ray instance" in ray_driver_log


def test_demo_verbose_shows_ray_lines(tmp_path, demo_root):
    output, _ = run_demo(tmp_path, demo_root, verbose=True)
    assert "Started a local Ray instance" in output  # Ray's own logger on the terminal again
    check_one_bar(output)
    assert "adapter written to" in output
