"""Rank-zero metrics: progress bar, metrics.jsonl and Weights & Biases.

Only rank 0 constructs a Tracker; other ranks get NullTracker and log nothing.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.config.schema import RunConfig, TrackingConfig, as_dict
from orchestrator.rundir import RunDir

log = logging.getLogger("orchestrator")


def _ray_bar_class():
    """tqdm_ray's bar (drawn by the driver, not as mangled worker logs), its state lines written to
    the worker's stdout directly. tqdm_ray print()s them, and in a Ray Train worker print() is
    patched to log every line to stderr as well (RAY_TRAIN_ENABLE_PRINT_PATCH): the driver got
    each state twice, and the copy of the final one, arriving after the bar had closed, opened a
    second bar that redrew from 0%."""
    import sys
    import time

    import ray
    from ray.experimental import tqdm_ray

    class Bar(tqdm_ray.tqdm):
        def set_description(self, desc: str, refresh: bool = True) -> None:  # tqdm's signature
            self._desc = desc
            if refresh:
                self._dump_state()

        def _dump_state(self, force_flush: bool = False) -> None:
            if ray._private.worker.global_worker.mode != ray.WORKER_MODE:  # Ray Train's local mode
                return super()._dump_state(force_flush)
            now = time.time()
            if not force_flush and now - self._last_flush_time < self._flush_interval_s:
                return
            self._last_flush_time = now
            sys.stdout.write(json.dumps(self._get_state()) + "\n")
            sys.stdout.flush()

    return Bar


def _progress_bar(total: int, initial: int):
    try:
        import ray.train

        ray.train.get_context()
        tqdm = _ray_bar_class()
    except Exception:  # noqa: BLE001 - not inside Ray Train: a plain terminal bar
        from tqdm import tqdm
    bar = tqdm(total=total, desc="train", unit="step")  # tqdm_ray has no `initial`
    if initial:
        bar.update(initial)
    return bar


def _wandb_run(cfg: TrackingConfig, run: RunConfig, rundir: RunDir):
    import wandb

    out, id_file = rundir.root, rundir.wandb_id
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=cfg.project,
        entity=cfg.entity,
        name=cfg.name or run.name or out.name,
        group=cfg.group,
        tags=list(cfg.tags),
        mode=cfg.mode,
        dir=str(out),
        id=run_id,
        resume="allow",  # a restarted run continues the same W&B run
        config=as_dict(run),
        settings=wandb.Settings(console="off", silent=True),
    )


class Tracker:
    """Rank 0's metrics. W&B starts when the worker does, in a thread of its own: wandb.init takes
    a second or two (its service process, the run files), which the worker spends loading the
    base instead. The bar and metrics.jsonl open once the run's steps are known (open())."""

    def __init__(self, run: RunConfig):
        self.rundir = RunDir(Path(run.output_dir))
        self.summary_file, self.summaries = self.rundir.summary, {}
        self.newest: dict | None = None
        self.metrics = self.bar = None
        self._wandb = None
        if run.tracking.backend == "wandb":
            self._wandb = ThreadPoolExecutor(1, thread_name_prefix="wandb.init").submit(
                _wandb_run, run.tracking, run, self.rundir
            )

    @property
    def wandb(self):  # noqa: ANN201 - a wandb Run, imported in its thread only
        return None if self._wandb is None else self._wandb.result()

    def open(self, total_steps: int, start_step: int = 0) -> None:
        """After the checkpoint's metrics were trimmed (Checkpointer.trim_metrics rewrites the file)."""
        self.metrics = self.rundir.metrics.open("a", encoding="utf-8")
        self.bar = _progress_bar(total_steps, start_step)

    def log(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if "loss" in row:
            self.newest = row

    def advance(self, n: int = 1) -> None:
        """Move the bar on by n steps, showing the newest training row: once per sync, since
        tqdm_ray passes on at most one state per flush interval and drops the others."""
        row, self.newest = self.newest, None
        if row is not None:
            self.bar.set_description(
                f"train loss={row['loss']:.4f} lr={row.get('lr', math.nan):.2e} gnorm={row.get('grad_norm', math.nan):.3f} "
                f"tok/s={row.get('tokens_per_s', math.nan):.0f} mfu={100 * (row.get('mfu') or math.nan):.1f}% "
                f"peak={row.get('peak_memory_bytes', 0) / 2**20:.0f}MiB",
                refresh=False,
            )
        self.bar.update(n)

    def summary(self, values: dict) -> None:
        self.summaries.update(values)
        tmp = self.summary_file.with_name(f".{self.summary_file.name}.tmp")
        tmp.write_text(json.dumps(self.summaries, indent=1) + "\n")
        tmp.replace(self.summary_file)  # whole or absent, for whoever watches it
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self, failed: bool = False) -> None:
        """Also after a setup that failed before open(): the W&B run ends as failed."""
        if self.bar is not None:
            self.bar.close()
            self.metrics.close()
        if self._wandb is None or (failed and self._wandb.exception() is not None):
            return  # a W&B that failed to start: the run's own error is the one to see
        self.wandb.finish(exit_code=1 if failed else 0)


class NullTracker:
    def open(self, total_steps: int, start_step: int = 0) -> None: ...
    def log(self, step: int, metrics: dict) -> None: ...
    def advance(self, n: int = 1) -> None: ...
    def summary(self, values: dict) -> None: ...
    def finish(self, failed: bool = False) -> None: ...
