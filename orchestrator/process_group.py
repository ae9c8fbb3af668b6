"""Ray Train's torch process group, set up from a module that does not import torch.

Ray Train's controller unpickles the backend it sets the workers' process group up with. Ray's own
(TorchConfig, _TorchBackend) lives in ray.train.torch.config, which imports torch: 2-3 CPU-s in a
process that never holds a tensor, and the controller pays them before it starts any worker. This
backend runs Ray's own worker-side functions, the same ones in the same order, but imports them on
the workers only. Used on a Ray of the command's own (driver._trainer_class), with the rest of
Ray Train's internals that trims; nccl or gloo, env:// rendezvous at worker 0, as Ray's default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import ray
from ray.train.backend import Backend, BackendConfig

log = logging.getLogger("orchestrator")

SHUTDOWN_TIMEOUT_S = 30


@dataclass
class ProcessGroupConfig(BackendConfig):
    backend: str | None = None
    """nccl or gloo; None: TorchTrainer picks nccl for GPU workers, gloo otherwise."""
    timeout_s: int = 1800
    """Seconds a collective may take before the process group fails (torch's timeout)."""

    @property
    def backend_cls(self) -> type[Backend]:
        return ProcessGroupBackend

    @property
    def train_func_context(self) -> Any:  # noqa: ANN401 - Ray's context manager class, on the driver and workers
        from ray.train.torch.config import TorchConfigContextManager

        return TorchConfigContextManager  # each worker's default CUDA device

    @property
    def framework(self) -> Any:  # noqa: ANN401
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH

    def to_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "init_method": "env", "timeout_s": self.timeout_s}


class ProcessGroupBackend(Backend):
    share_cuda_visible_devices: bool = True

    def on_start(self, worker_group: Any, config: ProcessGroupConfig) -> None:  # noqa: ANN401
        from ray.train._internal.utils import get_address_and_port

        addr, port = worker_group.execute_single(0, get_address_and_port)
        n = len(worker_group)
        ray.get(
            [
                worker_group.execute_single_async(
                    i,
                    _join,
                    addr=addr,
                    port=port,
                    backend=config.backend,
                    world_rank=i,
                    world_size=n,
                    timeout_s=config.timeout_s,
                )
                for i in range(n)
            ]
        )

    def on_shutdown(self, worker_group: Any, config: ProcessGroupConfig) -> None:  # noqa: ANN401
        futures = worker_group.execute_async(_leave, destroy=len(worker_group) > 1)
        try:
            ray.get(futures, timeout=SHUTDOWN_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            log.warning("the workers' process group did not shut down within %d s", SHUTDOWN_TIMEOUT_S)


def _join(addr: str, port: int, backend: str, world_rank: int, world_size: int, timeout_s: int) -> None:
    """On a worker: what _TorchBackend.on_start has each worker do."""
    import os

    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
    _set_torch_distributed_env_vars()
    _setup_torch_process_group(backend, world_rank, world_size, "env://", timeout_s)


def _leave(destroy: bool) -> None:
    from ray.train.torch.config import _shutdown_torch

    _shutdown_torch(destroy)
