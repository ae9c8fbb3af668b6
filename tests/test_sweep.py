"""A real Hydra multirun on the local target, driven by a sweep preset, with a run that fails, and
its report."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import cli

pytestmark = pytest.mark.slow


def test_preset_sweep_goes_on_after_a_failed_run_and_is_reported(tmp_path, demo_root):
    from orchestrator import report

    sweep = tmp_path / "sweep"
    # The preset's 4 ranks, cut to 2 by a command-line sweep of the same key (it replaces the
    # preset's); alpha follows 2r. r=0 fails validation, and the sweep goes on.
    r = cli(
        "train",
        "--verbose",  # Ray's own lines on the terminal too (test_wheel.py: without it, they are not)
        "-m",
        "experiment=demo",
        "sweep=rank_alpha_2r",
        "adapter.r=0,8",
        "trainer.max_steps=3",
        "trainer.save_every=0",
        "trainer.eval_every=2",
        "tracking=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=900,
    )
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Started a local Ray instance" in r.stdout + r.stderr
    assert (
        "1 run(s) of the sweep failed" in r.stderr
        and "adapter.r: must be a positive integer, got 0" in r.stdout + r.stderr
    )
    runs = {p.name: p for p in sweep.iterdir() if p.is_dir() and p.name != "report"}
    failed = next(p for n, p in runs.items() if "adapter.r=0" in n)
    assert "error: invalid configuration" in (failed / "train.log").read_text()
    assert not (failed / "adapter").exists()
    done = sorted(p for p in runs.values() if (p / "adapter" / "COMMITTED").is_file())
    assert len(done) == 1  # the sweep went on after the failure
    for run in done:
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["adapter"]["alpha"] == 2 * cfg["adapter"]["r"] and "sweep" not in cfg
        adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["r"] == cfg["adapter"]["r"] and adapter_cfg["lora_alpha"] == 2 * cfg["adapter"]["r"]

    out = cli("sweep", "report", str(sweep))
    assert out.returncode == 0, out.stderr
    for name in ("report.csv", "report.md", "loss_curves.png", "heatmap.png"):
        assert (sweep / "report" / name).stat().st_size > 0
    rows = {row["run"]: row for row in report.collect(sweep)}
    assert rows[failed.name]["status"].startswith("failed: ") and rows[failed.name]["r"] == 0
    assert {(rows[run.name]["r"], rows[run.name]["alpha"]) for run in done} == {(8, 16)}
    for run in done:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        row = rows[run.name]
        assert row["status"] == "done" and row["steps"] == 3
        assert row["final_eval_loss"] == evals[-1] and row["best_eval_loss"] == min(evals)
        assert row["final_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
    ordered = [row["best_eval_loss"] for row in report.sort_rows(list(rows.values())) if row["status"] == "done"]
    assert ordered == sorted(ordered)
