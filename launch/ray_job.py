"""cluster=ray: the run as a Ray Job on an existing cluster, through the Jobs API.

The job's working_dir carries this installation's `orchestrator` package and the composed config
(`run.yaml`), so the cluster runs exactly the code and config that were submitted. The
entrypoint names the interpreter explicitly (cluster.python): a Ray Job runs with the head
node's PATH, not the submitter's.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf
from orchestrator.launch import SubmitError, detached, job_env, record_job

import orchestrator
from orchestrator.config.schema import RunConfig, as_dict
from orchestrator.packaged import packaged

if TYPE_CHECKING:  # imported lazily: submitting a job must not pay for it twice
    from ray.job_submission import JobSubmissionClient

ACTIVE = ("PENDING", "RUNNING")


def _address(run: RunConfig | None = None, address: str | None = None) -> str:
    addr = address or (run.cluster.address if run else None) or os.environ.get("RAY_ADDRESS")
    if not addr:
        raise SubmitError(
            "cluster.address: not set and RAY_ADDRESS is empty; give the Ray dashboard address, "
            "e.g. cluster.address=http://head-node:8265"
        )
    return addr


def client(address: str) -> JobSubmissionClient:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection, auth and version errors all carry Ray's message
        raise SubmitError(f"cluster.address: cannot reach the Ray cluster at {address}: {e}") from None


def _stage(run: RunConfig, dest: Path) -> None:
    """working_dir: the orchestrator package (no caches), laid out as in the wheel (a checkout keeps
    launch/, conf/ and slurm/ at the top of the repository), and the composed config."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = dest / "orchestrator"
    shutil.copytree(Path(orchestrator.__file__).parent, package, ignore=ignore)
    for name in ("launch", "conf", "slurm"):
        if not (package / name).exists():
            shutil.copytree(packaged(name), package / name, ignore=ignore)
    (dest / "run.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))


def entrypoint(run: RunConfig) -> str:
    return f"{shlex.quote(run.cluster.python or sys.executable)} -m orchestrator run run.yaml"


def _state(status: object) -> str:
    return getattr(status, "value", str(status))


def _active_job_of_run(c: JobSubmissionClient, run_dir: str) -> str | None:
    for job in c.list_jobs():
        if (job.metadata or {}).get("orchestrator_run_dir") == run_dir and _state(job.status) in ACTIVE:
            return job.submission_id
    return None


def submit(run: RunConfig) -> dict | None:
    env, secrets = job_env(run)
    if run.cluster.dry_run:
        print(f"entrypoint: {entrypoint(run)}")
        print(
            "env_vars: "
            + ", ".join([f"{k}={v}" for k, v in env.items()] + [f"{k}=<from your environment>" for k in secrets])
        )
        print(
            "working_dir: the orchestrator package and run.yaml:\n" + OmegaConf.to_yaml(OmegaConf.create(as_dict(run)))
        )
        return None
    address = _address(run)
    c = client(address)
    running = _active_job_of_run(c, run.output_dir)
    if running:
        raise SubmitError(
            f"the run in {run.output_dir} is already running as Ray job {running}; follow it with "
            f"`orchestrator jobs logs {running}`, stop it with `orchestrator jobs stop {running}`, "
            "or give the new run another name"
        )
    job_id = f"orchestrator-{re.sub(r'[^A-Za-z0-9_-]+', '-', run.name or 'run')[:60]}-{uuid.uuid4().hex[:8]}"
    runtime_env = {"working_dir": None, "env_vars": {**env, **{k: os.environ[k] for k in secrets}}}
    if run.cluster.pip:
        runtime_env["pip"] = list(run.cluster.pip)
    with tempfile.TemporaryDirectory(prefix="orchestrator-job-") as stage:
        _stage(run, Path(stage))
        runtime_env["working_dir"] = stage
        try:
            c.submit_job(
                entrypoint=entrypoint(run),
                submission_id=job_id,
                runtime_env=runtime_env,
                metadata={"orchestrator_run_dir": run.output_dir, "orchestrator_name": run.name or ""},
            )
        except Exception as e:  # noqa: BLE001 - the Jobs API's refusal, as the cluster phrased it
            raise SubmitError(f"the Ray cluster at {address} refused the job: {e}") from None
    return record_job(job_id, "ray", address=address, run_dir=run.output_dir)


def follow(job: dict) -> str:
    """Print the job's logs until it ends; returns its final state. Ctrl-C detaches, the job goes on."""
    job_id, c = job["id"], _job_client(job)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        return detached(job)
    return _state(c.get_job_status(job_id))


# --- `orchestrator jobs` ----------------------------------------------------------------------


def _job_client(job: dict):
    return client(_address(address=job.get("address")))


def _ask(job: dict, call: str):
    """The Jobs API's answer about this job; its refusal (an unknown id, say) as SubmitError."""
    c = _job_client(job)
    try:
        return getattr(c, call)(job["id"])
    except Exception as e:  # noqa: BLE001 - the cluster's own words
        raise SubmitError(
            f"Ray job {job['id']} at {job.get('address') or os.environ.get('RAY_ADDRESS')}: {e}"
        ) from None


def status(job: dict) -> tuple[str, str]:
    info = _ask(job, "get_job_info")
    return _state(info.status), info.message or ""


def logs(job: dict) -> None:
    sys.stdout.write(_ask(job, "get_job_logs"))


def stop(job: dict) -> None:
    _ask(job, "stop_job")
