"""Where a local run's workers wait while the command still validates the run's input.

A run on a Ray of the command's own has its workers started as soon as Ray is up
(driver.EarlyFit): their processes start, import torch and Ray Train and join their process
group, seconds of CPU each, while the command reads the model and checks and tokenizes the data.
Then each waits here, before it reads the run directory or loads anything, for the validated
config (open) or for word that there is none (cancel). The first word stands.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

POLL_S = 0.02


class StartGate:
    """A directory of this machine's: `run` holds the command's word, `waiting-<pid>` the workers'."""

    def __init__(self, parent: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="orchestrator-start-", dir=parent))
        self.path = self.dir / "run"

    def open(self, run: dict[str, Any]) -> None:
        self._say(run)

    def cancel(self) -> None:
        self._say(None)

    def waiting(self) -> int:
        """How many workers wait."""
        return len(list(self.dir.glob("waiting-*")))

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _say(self, run: dict[str, Any] | None) -> None:
        # Whole or not at all (a worker may read it any moment), and never over an earlier word.
        with contextlib.suppress(FileNotFoundError, FileExistsError):  # no such dir: the fit is over
            tmp = self.dir / f".run-{threading.get_ident()}"
            tmp.write_bytes(pickle.dumps(run))
            try:
                os.link(tmp, self.path)
            finally:
                tmp.unlink()


def wait(path: str) -> dict[str, Any] | None:
    """On a worker: the validated run config, or None when the command found its input invalid.
    The command's Ray ends with the command, and this worker with it, should it never say."""
    gate = Path(path)
    (gate.parent / f"waiting-{os.getpid()}").touch()
    while not gate.exists():
        time.sleep(POLL_S)
    return pickle.loads(gate.read_bytes())
