"""The run directory: the one owner of every path, marker and file name of a run.

    <output_dir>/
      config.yaml              the composed config; a resumed run must match it
      metrics.jsonl            one JSON row per logged step and per evaluation
      wandb_run_id             the W&B run id, so a resumed run continues the same W&B run
      PREEMPT_REQUESTED        asks the workers to commit a checkpoint and stop (holds who asked)
      checkpoints/step-<N>/    adapter/ (PEFT format + manifest), state/, COMMITTED
      adapter/                 the final adapter, COMMITTED once complete
      ray/                     Ray Train's own storage
      slurm/                   sbatch scripts, their logs, and each job's composed config

The Slurm batch script reaches the stop request through `python -m orchestrator.rundir`, so the
file name and the incarnation formula live here only. Only the standard library is imported:
that command runs inside a signal trap.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

# A directory is a checkpoint only once this marker is written, last (see checkpoint.py).
MARKER = "COMMITTED"
STEP_DIR = re.compile(r"^step-(\d+)$")
CHECKPOINTS = "checkpoints"
# Inside a step checkpoint (and the final adapter/): the adapter as PEFT loads it, and what
# resuming needs besides.
ADAPTER = "adapter"
STATE = "state"
TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# EX_TEMPFAIL: the run committed a checkpoint on a stop request and should be requeued.
PREEMPTED_EXIT = 75


@dataclass(frozen=True)
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def wandb_id(self) -> Path:
        return self.root / "wandb_run_id"

    @property
    def stop_request(self) -> Path:
        return self.root / "PREEMPT_REQUESTED"

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER

    @property
    def ray(self) -> Path:
        return self.root / "ray"

    @property
    def slurm(self) -> Path:
        return self.root / "slurm"

    def slurm_log(self, job_id: str) -> Path:
        """A Slurm job's log; the job id "%j" is the pattern sbatch fills in."""
        return self.slurm / f"slurm-{job_id}.out"

    def step(self, n: int) -> Path:
        return self.checkpoints / f"step-{n}"

    def is_complete(self) -> bool:
        return (self.adapter / MARKER).is_file()

    def request_stop(self) -> None:
        """Ask the workers to commit a checkpoint at the next step boundary and stop. The
        request names who asked, so that a later incarnation of the run ignores it."""
        self.stop_request.write_text(incarnation() + "\n")

    def stop_requested(self) -> bool:
        return self.stop_request.exists()

    def drop_stale_request(self) -> None:
        """Forget a request left by an earlier incarnation (a previous job, or a killed run)."""
        request = self.stop_request
        if request.is_file() and request.read_text().strip() != incarnation():
            request.unlink()


def incarnation() -> str:
    """Who may ask this run to stop: the Slurm job and its restart count (its batch script asks
    too, possibly before the driver starts), else this process."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    return f"pid.{os.getpid()}"


def main(argv: list[str]) -> int:
    """`python -m orchestrator.rundir request-stop RUN_DIR`: what the Slurm batch script runs
    when Slurm warns of preemption or the time limit."""
    if len(argv) != 2 or argv[0] != "request-stop":
        print("usage: python -m orchestrator.rundir request-stop RUN_DIR", file=sys.stderr)
        return 2
    RunDir(Path(argv[1])).request_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
