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
from orchestrator.rundir import orchestrator_home

SUCCEEDED = ("SUCCEEDED", "COMPLETED")  # Ray's and Slurm's word for a job that finished well


class SubmitError(RuntimeError):
    """The cluster refused the job (its own message is included), or it cannot be reached."""


def jobs_dir() -> Path:
    return orchestrator_home() / "jobs"


def record_job(job_id: str, kind: str, **info) -> dict:
    job = {"id": job_id, "kind": kind, **info}
    path = jobs_dir() / f"{_safe(job_id)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(job, indent=2) + "\n")
    return job


class UnknownJob(LookupError):
    """`orchestrator jobs` was given an id no job index entry (nor Slurm) knows."""


# `scontrol show job` answers at once when slurmctld is up; an unreachable controller makes it retry
# for ~20 s, which is no answer either.
SCONTROL_TIMEOUT_S = 2.0


def load_job(job_id: str, address: str | None = None) -> dict:
    """The job recorded in the job index at submission. An id it lacks is a Ray job only with an
    explicit `address`, or a Slurm job only if Slurm itself knows it; otherwise UnknownJob."""
    path = jobs_dir() / f"{_safe(job_id)}.json"
    if path.is_file():
        try:
            job = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UnknownJob(f"job {job_id}: its record {path} cannot be read ({e})") from None
        if isinstance(job, dict) and job.get("id") and job.get("kind"):
            return job
        raise UnknownJob(f"job {job_id}: its record {path} is garbled (no id and kind)")
    where = f"no job {job_id!r} in the job index {jobs_dir()}, where the jobs submitted from here are recorded"
    if address:
        return {"id": job_id, "kind": "ray", "address": address}
    if job_id.isdigit():
        known = _slurm_knows(job_id)
        if known is True:
            return {"id": job_id, "kind": "slurm"}
        raise UnknownJob(f"{where}; {known}")
    raise UnknownJob(f"{where}; for a Ray job submitted from elsewhere, give --address")


def _slurm_knows(job_id: str) -> bool | str:
    """True if `scontrol show job` knows the id, else why it cannot say or a reason it does not."""
    import shutil
    import subprocess

    if shutil.which("scontrol") is None:
        return "scontrol is not on PATH to ask Slurm about it"
    try:
        r = subprocess.run(
            ["scontrol", "show", "job", "--oneliner", job_id],
            capture_output=True,
            text=True,
            timeout=SCONTROL_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        return f"Slurm did not answer `scontrol show job {job_id}` within {SCONTROL_TIMEOUT_S:g} s"
    except OSError as e:
        return f"scontrol cannot be run ({e})"
    if r.returncode == 0 and r.stdout.strip():
        return True
    said = (r.stderr or r.stdout).strip().splitlines()
    return f"Slurm does not know it either ({said[-1]})" if said else "Slurm does not know it either"


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
