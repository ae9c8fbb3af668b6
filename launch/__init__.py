"""What starts a run on each target: `cluster=local` trains in this process (orchestrator.driver);
`cluster=ray` submits a Ray Job (orchestrator.launch.ray_job); `cluster=slurm` submits an sbatch
script that starts Ray across the allocation (orchestrator.launch.slurm). Both cluster targets run
the same command on the cluster, `orchestrator run <config>`, so a run behaves the same wherever it
is started.

Every submitted job is recorded in the job index (ORCHESTRATOR_HOME/jobs, default
~/.cache/orchestrator/jobs) so `orchestrator jobs status|logs|stop <id>` can find it again.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from orchestrator.config.schema import RunConfig

SUCCEEDED = ("SUCCEEDED", "COMPLETED")  # Ray's and Slurm's word for a job that finished well


class SubmitError(RuntimeError):
    """The cluster refused the job (its own message is included), or it cannot be reached."""


def jobs_dir() -> Path:
    home = os.environ.get("ORCHESTRATOR_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "orchestrator") / "jobs"


def record_job(job_id: str, kind: str, **info) -> dict:
    job = {"id": job_id, "kind": kind, **info}
    path = jobs_dir() / f"{_safe(job_id)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=2) + "\n")
    return job


def load_job(job_id: str) -> dict:
    """The recorded job, or a best guess for one submitted elsewhere: Slurm ids are numbers."""
    path = jobs_dir() / f"{_safe(job_id)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"id": job_id, "kind": "slurm" if job_id.isdigit() else "ray"}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def job_env(run: RunConfig) -> tuple[dict[str, str], list[str]]:
    """(plain variables, names of secrets present here). Secret values are read from this
    process's environment at submission and handed to the cluster's API in memory only."""
    env = {"PYTHONUNBUFFERED": "1", **run.cluster.env}
    if os.environ.get("ORCHESTRATOR_DEMO_DIR"):
        env.setdefault("ORCHESTRATOR_DEMO_DIR", os.environ["ORCHESTRATOR_DEMO_DIR"])
    secrets = [k for k in run.cluster.secret_env if os.environ.get(k)]
    return env, secrets


def detached(job: dict) -> str:
    """What following a job returns when the user presses Ctrl-C: the job itself goes on."""
    print(f"\ndetached; job {job['id']} keeps running (`orchestrator jobs stop {job['id']}` stops it)", file=sys.stderr)
    return "DETACHED"


def target(kind: str) -> ModuleType:
    """The module that submits to, follows and controls jobs of this kind: submit(run) -> job
    record (None for a dry run), follow(job) -> final state, status(job) -> (state, message),
    logs(job), stop(job)."""
    if kind == "slurm":
        from orchestrator.launch import slurm

        return slurm
    from orchestrator.launch import ray_job

    return ray_job


def wait_all(jobs: list[dict], poll_s: float = 3.0) -> Iterator[tuple[dict, tuple[str, str]]]:
    """Yield (job, (state, message)) for each job as it ends, in the order they end."""
    pending = list(jobs)
    while pending:
        for job in list(pending):
            state, message = target(job["kind"]).status(job)
            if state not in target(job["kind"]).ACTIVE:
                pending.remove(job)
                yield job, (state, message)
        if pending:
            time.sleep(poll_s)
