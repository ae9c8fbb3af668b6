"""Ray's own output on the user's terminal: kept in Ray's session log files unless asked for.

Ray prints warnings, C++ log lines and tracebacks of its internal actors (the Train controller,
placement-group cleaner, preemption watcher) that a user cannot act on. With
ORCHESTRATOR_VERBOSE=1 (the CLI's --verbose) they are shown as before. Errors of the training
itself reach the user through the driver (RunFailed) and the failing worker's traceback.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path


def verbose() -> bool:
    """ORCHESTRATOR_VERBOSE=1 (the CLI's --verbose): Ray's own log lines on the terminal as well."""
    return os.environ.get("ORCHESTRATOR_VERBOSE", "").strip().lower() not in ("", "0", "false", "no")


def init_quietly(init: Callable[[], object]) -> None:
    """Run init() (a ray.init call) so that, unless verbose(), Ray's Python loggers in this process
    write to the session's logs directory and forwarded worker output shows the training workers'
    lines only."""
    if verbose():
        init()
        return
    held = _hold_ray_logs()
    try:
        init()
    except BaseException:
        _release_ray_logs(held, None)
        raise
    _release_ray_logs(held, _ray_logs_dir())
    try:
        _filter_forwarded_output()
    except Exception:  # noqa: BLE001 - another Ray: its lines stay on the terminal
        pass


_HeldRayLogs = tuple[logging.Logger, list[logging.Handler], logging.handlers.BufferingHandler]


def _hold_ray_logs() -> _HeldRayLogs:
    """Take the `ray` logger off the terminal; its records wait until ray.init has made the
    session's logs directory."""
    ray_logger = logging.getLogger("ray")
    terminal = list(ray_logger.handlers)
    pending = logging.handlers.BufferingHandler(capacity=sys.maxsize)
    for h in terminal:
        ray_logger.removeHandler(h)
    ray_logger.addHandler(pending)
    return ray_logger, terminal, pending


def _release_ray_logs(held: _HeldRayLogs, logs_dir: Path | None) -> None:
    """Into a file in logs_dir; without one, back to the terminal (ray.init failed: its log
    records may say why)."""
    ray_logger, handlers, pending = held
    ray_logger.removeHandler(pending)
    if logs_dir is not None:
        try:
            to_file = logging.FileHandler(logs_dir / f"ray-python-driver-{os.getpid()}.log", encoding="utf-8")
            to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            handlers = [to_file]
        except OSError:
            pass
    for h in handlers:
        ray_logger.addHandler(h)
    for record in pending.buffer:
        ray_logger.handle(record)


_RAY_CORE_LOG_LINE = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [DIWEF] \d+ \d+\] "


def _keep_forwarded(batch: dict) -> dict | None:
    """What the terminal shows of a batch of output that Ray forwards from its workers: the
    lines of the training workers (our rank-0 log lines, the progress bar's state, a failing
    worker's traceback), not those of Ray Train's own actors (controller, placement-group cleaner,
    preemption watcher), nor the C++ log lines ("[date time E pid tid] core_worker.cc:...") and
    blank lines of any process. All of it stays in the worker-*.out/.err files of the session."""
    actor = batch.get("actor_name")
    if actor and actor != "RayTrainWorker":
        return None
    lines = [line for line in batch.get("lines", []) if line.strip() and not re.match(_RAY_CORE_LOG_LINE, line)]
    return {**batch, "lines": lines} if lines else None


def _filter_forwarded_output() -> None:
    """Put _keep_forwarded in front of the handler that prints forwarded worker output
    (log_to_driver)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as streams

    name = "ray_print_logs"
    printer = dict(streams.handlers).get(name)
    if printer is None:
        return

    def print_kept(batch: dict) -> None:
        kept = _keep_forwarded(batch)
        if kept is not None:
            printer(kept)

    streams.remove_handler(name)
    streams.add_handler(name, print_kept)


def _ray_logs_dir() -> Path | None:
    import ray

    try:
        return Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    except Exception:  # noqa: BLE001 - a Ray without it: Ray's lines stay on the terminal
        return None
