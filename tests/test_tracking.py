"""W&B in offline mode: what a run writes under <output_dir>/wandb holds the logged metrics, the
group and the config, and a resumed run continues the same W&B run id.

wandb 0.31 has no Python reader for its run files any more (wandb-core writes them), so
`wandb_records` reads the file format itself: LevelDB-style log blocks, each record one
`wandb_internal_pb2.Record` protobuf, parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from conftest import ONE_PROCESS, read_metrics, train

from orchestrator.rundir import RunDir

pytestmark = pytest.mark.slow

_BLOCK, _HEADER = 32768, 7  # block size of the log, bytes of a chunk header (crc32, length, kind)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path: Path) -> list:
    """Every record of a `run-<id>.wandb` file, as wandb_internal_pb2.Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B run file"
    pos, pending, raw = _HEADER, b"", []
    while len(data) - pos >= _HEADER:
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zeroed space after the last record
            break
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        if kind == _FULL:
            raw.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            raw.append(pending + chunk)
    return [pb.Record.FromString(r) for r in raw]


def read_session(run_dir: Path) -> dict:
    """One W&B session (an offline-run-<time>-<id> directory): its run record, config and history."""
    (file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    history: dict[int, dict] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            history[row["_step"]] = row  # one row per step: metrics logged at the same step are merged
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return {"id": run.run_id, "group": run.run_group, "config": config, "history": history}


def test_offline_run_holds_metrics_group_config_and_resumes_the_same_id(tmp_path, demo_model, ray_local):
    out, group = tmp_path / "run", "tracking-test-group"
    args = [
        "tracking=wandb",
        "tracking.mode=offline",
        f"tracking.group={group}",
        "adapter.r=4",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=2",
        *ONE_PROCESS,  # what is tested is the tracker, which only rank 0 has
    ]
    train(out, *args)
    run_id = RunDir(out).wandb_id.read_text().strip()
    (first,) = (out / "wandb").glob("offline-run-*")
    # What a crash after step 4 was logged, before its checkpoint and the final adapter were
    # committed, leaves behind: the same command resumes from step-2 (killed runs: test_resume.py).
    shutil.rmtree(out / "adapter")
    shutil.rmtree(out / "checkpoints" / "step-4")
    train(out, *args)
    (second,) = set((out / "wandb").glob("offline-run-*")) - {first}

    metrics = read_metrics(out)  # each step once, the resumed session's steps 3-4 replacing the first's
    losses = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    evals = {m["step"]: m["eval_loss"] for m in metrics if "eval_loss" in m}
    assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [2, 4]

    s1, s2 = read_session(first), read_session(second)
    assert s1["id"] == s2["id"] == run_id  # the resumed session continues the stored W&B run
    assert first.name.endswith(f"-{run_id}") and second.name.endswith(f"-{run_id}")
    for s in (s1, s2):
        assert s["group"] == group
        assert s["config"]["adapter"]["r"] == 4 and s["config"]["adapter"]["alpha"] == 32
        assert s["config"]["trainer"]["max_steps"] == 4 and s["config"]["tracking"]["group"] == group
        assert s["config"]["output_dir"] == str(out)
    # The first session logged every step, with eval at step 2 (eval_every) and 4 (the final eval).
    assert sorted(s1["history"]) == [1, 2, 3, 4]
    assert sorted(k for k, row in s1["history"].items() if "eval_loss" in row) == [2, 4]
    # The resumed session logs from its checkpoint on, the same values metrics.jsonl holds.
    assert sorted(s2["history"]) == [3, 4]
    assert sorted(k for k, row in s2["history"].items() if "eval_loss" in row) == [4]
    for step, row in s2["history"].items():
        assert row["loss"] == pytest.approx(losses[step], rel=1e-12)
    assert s2["history"][4]["eval_loss"] == pytest.approx(evals[4], rel=1e-12)
    for step in (1, 2):
        assert s1["history"][step]["loss"] == pytest.approx(losses[step], rel=1e-12)
    assert s1["history"][2]["eval_loss"] == pytest.approx(evals[2], rel=1e-12)
    # Resuming is exact: the steps both sessions trained have the same losses.
    for step in (3, 4):
        assert s1["history"][step]["loss"] == pytest.approx(s2["history"][step]["loss"], rel=1e-6)
