"""cluster=slurm: an sbatch script (slurm/train.sbatch.j2) that starts Ray across the allocation
and runs `orchestrator run` on it, with preemption handled by checkpoint-and-requeue.

The script and the job's log live in <run_dir>/slurm/, next to the run they belong to.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from omegaconf import OmegaConf
from orchestrator.launch import SubmitError, detached, job_env, jobs_dir, record_job

from orchestrator.config.schema import RunConfig, as_dict
from orchestrator.packaged import packaged
from orchestrator.rundir import PREEMPTED_EXIT, RunDir

TEMPLATE = packaged("slurm") / "train.sbatch.j2"
ACTIVE = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
)
_PLAIN = re.compile(r"[A-Za-z0-9_.,:/=+@%-]+")


def _sbatch_value(value: object) -> str:
    """A value on an #SBATCH line. sbatch splits those lines itself, honouring "..." and \\";
    the shell never sees them, but a newline would end the header and start a shell command."""
    text = str(value)
    if any(ord(ch) < 32 for ch in text):
        raise SubmitError(f"{text!r}: control characters (newlines) cannot go on an #SBATCH line")
    if _PLAIN.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(run: RunConfig) -> str:
    import jinja2

    c, s = run.cluster, run.cluster.slurm
    rundir = RunDir(Path(run.output_dir))
    per_node = c.num_workers // s.nodes
    ray_cpus = math.ceil(per_node * c.cpus_per_worker)
    config_yaml = OmegaConf.to_yaml(OmegaConf.create(as_dict(run)))
    env, _ = job_env(run)  # secrets are not rendered: sbatch passes the submitting environment
    # bash uses `{#` (${#nodes[@]}): Jinja comments get delimiters bash never writes.
    templ = jinja2.Environment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        comment_start_string="{=#",
        comment_end_string="#=}",
    )
    templ.filters.update(q=lambda v: shlex.quote(str(v)), sb=_sbatch_value)
    return templ.from_string(
        TEMPLATE.read_text()
    ).render(
        run_name=run.name,
        job_name=s.job_name or run.name,
        nodes=s.nodes,
        cpus_per_node=s.cpus_per_node or ray_cpus + 1,  # one more for the driver and Ray's daemons
        gpus_per_node=s.gpus_per_node,
        mem=s.mem,
        time=s.time,
        optional=[(k, getattr(s, k)) for k in ("partition", "account", "qos", "constraint") if getattr(s, k)],
        log_path=str(
            RunDir(Path(run.output_dir.replace("%", "%%"))).slurm_log("%j")
        ),  # sbatch expands %j, so % is doubled
        requeue=s.requeue,
        signal_grace_s=s.signal_grace_s,
        extra_sbatch=s.extra_sbatch,
        setup=s.setup,
        python=c.python or sys.executable,
        run_dir=run.output_dir,
        slurm_dir=str(rundir.slurm),
        preempted_exit=PREEMPTED_EXIT,
        env=sorted(env.items()),
        ray_cpus=ray_cpus,
        config_yaml=config_yaml,
        config_delimiter="RUN_CONFIG_" + hashlib.sha256(config_yaml.encode()).hexdigest()[:12],
    )


def _run(cmd: list[str], what: str) -> str:
    if shutil.which(cmd[0]) is None:
        raise SubmitError(
            f"{cmd[0]} not found on PATH: submit from a Slurm login node (or start the dev cluster, "
            "slurm/dev-cluster.sh up)"
        )
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SubmitError(f"{what}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def _active_job_of_run(run_dir: str) -> str | None:
    for path in jobs_dir().glob("*.json"):
        job = json.loads(path.read_text())
        if job.get("kind") == "slurm" and job.get("run_dir") == run_dir and status(job)[0] in ACTIVE:
            return job["id"]
    return None


def submit(run: RunConfig) -> dict | None:
    script = render(run)
    if run.cluster.dry_run:
        print(script, end="")
        return None
    running = _active_job_of_run(run.output_dir)
    if running:
        raise SubmitError(
            f"the run in {run.output_dir} is already queued or running as Slurm job {running}; "
            f"`orchestrator jobs stop {running}` stops it, or give the new run another name"
        )
    rundir = RunDir(Path(run.output_dir))
    rundir.slurm.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    path = rundir.slurm / f"job-{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}.sbatch"
    path.write_text(script)
    out = _run(["sbatch", "--parsable", str(path)], "sbatch refused the job")
    job_id = out.strip().split(";")[0]
    return record_job(job_id, "slurm", run_dir=run.output_dir, script=str(path), log=str(rundir.slurm_log(job_id)))


def show(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict ({} once Slurm forgot the job). Values may hold spaces (job
    names, paths), so fields are split before each ` Key=`, not at every space."""
    r = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    return dict(kv.split("=", 1) for kv in re.split(r" (?=[A-Z][A-Za-z:/_]*=)", r.stdout.strip()) if "=" in kv)


def status(job: dict) -> tuple[str, str]:
    info = show(job["id"])
    if not info:
        return "UNKNOWN", "Slurm no longer lists this job (finished jobs are purged after MinJobAge)"
    detail = [
        f"{k}={info[k]}"
        for k in ("Reason", "ExitCode", "Restarts", "NodeList")
        if info.get(k) not in (None, "None", "(null)")
    ]
    return info["JobState"], " ".join(detail)


def _log_path(job: dict) -> Path | None:
    path = job.get("log") or show(job["id"]).get("StdOut")  # recorded at submission, else Slurm's
    return Path(path) if path else None


def logs(job: dict) -> None:
    path = _log_path(job)
    if path is None or not path.is_file():
        raise SubmitError(f"no log for Slurm job {job['id']} (expected {path})")
    sys.stdout.write(path.read_text(errors="replace"))


def follow(job: dict, poll_s: float = 1.0) -> str:
    """Print the job's log as it grows, through requeues, until the job ends; returns its final
    state. Ctrl-C detaches; the job goes on."""
    path, offset = _log_path(job), 0
    try:
        while True:
            state, _ = status(job)
            if path is not None and path.is_file():
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                sys.stdout.write(chunk.decode(errors="replace"))
                sys.stdout.flush()
            if state not in ACTIVE:
                return state
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return detached(job)


def stop(job: dict) -> None:
    _run(["scancel", job["id"]], f"scancel refused to stop job {job['id']}")
