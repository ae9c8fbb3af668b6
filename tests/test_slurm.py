"""cluster=slurm: the rendered sbatch script (golden files), and real jobs on the dev cluster that
slurm/dev-cluster.sh installs and starts (two slurmd on this host)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import assert_same_adapter, cli, read_metrics, wait_until
from orchestrator.launch.slurm import show

from orchestrator.packaged import packaged

GOLDEN = Path(__file__).parent / "golden"
SECRET = "hf-fake-token-93b1c0ffee"


def hq(value: str) -> str:
    """A value quoted for Hydra's override grammar, as a user types it after `key=`."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# Fixed paths, so the rendering does not depend on this machine.
FIXED = ["model.path=/models/llama-3-8b", "data.path=/data/train.jsonl", "cluster.python=/opt/venv/bin/python"]
CASES = {
    "one_node": ["storage_path=/shared/runs", "name=demo"],
    "two_nodes_gpu": [
        "storage_path=/shared/runs",
        "name=sweep/r16",
        "cluster.num_workers=8",
        "cluster.use_gpu=true",
        "cluster.cpus_per_worker=8",
        "cluster.slurm.nodes=2",
        "cluster.slurm.gpus_per_node=4",
        "cluster.slurm.mem=400G",
        "cluster.slurm.time=2-00:00:00",
        "cluster.slurm.partition=gpu",
        "cluster.slurm.account=proj-42",
        "cluster.slurm.qos=high",
        "cluster.slurm.constraint=h100",
        "cluster.slurm.extra_sbatch=[--exclusive,'--reservation=maint window']",
        "cluster.env.NCCL_DEBUG=WARN",
        "cluster.slurm.setup=[module load cuda/12.4,source /opt/venv/bin/activate]",
        "cluster.slurm.signal_grace_s=600",
    ],
    "quoted_paths": [
        "storage_path=" + hq('/shared/my runs/it\'s "here"'),
        "name=" + hq("a b $(touch pwned) `id` 'q'"),
        "cluster.env.NOTE=" + hq("$HOME is not expanded; neither is $(id)"),
        "cluster.slurm.requeue=false",
    ],
}


def render(overrides: list[str]) -> str:
    from orchestrator.launch import slurm

    from orchestrator.config import compose, validate

    run = compose(["experiment=demo", "cluster=slurm", "output_dir=unused", *FIXED, *overrides])
    validate(run, environment=False)
    return slurm.render(run)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_matches_golden_file(case, monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_DEMO_DIR", raising=False)
    script = render(CASES[case])
    golden = GOLDEN / f"slurm_{case}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text(), f"rendering changed; inspect it and rerun with UPDATE_GOLDEN=1 ({golden})"
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_quoted_values_stay_plain_text(monkeypatch):
    monkeypatch.delenv("ORCHESTRATOR_DEMO_DIR", raising=False)
    script = render(CASES["quoted_paths"])
    assert "#SBATCH --job-name=\"a b $(touch pwned) `id` 'q'\"" in script
    assert "RUN_DIR='/shared/my runs/it'\"'\"'s \"here\"/a b $(touch pwned) `id` '\"'\"'q'\"'\"''" in script
    assert "#SBATCH --no-requeue" in script and "scontrol requeue" not in script
    # What bash makes of the body's assignments: the exact strings, nothing executed.
    body = "\n".join(x for x in script.splitlines() if x.startswith(("RUN_DIR=", "export NOTE=")))
    shown = subprocess.run(
        ["bash", "-c", body + '\nprintf "%s\\n" "$RUN_DIR" "$NOTE"'], capture_output=True, text=True, check=True
    )
    assert shown.stdout.splitlines() == [
        "/shared/my runs/it's \"here\"/a b $(touch pwned) `id` 'q'",
        "$HOME is not expanded; neither is $(id)",
    ]


def test_newlines_cannot_reach_sbatch_lines(monkeypatch):
    from orchestrator.launch import SubmitError

    with pytest.raises(SubmitError, match="control characters"):
        render(["storage_path=/shared", "name=ok", "cluster.slurm.partition='gpu\nrm -rf /'"])


# --- real jobs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slurm_cluster(demo_model, tmp_path_factory):
    """The dev cluster, started (and installed) by the repo's script; stopped again if we started it."""
    script = packaged("slurm") / "dev-cluster.sh"
    was_up = subprocess.run([script, "status"], capture_output=True).returncode == 0
    if not was_up:
        subprocess.run([script, "up"], check=True, timeout=900)
    home = tmp_path_factory.mktemp("orchestrator-home")
    yield {"ORCHESTRATOR_HOME": str(home), "HF_TOKEN": SECRET}
    if not was_up:
        subprocess.run([script, "down"], check=True, timeout=120)


def submit(env, cwd: Path, storage: Path, name: str, *overrides: str, timeout: float = 600):
    return cli(
        "train",
        "experiment=demo",
        "cluster=slurm",
        f"storage_path={hq(str(storage))}",
        f"name={hq(name)}",
        "tracking=none",
        f"hydra.run.dir={cwd / 'submit'}",
        *overrides,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def slurm_job(result) -> dict:
    line = next(x for x in result.stdout.splitlines() if x.startswith("submitted slurm job "))
    return show(line.split()[3])


# The demo as shipped (30 steps of ~0.1 s): a signal sent after step 3 lands well before the end.
STEPS = ("trainer.log_every=1",)
NAME = "demo $(touch pwned) 'q' \"dq\""


@pytest.mark.cluster
def test_preempted_demo_on_two_nodes_requeues_and_resumes_to_the_same_adapter(slurm_cluster, demo_run, tmp_path):
    """The demo through sbatch on both nodes, under a run name and storage path that try shell
    injection, with a secret in the environment: Slurm's preemption warning makes it commit a
    checkpoint, requeue and resume, and it ends with the adapter of an uninterrupted run."""
    reference = demo_run  # the same run, uninterrupted, with 2 workers as the job
    storage = tmp_path / "storage $(touch pwned) 'x'"
    r = submit(slurm_cluster, tmp_path, storage, NAME, *STEPS, "cluster.slurm.nodes=2", "cluster.detach=true")
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = slurm_job(r)["JobId"]
    run_dir = storage / NAME
    wait_until(
        lambda: (run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 3, 300, "training to start"
    )
    # What Slurm sends before a preemption or the time limit (--signal=B:USR1), sent now.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    log = cli("jobs", "logs", job_id, "--follow", env=slurm_cluster, timeout=600).stdout
    assert "received SIGUSR1: checkpointing at the next step boundary" in log  # the driver got it
    stopped = int(log.split("preemption requested: committed step-")[1].split(",")[0])
    assert 3 <= stopped < 30
    assert "checkpoint committed; requeueing job" in log and "(restart 1)" in log
    assert f"resuming from {run_dir}/checkpoints/step-{stopped} at step {stopped}" in log
    job = show(job_id)
    # Requeued once, then finished; a job that ends normally is not requeued again.
    assert job["JobState"] == "COMPLETED" and job["Restarts"] == "1" and job["JobName"] == NAME
    info = cli("jobs", "status", job_id, env=slurm_cluster)
    assert info.returncode == 0 and f"{job_id} COMPLETED" in info.stdout and "Restarts=1" in info.stdout
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, 31))
    assert_same_adapter(run_dir, reference)

    assert job["NodeList"] == "node[1-2]" and "on node1 node2" in log
    # Each Ray node offers one CPU, so the two one-CPU workers can only run on both nodes at once.
    assert re.search(r"Ray cluster of 2 node\(s\) \([\d.]+: CPU=1; [\d.]+: CPU=1\) holds 2 workers", log)
    assert "trainable params" in log and "credentials in the worker environment: HF_TOKEN" in log  # the secret arrived
    assert not list(tmp_path.rglob("pwned")) and not Path("pwned").exists()
    written = [p for p in tmp_path.rglob("*") if p.is_file()] + list(
        Path(slurm_cluster["ORCHESTRATOR_HOME"]).rglob("*.json")
    )
    assert any(p.suffix == ".sbatch" for p in written) and any(p.name.startswith("slurm-") for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []


@pytest.mark.cluster
def test_refusals_carry_slurms_message_and_leave_nothing_queued(slurm_cluster, tmp_path):
    r = submit(slurm_cluster, tmp_path, tmp_path / "storage", "bad", "cluster.slurm.partition=nope")
    assert r.returncode == 1 and "sbatch refused the job" in r.stderr and "invalid partition" in r.stderr.lower()
    queued = subprocess.run(["squeue", "-h", "-n", "bad"], capture_output=True, text=True, check=True).stdout
    assert queued.strip() == ""
    records = [json.loads(p.read_text()) for p in (Path(slurm_cluster["ORCHESTRATOR_HOME"]) / "jobs").glob("*.json")]
    assert all(rec["run_dir"] != str(tmp_path / "storage" / "bad") for rec in records)


@pytest.mark.cluster
def test_dry_run_prints_the_script_and_submits_nothing(slurm_cluster, tmp_path):
    r = cli(
        "train",
        "experiment=demo",
        "cluster=slurm",
        f"storage_path={tmp_path}/s",
        "name=dry",
        "--dry-run",
        f"hydra.run.dir={tmp_path / 'h'}",
        cwd=tmp_path,
        env=slurm_cluster,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "#SBATCH --job-name=dry" in r.stdout
    assert not (tmp_path / "s").exists()


@pytest.mark.cluster
def test_sweep_runs_in_parallel_as_slurm_jobs(slurm_cluster, tmp_path):
    storage = tmp_path / "storage"
    r = cli(
        "train",
        "-m",
        "experiment=demo",
        "cluster=slurm",
        f"storage_path={storage}",
        "name=sweep",
        "tracking=none",
        "strategy=single",  # one worker per job: what is tested is that the jobs run side by side
        "cluster.num_workers=1",
        "trainer.max_steps=3",
        "trainer.save_every=0",
        "adapter.r=4,8",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
        env=slurm_cluster,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    jobs = [show(line.split()[3]) for line in r.stdout.splitlines() if line.startswith("submitted slurm job ")]
    assert len(jobs) == 2 and all(j["JobState"] == "COMPLETED" for j in jobs)
    assert max(j["StartTime"] for j in jobs) < min(j["EndTime"] for j in jobs)  # both ran at once (ISO times)
    for rank in (4, 8):
        assert (storage / "sweep" / f"adapter.r={rank}" / "adapter" / "COMMITTED").is_file()


@pytest.mark.cluster
def test_jobs_stop_cancels_a_slurm_job_and_its_ray_processes(slurm_cluster, tmp_path):
    import psutil

    r = submit(
        slurm_cluster, tmp_path, tmp_path / "storage", "stop-me", "trainer.max_steps=1000", "cluster.detach=true"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    job_id = slurm_job(r)["JobId"]
    run_dir = tmp_path / "storage" / "stop-me"

    def workers_started() -> bool:  # the job's Ray Train workers exist (the only ones running now)
        return any("RayTrainWorker" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))

    wait_until(workers_started, 300, "the job's training workers to start")
    stop = cli("jobs", "stop", job_id, env=slurm_cluster)
    assert stop.returncode == 0 and f"stop requested for {job_id}" in stop.stdout

    def leftovers():
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(
                    f"/tmp/ray-{job_id}/" in part or part == f"--temp-dir=/tmp/ray-{job_id}"
                    for part in p.info["cmdline"] or []
                ):
                    found.append(p.pid)
            except psutil.Error:
                pass
        return found

    deadline = time.monotonic() + 60
    while "CANCELLED" not in cli("jobs", "status", job_id, env=slurm_cluster).stdout or leftovers():
        assert time.monotonic() < deadline, f"job {job_id} not stopped for sure: processes {leftovers()}"
        time.sleep(1)
    assert not (run_dir / "adapter").exists()
