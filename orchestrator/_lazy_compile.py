"""bitsandbytes without torch.compile at import time.

bitsandbytes wraps four fallback kernels of its default backend in `torch.compile` when its module
is imported, and `torch.compile` imports TorchDynamo and Inductor on the spot: about 1.5 s of CPU in
every process that imports PEFT (the CLI's validation and each worker), before the first step. The
kernels it wraps are fallbacks (the CPU and CUDA backends have kernels of their own), and most runs
never call them. While that module executes, `torch.compile` is replaced with a version that
compiles on the first call instead; bitsandbytes' own fallback to the plain function when compiling
fails still applies, since it catches errors at call time too.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from typing import Any

TARGET = "bitsandbytes.backends.default.ops"


def lazily(compile_fn: Callable) -> Callable:
    """torch.compile's signature (decorator or call), compiling on the wrapped function's first call."""

    def compile_later(fn: Callable | None = None, **options: Any) -> Callable:
        if fn is None:
            return lambda f: compile_later(f, **options)
        compiled: list[Callable] = []

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(compile_fn(fn, **options))
            return compiled[0](*args, **kwargs)

        return call

    return compile_later


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            import torch

            eager = torch.compile
            torch.compile = lazily(eager)
            try:
                execute(module)
            finally:
                torch.compile = eager

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Once per process, before bitsandbytes is first imported (orchestrator/__init__.py)."""
    if TARGET not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
