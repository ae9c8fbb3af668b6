"""The Ray Train driver: one TorchTrainer running train_loop on every worker."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.config.schema import RunConfig, as_dict

log = logging.getLogger("orchestrator")


class RunFailed(RuntimeError):
    """Training failed on the workers; the message is the workers' own error."""


def prepare_output_dir(run: RunConfig) -> Path:
    """Create output_dir and write config.yaml; refuse a directory that already holds a trained
    adapter or checkpoints, so a finished run is never overwritten."""
    out = Path(run.output_dir)
    taken = [p for p in (out / "adapter", out / "checkpoints") if p.exists() and any(p.iterdir())]
    if taken:
        raise FileExistsError(
            f"output_dir {out} already holds a run ({', '.join(p.name for p in taken)}); "
            "choose a new output_dir so its results are kept"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
    return out


def _ray_init(run: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    if run.cluster.address:
        ray.init(address=run.cluster.address)
    else:
        ray.init(include_dashboard=False)


def _root_cause(err: BaseException) -> BaseException:
    """Ray wraps worker errors a few levels deep; the innermost one is what the user needs."""
    seen = set()
    while id(err) not in seen:
        seen.add(id(err))
        inner = getattr(err, "cause", None) or err.__cause__
        if isinstance(getattr(err, "worker_failures", None), dict) and err.worker_failures:
            inner = next(iter(err.worker_failures.values()))
        if inner is None:
            break
        err = inner
    return err


def train(run: RunConfig) -> Path:
    """Run training on Ray and return the directory of the final adapter."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from orchestrator.train_loop import train_loop

    out = prepare_output_dir(run)
    _ray_init(run)
    c = run.cluster
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"run": as_dict(run)},
        torch_config=TorchConfig(backend="nccl" if c.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            resources_per_worker={"CPU": c.cpus_per_worker, **c.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run.name or out.name,
            storage_path=str((out / "ray").resolve()),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised with the worker's own message
        cause = _root_cause(e)
        raise RunFailed(f"training failed: {type(cause).__name__}: {cause}") from e
    return out / "adapter"
