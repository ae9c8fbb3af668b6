"""cluster=ray: runs submitted as Ray Jobs to a real Ray head started on localhost."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cli, read_metrics, wait_until
from ray_head import free_ports, ray_head

pytestmark = pytest.mark.cluster

SECRET = "wandb-fake-key-5f2c9d1e7a"


@pytest.fixture(scope="module")
def head(demo_model, tmp_path_factory):
    """(dashboard address, environment for the submitting CLI)."""
    home = tmp_path_factory.mktemp("orchestrator-home")
    with ray_head(num_cpus=2) as (address, gcs, temp):
        # The head enables Ray's token authentication; the client must opt in to send the token.
        yield address, {"RAY_AUTH_MODE": "token", "ORCHESTRATOR_HOME": str(home), "WANDB_API_KEY": SECRET}, (gcs, temp)


def submit(head, tmp_path: Path, *overrides: str, name: str = "run", timeout: float = 400):
    address, env, _ = head
    return cli(
        "train",
        "experiment=demo",
        "cluster=ray",
        f"cluster.address={address}",
        f"storage_path={tmp_path / 'storage'}",
        f"name={name}",
        "tracking.mode=offline",
        f"hydra.run.dir={tmp_path / 'submit' / name}",
        *overrides,
        cwd=tmp_path,
        env=env,
        timeout=timeout,
    )


def job_id(result) -> str:
    line = next(x for x in result.stdout.splitlines() if x.startswith("submitted ray job "))
    return line.split()[3]


def files_under(*roots: Path):
    for root in roots:
        for p in Path(root).rglob("*"):
            if p.is_file():
                yield p


def test_same_name_resumes_the_run_a_running_one_is_not_doubled_and_secrets_stay_off_disk(head, tmp_path):
    args = ("trainer.max_steps=150", "trainer.save_every=5")
    r = submit(head, tmp_path, *args, "cluster.detach=true", name="resumable")
    assert r.returncode == 0, r.stderr[-3000:]
    jid = job_id(r)
    again = submit(head, tmp_path, *args, name="resumable")
    assert again.returncode == 1 and f"already running as Ray job {jid}" in again.stderr

    ckpts = tmp_path / "storage" / "resumable" / "checkpoints"
    wait_until(lambda: (ckpts / "step-5" / "COMMITTED").is_file(), 300, "the first checkpoint")
    stop = cli("jobs", "stop", jid, env=head[1])
    assert stop.returncode == 0, stop.stderr
    wait_until(lambda: "STOPPED" in cli("jobs", "status", jid, env=head[1]).stdout, 120, "the job to stop")
    stopped_at = max(int(p.name.split("-")[1]) for p in ckpts.glob("step-*") if (p / "COMMITTED").is_file())
    assert stopped_at < 150

    # Same name, same config: the new job continues the stored run, its logs streaming here.
    resumed = submit(head, tmp_path, *args, name="resumable")
    assert resumed.returncode == 0, resumed.stderr[-3000:] + resumed.stdout[-3000:]
    assert f"resuming from {ckpts}/step-" in resumed.stdout
    run_dir = tmp_path / "storage" / "resumable"
    assert [m["step"] for m in read_metrics(run_dir) if "loss" in m] == list(range(1, 151))
    assert (run_dir / "adapter" / "COMMITTED").is_file() and (
        run_dir / "adapter" / "adapter_model.safetensors"
    ).is_file()
    assert "trainable params" in resumed.stdout  # the workers' logs streamed to the submitting terminal
    assert "credentials in the worker environment: WANDB_API_KEY" in resumed.stdout  # the secret did arrive
    done = job_id(resumed)
    status = cli("jobs", "status", done, env=head[1])
    assert status.returncode == 0 and f"{done} SUCCEEDED" in status.stdout, status.stderr
    assert "adapter written to" in cli("jobs", "logs", done, env=head[1]).stdout
    # The secret reached the jobs through their environment only: no file the run or the CLI wrote holds it.
    written = list(files_under(run_dir, tmp_path / "submit", Path(head[1]["ORCHESTRATOR_HOME"])))
    assert any(p.name == "config.yaml" for p in written) and any(p.suffix == ".wandb" for p in written)
    assert [p for p in written if SECRET.encode() in p.read_bytes()] == []

    # Same name, another config: refused before anything is submitted.
    other = submit(head, tmp_path, *args, "adapter.r=8", name="resumable")
    assert (
        other.returncode == 1
        and "holds the checkpoints of a different run" in other.stderr
        and "adapter.r: 16 -> 8" in other.stderr
    )
    assert "submitted ray job" not in other.stdout


def test_unsatisfiable_resources_are_reported_not_left_pending(head, tmp_path):
    r = submit(head, tmp_path, "cluster.num_workers=3", "trainer.max_steps=2", timeout=200)
    assert r.returncode == 1
    assert (
        "cluster.num_workers=3 workers of {'CPU': 1.0} cannot be placed: the cluster's nodes hold 2"
        in r.stdout + r.stderr
    )
    assert not (tmp_path / "storage" / "run" / "checkpoints").exists()


def test_cluster_refusals_carry_the_clusters_message(head, tmp_path):
    (closed,) = free_ports(1)
    r = submit(head, tmp_path, f"cluster.address=http://127.0.0.1:{closed}")
    assert r.returncode == 1 and f"cannot reach the Ray cluster at http://127.0.0.1:{closed}" in r.stderr
    address, env, _ = head
    unauthenticated = cli(
        "train",
        "experiment=demo",
        "cluster=ray",
        f"cluster.address={address}",
        f"storage_path={tmp_path}",
        "name=x",
        f"hydra.run.dir={tmp_path / 'h'}",
        cwd=tmp_path,
        env={**env, "RAY_AUTH_MODE": "disabled"},
    )
    assert unauthenticated.returncode == 1 and "Authentication required" in unauthenticated.stderr
    records = list((Path(env["ORCHESTRATOR_HOME"]) / "jobs").glob("*.json"))
    assert all(json.loads(p.read_text())["run_dir"] != f"{tmp_path}/x" for p in records)  # nothing half-submitted


def test_dry_run_prints_the_job_and_submits_nothing(head, tmp_path):
    r = submit(head, tmp_path, "cluster.dry_run=true")
    assert r.returncode == 0, r.stderr
    assert "-m orchestrator run run.yaml" in r.stdout and "WANDB_API_KEY=<from your environment>" in r.stdout
    assert SECRET not in r.stdout and "submitted" not in r.stdout
    assert not (tmp_path / "storage").exists()


def test_sweep_runs_in_parallel_as_ray_jobs(head, tmp_path):
    address, env, _ = head
    storage = tmp_path / "storage"
    r = cli(
        "train",
        "-m",
        "experiment=demo",
        "cluster=ray",
        f"cluster.address={address}",
        f"storage_path={storage}",
        "name=sweep",
        "tracking=none",
        "strategy=single",
        "cluster.num_workers=1",
        "trainer.max_steps=3",
        "trainer.save_every=0",
        "adapter.r=4,8",
        f"hydra.sweep.dir={tmp_path / 'multirun'}",
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-3000:]
    ids = [line.split()[3] for line in r.stdout.splitlines() if line.startswith("submitted ray job ")]
    assert len(ids) == 2 and "waiting for 2 jobs" in r.stdout
    # Ray's own record of when each job ran (a client process of its own: auth is read at start-up).
    query = (
        "import json, sys; from ray.job_submission import JobSubmissionClient as C; c = C(sys.argv[1]); "
        "print(json.dumps([[c.get_job_info(i).start_time, c.get_job_info(i).end_time] for i in sys.argv[2:]]))"
    )
    spans = json.loads(
        subprocess.run(
            [sys.executable, "-c", query, address, *ids],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
            check=True,
        ).stdout
    )
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # they ran at the same time
    for rank in (4, 8):
        run_dir = storage / "sweep" / f"adapter.r={rank}"
        assert (run_dir / "adapter" / "COMMITTED").is_file()
        assert f"r: {rank}\n" in (run_dir / "config.yaml").read_text()
    report = cli("sweep", "report", str(storage / "sweep"))
    assert report.returncode == 0, report.stderr
    assert "adapter.r=4" in report.stdout and "adapter.r=8" in report.stdout


def test_storage_a_node_cannot_see_is_refused_before_training(head, tmp_path):
    """A second Ray node in a mount namespace of its own, where the storage directory is an empty
    tmpfs: a node without the shared filesystem. Runs last: it changes the cluster."""
    address, env, (gcs, temp) = head
    storage = tmp_path / "storage"
    storage.mkdir()
    ports = dict(
        zip(
            (
                "node-manager",
                "object-manager",
                "metrics-export",
                "dashboard-agent-listen",
                "dashboard-agent-grpc",
                "runtime-env-agent",
            ),
            free_ports(6),
        )
    )
    start = [
        str(Path(sys.executable).with_name("ray")),
        "start",
        "--block",
        f"--address={gcs}",
        "--num-cpus=1",
        "--node-ip-address=127.0.0.1",
        f"--temp-dir={temp}",
        *(f"--{k}-port={v}" for k, v in ports.items()),
    ]
    node = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            'mount -t tmpfs tmpfs "$0" && exec "$@"',
            str(storage),
            *start,
        ],
        env={**os.environ, **env},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        count = (
            "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        wait_until(
            lambda: (
                subprocess.run(
                    [sys.executable, "-c", count, gcs], capture_output=True, text=True, env={**os.environ, **env}
                ).stdout.strip()
                == "2"
            ),
            120,
            "the second node",
        )
        r = cli(
            "train",
            "experiment=demo",
            "cluster=ray",
            f"cluster.address={address}",
            f"storage_path={storage}",
            "name=blind",
            "strategy=single",
            "cluster.num_workers=1",
            f"hydra.run.dir={tmp_path / 'submit'}",
            cwd=tmp_path,
            env=env,
            timeout=400,
        )
        assert r.returncode == 1
        blind = re.findall(
            rf"the run directory {re.escape(str(storage))}/blind is not visible from node\(s\) ([^;]+);", r.stdout
        )
        assert len(blind) == 1 and blind[0].count("(node ") == 1, r.stdout[-2000:]  # the namespaced node, not the head
        assert not (storage / "blind" / "checkpoints").exists()
    finally:
        os.killpg(node.pid, 9)
        node.wait()
