"""Starting a process's heavy libraries without Python's cyclic garbage collector walking them.

Importing torch, transformers, PEFT and Ray Train creates millions of objects and almost no garbage.
The collector walks every tracked object of a generation each time it fills, and objects imported
while it is off fill the youngest one: turning it back on merely postpones the walks. So imports run
with the collector paused, and what they built is then frozen (gc.freeze: moved where no collection
looks; it lives as long as the process anyway). On this 2-core machine that was 2-3 CPU-s of the
demo's start (README, "Time to first step").
"""

from __future__ import annotations

import gc
import importlib
import sys
import threading

SETUP_LIBRARIES = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "peft",
)
"""What validation and a worker's setup import: torch, transformers' model and tokenizer classes
(most of transformers), PEFT (bitsandbytes with it)."""

COLLECTOR_BACK_AFTER_S = 60.0


def resume_collector() -> None:
    """Freeze what exists (a process's start: it lives as long as the process) and turn the
    collector on."""
    gc.freeze()
    gc.enable()


def preload(*modules: str) -> None:
    """Import `modules` with the collector paused, and freeze what exists if that imported anything:
    in the command and in a worker this is their start. A process that imports them late (a test
    session) has what garbage it held then frozen too, once."""
    enabled, known = gc.isenabled(), len(sys.modules)
    gc.disable()
    try:
        for name in modules:
            importlib.import_module(name)
    finally:
        if enabled and len(sys.modules) > known:
            resume_collector()
        elif enabled:
            gc.enable()


def pause_collector() -> None:
    """Ray's worker_process_setup_hook on a Ray the command owns: a worker process's start is
    imports (Ray Train's worker side, pandas, torch). The run's function resumes the collector
    (train_loop); in the processes that never run it (Ray Train's controller and synchronization
    actor) it resumes after a minute."""
    gc.disable()
    timer = threading.Timer(COLLECTOR_BACK_AFTER_S, resume_collector)
    timer.daemon = True
    timer.start()
