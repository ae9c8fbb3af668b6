"""Hydra multirun sweeps on the local target."""

from __future__ import annotations

from conftest import cli


def test_failed_run_does_not_stop_the_sweep(tmp_path, demo_root):
    sweep = tmp_path / "sweep"
    r = cli("train", "-m", "experiment=demo", "adapter.r=0,4", "trainer.max_steps=2", "trainer.save_every=0",
            "tracking=none", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=600)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "1 run(s) of the sweep failed" in r.stderr and "adapter.r: must be a positive integer, got 0" in r.stdout + r.stderr
    runs = {p.name: p for p in sweep.iterdir() if p.is_dir()}
    failed = next(p for n, p in runs.items() if "adapter.r=0" in n)
    done = next(p for n, p in runs.items() if "adapter.r=4" in n)
    assert "error: invalid configuration" in (failed / "train.log").read_text()
    assert not (failed / "adapter").exists()
    assert (done / "adapter" / "COMMITTED").is_file()  # the sweep went on after the failure


def test_real_sweep_and_its_report(tmp_path, demo_root):
    import json

    from orchestrator import report

    sweep = tmp_path / "sweep"
    r = cli("train", "-m", "experiment=demo", "adapter.r=4,8", "adapter.alpha=8,16", "trainer.max_steps=3",
            "trainer.save_every=0", "trainer.eval_every=2", "tracking=none", f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "adapter" / "COMMITTED").is_file())
    assert len(runs) == 4

    out = cli("sweep", "report", str(sweep))
    assert out.returncode == 0, out.stderr
    for name in ("report.csv", "report.md", "loss_curves.png", "heatmap.png"):
        assert (sweep / "report" / name).stat().st_size > 0
    rows = {row["run"]: row for row in report.collect(sweep)}
    assert {(row["r"], row["alpha"]) for row in rows.values()} == {(4, 8), (4, 16), (8, 8), (8, 16)}
    for run in runs:
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        row = rows[run.name]
        assert row["status"] == "done" and row["steps"] == 3
        assert row["final_eval_loss"] == evals[-1] and row["best_eval_loss"] == min(evals)
        assert row["final_loss"] == [m["loss"] for m in metrics if "loss" in m][-1]
    ordered = [row["best_eval_loss"] for row in report.sort_rows(list(rows.values()))]
    assert ordered == sorted(ordered)
