"""Distributed LoRA / QLoRA fine-tuning: Hydra configs -> Ray Train -> FSDP2 -> PEFT adapters."""

import logging

from orchestrator import _lazy_compile

# bitsandbytes tries to download an optional CPU kernel from a hub at import and warns when it
# cannot; the built-in kernel it falls back to is correct, so the warning is only noise here.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_lazy_compile.install()

__version__ = "0.1.0"
