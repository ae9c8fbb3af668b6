"""The Ray Train driver: one TorchTrainer running train_loop on every worker."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator.config.schema import RunConfig, as_dict, flatten

log = logging.getLogger("orchestrator")


class RunFailed(RuntimeError):
    """Training failed on the workers; the message is the workers' own error."""


# Settings that may change between a run and its resumption: where and how it runs, not what
# it computes (the global batch is compared on its own).
RESUMABLE_CHANGES = ("output_dir", "resume", "name", "cluster.", "tracking.", "trainer.micro_batch_size", "trainer.grad_accum")


def config_differences(old: dict, new: RunConfig) -> list[str]:
    a, b = flatten(old), flatten(as_dict(new))
    diffs = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
             if not k.startswith(RESUMABLE_CHANGES) and a.get(k) != b.get(k)]
    t, c = old.get("trainer", {}), old.get("cluster", {})
    old_batch = t.get("micro_batch_size", 0) * t.get("grad_accum", 0) * c.get("num_workers", 0)
    if old_batch != new.global_batch():
        diffs.append(f"global batch (micro_batch_size * grad_accum * num_workers): {old_batch} -> {new.global_batch()}")
    return diffs


def prepare_output_dir(run: RunConfig) -> bool:
    """Create output_dir and write config.yaml. Returns False when the run there is already
    complete. A directory holding another run's checkpoints is refused, never mixed or overwritten."""
    from orchestrator.checkpoint import is_committed, step_checkpoints

    out = Path(run.output_dir)
    held = step_checkpoints(out / "checkpoints") or is_committed(out / "adapter")
    if held:
        if run.resume == "never":
            raise FileExistsError(f"output_dir {out} already holds checkpoints and resume=never; choose a new output_dir")
        old = OmegaConf.to_container(OmegaConf.load(out / "config.yaml")) if (out / "config.yaml").is_file() else {}
        diffs = config_differences(old, run)
        if diffs:
            raise FileExistsError(
                f"output_dir {out} holds the checkpoints of a different run; resuming would mix them. "
                "Use a new output_dir, or the same config. Differences:\n  " + "\n  ".join(diffs)
            )
        if is_committed(out / "adapter"):
            return False
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
    return True


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

    # Workers may run with another working directory (on other nodes, surely): absolute paths only.
    out = Path(run.output_dir).resolve()
    run = dataclasses.replace(run, output_dir=str(out))
    if not prepare_output_dir(run):
        log.info("the run in %s is already complete", out)
        return out / "adapter"
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
            storage_path=str(out / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised with the worker's own message
        cause = _root_cause(e)
        raise RunFailed(f"training failed: {type(cause).__name__}: {cause}") from e
    return out / "adapter"
