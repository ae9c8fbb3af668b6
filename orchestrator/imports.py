"""Importing the heavy libraries with Python's cyclic garbage collector paused.

Importing torch, transformers, PEFT and Ray Train creates millions of objects and no garbage, while
the collector walks every tracked object again each time the heap has grown by a quarter: 15-20% of
the imports' CPU time, about 1 CPU-s in the command and in each worker (README, "Time to first
step"). Paused only around imports: elsewhere (the data pass, the steps) the collector runs as usual.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterator

SETUP_LIBRARIES = (
    "torch",
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "peft",
)
"""What validation and a worker's setup import: torch, transformers' model and tokenizer classes
(most of transformers), PEFT (bitsandbytes with it)."""


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def preload(*modules: str) -> None:
    with collector_paused():
        for name in modules:
            importlib.import_module(name)
