"""`orchestrator sweep report`: a summary of a multirun, on a synthetic sweep directory."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import cli

from orchestrator import report

HIDDEN, LAYERS, MODULES = 64, 2, ("q_proj", "v_proj")
STEPS, LOG_EVERY, EVAL_EVERY = 20, 5, 10
COMMON = ["experiment=demo", "tracking=none", f"trainer.max_steps={STEPS}"]


def _config(run_dir: Path, r: int, alpha: int) -> dict:
    return {
        "model": {
            "path": "/data/models/tiny-llama",
            "dtype": "bf16",
            "gradient_checkpointing": False,
            "trust_remote_code": False,
            "attn_implementation": "sdpa",
        },
        "quant": {"kind": "nf4", "double_quant": True, "storage_dtype": None},
        "adapter": {
            "kind": "lora",
            "r": r,
            "alpha": float(alpha),
            "dropout": 0.05,
            "target_modules": list(MODULES),
            "init_seed": 0,
        },
        "strategy": {"name": "fsdp", "reshard_after_forward": True},
        "optim": {"name": "paged_adamw_8bit", "lr": 2e-4, "weight_decay": 0.0, "warmup_steps": 2, "max_grad_norm": 1.0},
        "data": {"name": "demo", "eval_fraction": 0.1, "max_length": 256},
        "trainer": {
            "max_steps": STEPS,
            "micro_batch_size": 4,
            "grad_accum": 1,
            "log_every": LOG_EVERY,
            "eval_every": EVAL_EVERY,
            "save_every": 0,
        },
        "cluster": {"address": None, "num_workers": 2, "use_gpu": True},
        "tracking": {"mode": "none", "project": "orchestrator", "group": None, "name": None},
        "output_dir": str(run_dir),
        "name": None,
        "resume": "auto",
    }


def _metrics(r: int, alpha: int, last_step: int = STEPS) -> list[dict]:
    """Train rows every LOG_EVERY steps, eval rows every EVAL_EVERY steps and at the end; the loss
    depends on r and alpha so that the runs order r=8,alpha=16 < r=4,alpha=16 < r=8,alpha=8 < r=4,alpha=8."""
    rows, offset = [], 0.4 / r + 1.0 / alpha
    for step in range(LOG_EVERY, last_step + 1, LOG_EVERY):
        rows.append(
            {
                "step": step,
                "loss": 3.0 - 0.05 * step + offset,
                "lr": 2e-4 * (1 - step / STEPS),
                "grad_norm": 0.8,
                "tokens_per_s": 1000.0 + 37.0 * step + 10 * r + (500.0 if step == LOG_EVERY else 0.0),
                "mfu": 0.01 * r + 0.001 * step,
                "target_tokens": 512.0,
                "peak_memory_bytes": float((300 + 3 * step + r) * 2**20 + 12345),
                "param_bytes_per_worker": 2.5e7,
                "epoch": 0.0,
            }
        )
        if step % EVAL_EVERY == 0:
            eval_loss = 2.5 + offset + (0.05 if step == STEPS else 0.0)  # overfits after step 10: best != final
            rows.append({"step": step, "eval_loss": eval_loss, "eval_ppl": 2.718281828**eval_loss})
    return rows


def _write_run(sweep: Path, r: int, alpha: int, failed_at: int | None = None) -> Path:
    import torch
    from safetensors.torch import save_file

    run_dir = sweep / ",".join(
        sorted([f"adapter.alpha={alpha}", f"adapter.r={r}", *COMMON])
    )  # Hydra's override_dirname
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([*COMMON[:1], f"adapter.r={r}", f"adapter.alpha={alpha}", *COMMON[1:]])
    )
    (run_dir / "config.yaml").write_text(yaml.safe_dump(_config(run_dir, r, alpha), sort_keys=False))
    rows = _metrics(r, alpha, failed_at or STEPS)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    log = [f"[2026-11-23 09:13:4{i}][orchestrator][INFO] - step {x['step']}" for i, x in enumerate(rows[:3])]
    if failed_at:
        log += [
            f"[2026-11-23 09:14:02][orchestrator][ERROR] - error: training failed on the workers: loss is nan at step {failed_at + 2}",
            "Traceback (most recent call last):",
            "  ...",
        ]
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write('{"step": 15, "loss": 2.')  # killed mid-line
    else:
        adapter = run_dir / "adapter"
        adapter.mkdir()
        tensors = {}
        for layer in range(LAYERS):
            for m in MODULES:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                tensors[f"{prefix}.lora_A.weight"] = torch.zeros(r, HIDDEN, dtype=torch.bfloat16)
                tensors[f"{prefix}.lora_B.weight"] = torch.zeros(HIDDEN, r, dtype=torch.bfloat16)
        save_file(tensors, adapter / "adapter_model.safetensors")
        (adapter / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": alpha, "peft_type": "LORA"}))
        (adapter / "manifest.json").write_text(
            json.dumps({"step": STEPS, "base_model_path": "/data/models/tiny-llama"})
        )
        (adapter / "COMMITTED").write_text("")
    (run_dir / "train.log").write_text("\n".join(log) + "\n")
    return run_dir


@pytest.fixture
def sweep(tmp_path) -> Path:
    sweep = tmp_path / "multirun" / "2026-11-23" / "09-13-42"
    for r in (4, 8):
        for alpha in (8, 16):
            _write_run(sweep, r, alpha)
    _write_run(sweep, 16, 16, failed_at=12)  # best eval loss of all at step 10, but it failed
    (sweep / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    return sweep


def test_collect_rows_and_order(sweep):
    rows = report.collect(sweep)
    assert [(x["r"], x["alpha"]) for x in rows] == [(8, 16), (4, 16), (8, 8), (4, 8), (16, 16)]
    assert [x["status"] for x in rows[:4]] == ["done"] * 4
    assert rows[-1]["status"] == "failed: training failed on the workers: loss is nan at step 14"

    for row in rows:
        r, alpha = row["r"], row["alpha"]
        written = _metrics(r, alpha, 12 if r == 16 else STEPS)
        train = [x for x in written if "loss" in x]
        evals = [x["eval_loss"] for x in written if "eval_loss" in x]
        assert row["run"].startswith(f"adapter.alpha={alpha},adapter.r={r},")
        assert row["overrides"] == ",".join(COMMON)
        assert row["final_eval_loss"] == pytest.approx(evals[-1])
        assert row["best_eval_loss"] == pytest.approx(min(evals))
        assert row["final_loss"] == pytest.approx(train[-1]["loss"])
        assert row["tokens_per_s"] == pytest.approx(statistics.median(x["tokens_per_s"] for x in train))
        assert row["mfu"] == pytest.approx(statistics.median(x["mfu"] for x in train))
        assert row["peak_memory_mib"] == pytest.approx(max(x["peak_memory_bytes"] for x in train) / 2**20)
        assert row["steps"] == train[-1]["step"]
        assert row["trainable_params"] == (None if r == 16 else LAYERS * len(MODULES) * 2 * r * HIDDEN)
    assert rows[0]["best_eval_loss"] < rows[0]["final_eval_loss"]  # best is the step-10 eval, not the last


def test_write_report(sweep):
    rows = report.collect(sweep)
    paths = report.write_report(sweep, rows)
    assert set(paths) == {"csv", "md", "loss_curves", "heatmap"}
    for p in paths.values():
        assert p.parent == sweep / "report" and p.stat().st_size > 0
    for name in ("loss_curves", "heatmap"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader(paths["csv"].open()))
    assert [t["run"] for t in table] == [x["run"] for x in rows]
    assert float(table[0]["best_eval_loss"]) == pytest.approx(rows[0]["best_eval_loss"])
    assert table[-1]["trainable_params"] == "" and table[-1]["status"].startswith("failed: ")
    md = paths["md"].read_text()
    assert md.count("\n| ") == len(rows) + 2 and all(x["run"] in md for x in rows)
    # The report directory is not mistaken for a run on the next report.
    assert len(report.collect(sweep)) == len(rows)


def test_run_that_failed_before_writing_its_config(tmp_path):
    """An invalid configuration fails before config.yaml: r/alpha come from .hydra/overrides.yaml,
    and the status carries the first problem listed under the error line."""
    sweep = tmp_path / "sweep"
    _write_run(sweep, 4, 8)
    bad = sweep / "adapter.alpha=8,adapter.r=0,experiment=demo"
    (bad / ".hydra").mkdir(parents=True)
    (bad / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump(["experiment=demo", "adapter.r=0", "adapter.alpha=8", "output_dir=/x"])
    )
    (bad / "train.log").write_text(
        "[2026-11-23 09:13:42,001][orchestrator][ERROR] - error: invalid configuration (1 problem):\n"
        "  - adapter.r: must be a positive integer, got 0\n"
    )
    rows = report.collect(sweep)
    assert [x["run"] for x in rows] == [rows[0]["run"], bad.name]
    failed = rows[-1]
    assert (failed["r"], failed["alpha"], failed["overrides"], failed["steps"]) == (0, 8, "experiment=demo", 0)
    assert failed["status"] == "failed: invalid configuration (1 problem): adapter.r: must be a positive integer, got 0"
    assert failed["best_eval_loss"] is None and failed["trainable_params"] is None


def test_cli(sweep, tmp_path):
    r = cli("sweep", "report", str(sweep))
    assert r.returncode == 0, r.stderr[-2000:]
    for row in report.collect(sweep):
        assert row["run"] in r.stdout
    assert "loss is nan at step 14" in r.stdout
    assert str(sweep / "report" / "heatmap.png") in r.stdout

    missing = cli("sweep", "report", str(tmp_path / "nope"))
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and "does not exist" in missing.stderr
    (tmp_path / "empty").mkdir()
    empty = cli("sweep", "report", str(tmp_path / "empty"))
    assert empty.returncode == 2 and "no runs" in empty.stderr
