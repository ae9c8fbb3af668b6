"""The Ray Train driver: one TorchTrainer running train_loop on every worker."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import OmegaConf

from orchestrator import ray_logs
from orchestrator.config.schema import RunConfig, as_dict, flatten
from orchestrator.imports import SETUP_LIBRARIES, preload
from orchestrator.interrupt import (
    HANDLED,
    Daemons,
    Interrupted,
    StopSignals,
    interrupted_message,
    ray_processes_apart,
)
from orchestrator.rundir import RunDir
from orchestrator.start_gate import StartGate

log = logging.getLogger("orchestrator")


class RunFailed(RuntimeError):
    """Training failed on the workers; the message is the workers' own error."""


# Settings that may change between a run and its resumption: where and how it runs, not what
# it computes (the global batch is compared on its own).
RESUMABLE_CHANGES = (
    "output_dir",
    "storage_path",
    "resume",
    "name",
    "data.cache_dir",
    "cluster.",
    "tracking.",
    "trainer.micro_batch_size",
    "trainer.grad_accum",
    "trainer.sync_every_s",
    "trainer.compile",
)


def config_differences(old: dict, new: RunConfig) -> list[str]:
    a, b = flatten(old), flatten(as_dict(new))
    # A field the saved config lacks came with a later version of this package; at its default it
    # changes nothing, so a run saved before an upgrade still resumes after it.
    defaults = flatten(as_dict(RunConfig()))
    diffs = [
        f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if not k.startswith(RESUMABLE_CHANGES)
        and a.get(k) != b.get(k)
        and not (k not in a and k in defaults and b.get(k) == defaults[k])
    ]
    t, c = old.get("trainer", {}), old.get("cluster", {})
    old_batch = t.get("micro_batch_size", 0) * t.get("grad_accum", 0) * c.get("num_workers", 0)
    if old_batch != new.global_batch():
        diffs.append(f"global batch (micro_batch_size * grad_accum * num_workers): {old_batch} -> {new.global_batch()}")
    return diffs


def check_output_dir(run: RunConfig) -> bool:
    """Refuse an output_dir that holds another run's checkpoints, never mixing or overwriting them.
    Returns False when the run there is already complete."""
    from orchestrator.checkpoint import step_checkpoints

    rundir = RunDir(Path(run.output_dir))
    if not (step_checkpoints(rundir.checkpoints) or rundir.is_complete()):
        return True
    if run.resume == "never":
        raise FileExistsError(
            f"output_dir {rundir.root} already holds checkpoints and resume=never; choose a new output_dir"
        )
    old = OmegaConf.to_container(OmegaConf.load(rundir.config)) if rundir.config.is_file() else {}
    diffs = config_differences(old, run)
    if diffs:
        raise FileExistsError(
            f"output_dir {rundir.root} holds the checkpoints of a different run; resuming would mix them. "
            "Use a new output_dir (with storage_path: a new name), or the same config. Differences:\n  "
            + "\n  ".join(diffs)
        )
    return not rundir.is_complete()


def prepare_output_dir(run: RunConfig) -> bool:
    """check_output_dir, then create output_dir and write config.yaml."""
    if not check_output_dir(run):
        return False
    rundir = RunDir(Path(run.output_dir))
    rundir.root.mkdir(parents=True, exist_ok=True)
    rundir.config.write_text(OmegaConf.to_yaml(OmegaConf.create(as_dict(run))))
    return True


class Preempted(RuntimeError):
    """The run committed a checkpoint after a preemption warning and stopped; resubmit to resume."""


def _ray_init(run: RunConfig, on_cluster: bool, signals: StopSignals) -> None:
    import ray

    if _early_ray is not None:
        _early_ray.wait()
        signals.install()  # Ray's C++ core worker may have set its SIGTERM handler over ours meanwhile
    if ray.is_initialized():
        return
    # The Ray started here lives in a session of its own: a signal to our process group is ours.
    with signals.starting_ray(own_session=not on_cluster):
        _connect(run, on_cluster)


OWN_RAY = {
    "include_dashboard": False,
    "_system_config": {"worker_niceness": 0, "enable_worker_prestart": False, "prestart_worker_first_driver": False},
    "runtime_env": {"worker_process_setup_hook": "orchestrator.imports.pause_collector"},
}
"""ray.init's settings for a Ray the command starts. Ray starts its workers at nice 15 by default:
the training worker would yield its cores to anything else on the machine, the driver and the Ray
daemons included. It also starts one idle worker per CPU for tasks this driver never submits (Ray
Train's actors start processes of their own): each imports Ray, 0.5 CPU-s, while the run starts.
Its worker processes start with the garbage collector paused (imports.pause_collector)."""


def _connect(run: RunConfig, on_cluster: bool) -> None:
    import ray

    if on_cluster:
        ray_logs.init_quietly(lambda: ray.init(address="auto"))  # RAY_ADDRESS, set by the Ray Job or the Slurm script
        return
    # "local" keeps a single-machine run off any `ray start` cluster that happens to run here.
    own = {"include_dashboard": False} if run.cluster.address else OWN_RAY
    ray_logs.init_quietly(lambda: ray.init(address=run.cluster.address or "local", **own))


class EarlyRay(threading.Thread):
    """A local run's ray.init, begun once the config itself is valid, while the command looks at
    the model and the data (start_ray_early): ray.init mostly waits seconds
    for Ray's daemons to come up, which that validation spends on the other core. On a Ray of its
    own the run's workers start next (EarlyFit). If validation fails, stop_ray kills this Ray with
    everything it started.

    Once Ray is up the thread stays: it runs the early fit, then parks. Ray starts its daemons with
    PR_SET_PDEATHSIG, which the kernel sends when the *thread* that started them ends, not the
    process."""

    def __init__(self, run: RunConfig) -> None:
        super().__init__(name="ray.init", daemon=True)
        self.config = run
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.daemons = Daemons()
        self.fit: EarlyFit | None = None

    def run(self) -> None:
        # Ray's threads inherit this thread's mask: signals stay the main thread's (interrupt.py).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
        try:
            with ray_processes_apart(own_session=True, daemons=self.daemons):
                _connect(self.config, on_cluster=False)
            if _own_ray():
                self.fit = EarlyFit(self.config)
        except BaseException as e:  # noqa: BLE001 - raised where the run waits for Ray
            self.error = e
        finally:
            self.ready.set()
        if self.fit is not None:
            self.fit.run()
        threading.Event().wait()

    def wait(self) -> None:
        self.ready.wait()
        if self.error is not None:
            raise self.error


class EarlyFit:
    """Ray Train's fit for a local run, begun before the command has validated the run's input:
    the workers start and import while validation reads the model and the data, then wait at a
    StartGate, before they touch the run directory or load anything, for the config that passed
    (take) or for none (cancel) (README, "Time to first step"). Ray Train's own storage is the
    gate's directory: nothing is written into output_dir before the command holds it."""

    def __init__(self, run: RunConfig) -> None:
        self.workers = _workers(run)
        self.gate = StartGate(_session_dir())
        name = run.name or Path(run.output_dir).resolve().name
        self.trainer = _trainer(run, name, self.gate.dir / "ray", {"gate": str(self.gate.path)})
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.taken = self.cancelled = False

    def run(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised where the run waits for its end
            self.error = e
        finally:
            self.done.set()
            self.gate.remove()

    def take(self, run: RunConfig) -> Callable[[], None] | None:
        """The fit of `run`: it opens the gate to `run` and waits for the end. None, once these
        workers are gone, when they are not the ones `run` asks for, were told there is no run
        (the first of a sweep failed validation), or are gone already."""
        self.taken = True
        if self.cancelled or self.done.is_set() or _workers(run) != self.workers:
            self.gate.cancel()
            self.done.wait()  # their resources are free for the fit that replaces them
            return None

        def fit() -> None:
            self.gate.open(as_dict(run))
            self.done.wait()
            if self.error is not None:
                raise self.error

        return fit

    def cancel(self) -> None:
        """The command hands these workers no run (on the gate, a no-op once it is open)."""
        self.cancelled = True
        self.gate.cancel()


_early_ray: EarlyRay | None = None


def stop_ray() -> None:
    """Stop the Ray this process started or connected to; one still starting, or whose workers
    still wait for the run (the command's validation failed meanwhile), is killed with
    everything it started (interrupt.Daemons)."""
    import ray

    early = _early_ray
    if early is not None and early.fit is not None:
        early.fit.gate.remove()  # the fit's own cleanup, when it is not over
    if early is not None and (
        not early.ready.is_set() or early.error is not None or early.fit and not early.fit.done.is_set()
    ):
        early.daemons.kill()
        return
    if ray.is_initialized():
        ray.shutdown()


def start_ray_early(run: RunConfig) -> None:
    """For a run on this machine's Ray: start it now, in the background (EarlyRay); train() waits
    for it. Once per process."""
    global _early_ray
    import ray

    if _early_ray is None and run.cluster.kind == "local" and not ray.is_initialized():
        _early_ray = EarlyRay(run)
        _early_ray.start()
        # Here, while Ray's daemons start: the early fit needs Ray Train the moment they are up
        # (imported by that thread it would take turns with validation for the interpreter), and
        # validation the rest.
        preload("ray.train.torch", *SETUP_LIBRARIES)


def cancel_early_fit() -> None:
    """The command will not train (its validation failed): the early fit's workers return
    without loading anything. A no-op once the fit has begun the run."""
    if _early_ray is not None and _early_ray.fit is not None:
        _early_ray.fit.cancel()


def _take_early_fit(run: RunConfig) -> Callable[[], None] | None:
    """The early fit's, for the first run of this process (the others of a sweep start their own)."""
    if _early_ray is None or _early_ray.fit is None or _early_ray.fit.taken:
        return None
    return _early_ray.fit.take(run)


def _per_worker(run: RunConfig) -> dict[str, float]:
    """What one worker takes from a node, GPU included."""
    c = run.cluster
    return {"CPU": c.cpus_per_worker, **({"GPU": 1.0} if c.use_gpu else {}), **c.resources_per_worker}


def _workers(run: RunConfig) -> tuple:
    """What a worker group started for `run` is made of."""
    return _per_worker(run), run.cluster.num_workers, run.cluster.max_failures


def placeable_workers(nodes: list[dict], need: dict[str, float]) -> int:
    """How many workers fit on these nodes' total resources (ray.nodes() entries)."""
    demands = {k: v for k, v in need.items() if v > 0}  # CPU at least: validation requires cpus_per_worker > 0
    return sum(int(min(n["Resources"].get(k, 0.0) / v for k, v in demands.items()) + 1e-9) for n in nodes)


def check_cluster(run: RunConfig) -> None:
    """Before the run reaches any worker: the cluster can hold the workers, and every node sees
    the run directory (multi-node runs need shared storage). A request Ray can never satisfy
    would otherwise wait forever."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need = _per_worker(run)
    fits = placeable_workers(nodes, need)
    offered = "; ".join(
        f"{n['NodeManagerAddress']}: "
        + ", ".join(
            f"{k}={v:g}"
            for k, v in sorted(n["Resources"].items())
            if not k.startswith(("node:", "memory", "object_store"))
        )
        for n in nodes
    )
    log.info("Ray cluster of %d node(s) (%s) holds %d workers of %s", len(nodes), offered, fits, need)
    if fits < run.cluster.num_workers and not run.cluster.autoscaling:
        raise RunFailed(
            f"cluster.num_workers={run.cluster.num_workers} workers of {need} cannot be placed: the cluster's nodes hold "
            f"{fits} ({offered}). Lower cluster.num_workers or the per-worker resources, or set "
            "cluster.autoscaling=true if the cluster adds nodes on demand"
        )
    if len(nodes) > 1:
        blind = nodes_missing_file(Path(run.output_dir), nodes)
        if blind:
            raise RunFailed(
                f"storage_path: the run directory {run.output_dir} is not visible from node(s) {', '.join(blind)}; "
                "multi-node runs need a filesystem every node mounts (NFS, Lustre, a FUSE-mounted bucket)"
            )


def nodes_missing_file(directory: Path, nodes: list[dict]) -> list[str]:
    """Addresses of the nodes that cannot read a marker file written into `directory` here."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = directory / f".visible-{token}"
    marker.write_text(token)

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        try:
            return Path(path).read_text() == token
        except OSError:
            return False

    try:
        refs = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker)
            )
            for n in nodes
        ]
        return [f"{n['NodeManagerAddress']} (node {n['NodeID'][:12]})" for n, ok in zip(nodes, ray.get(refs)) if not ok]
    finally:
        marker.unlink(missing_ok=True)


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


def train(run: RunConfig, on_cluster: bool = False, resume_command: str | None = None) -> Path:
    """Run training on Ray and return the directory of the final adapter. on_cluster: this
    process is a cluster job's driver, so connect to that cluster's Ray. resume_command: the
    command line that resumes the run, shown when a signal stops it (Interrupted). Raises
    RunDirInUse at once when another live process holds the run directory."""
    # Workers may run with another working directory (on other nodes, surely): absolute paths only.
    rundir = RunDir(Path(run.output_dir).resolve())
    run = dataclasses.replace(run, output_dir=str(rundir.root))
    # One run per directory: taken before anything in it is read or cleaned, held while every
    # worker (and every worker group Ray Train restarts) cleans up, resumes and saves.
    with rundir.lock():
        return _train_locked(run, rundir, on_cluster, resume_command)


def _train_locked(run: RunConfig, rundir: RunDir, on_cluster: bool, resume_command: str | None) -> Path:
    if not prepare_output_dir(run):
        log.info("the run in %s is already complete", rundir.root)
        return rundir.adapter
    rundir.drop_stale_request()
    # From here on SIGINT/SIGTERM (interrupt) and SIGUSR1 (preemption) stop the run at a step
    # boundary, with a checkpoint (interrupt.py).
    with StopSignals(rundir, resume_command) as signals:
        # Ray Train's modules take seconds to import; ray.init spends as long waiting for its
        # daemons, so the two overlap.
        importing = threading.Thread(target=importlib.import_module, args=("ray.train.torch",), daemon=True)
        importing.start()
        _ray_init(run, on_cluster, signals)
        check_cluster(run)
        importing.join()
        fit = _take_early_fit(run) or _trainer(run, run.name or rundir.root.name, rundir.ray, {"run": as_dict(run)}).fit
        try:
            signals.run(fit)
        except Exception as e:  # noqa: BLE001 - re-raised with the worker's own message
            cause = _root_cause(e)
            if signals.interrupted is None:
                raise RunFailed(f"training failed: {type(cause).__name__}: {cause}") from e
            log.error("after the interrupt, training ended with %s: %s", type(cause).__name__, cause)
    if rundir.is_complete():
        if signals.first is not None:
            log.warning("the run completed before the workers saw the stop request")
        return rundir.adapter
    if signals.interrupted is not None:
        raise Interrupted(signals.interrupted, interrupted_message(signals.interrupted, rundir, resume_command))
    if rundir.stop_requested():
        raise Preempted(
            f"preempted: the run in {rundir.root} committed its latest checkpoint and stopped; "
            "the same command (or the requeued job) resumes it"
        )
    raise RunFailed(f"training ended without its final adapter in {rundir.adapter} and without a stop request")


OWN_RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
}
"""For a Ray this process started: no cloud or autoscaler drains its one node, so the preemption
watcher (an actor, a process of its own) would watch nothing; the metrics callbacks export to
Prometheus through the dashboard, which it does not run. The controller looks at its workers
every 2 s by default, so a run ended up to 2 s after its workers did; on one node a look costs
a few milliseconds."""


def _ray_node():  # noqa: ANN202 - Ray's Node of this process, a Ray internal
    """The Ray node this process started or joined (ray._private.worker._global_node), or None."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    return getattr(worker, "_global_node", None)


def _session_dir() -> Path | None:
    """The session directory of the Ray this process is connected to (its logs, its sockets),
    which Ray keeps after it stops: what is put there is not left anywhere else when the command
    is killed outright."""
    path = getattr(_ray_node(), "get_session_dir_path", lambda: None)()
    return Path(path) if path else None


def _own_ray() -> bool:
    """Whether this process started the Ray it is connected to: a local instance that dies with it."""
    return bool(getattr(_ray_node(), "head", False))


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """These variables set for the duration (Ray Train hands them to its controller and workers),
    unless the user set them already."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _trainer_class(own_ray: bool):  # noqa: ANN202 - a TorchTrainer class, imported here only
    """TorchTrainer; for a Ray this process started, without the Train v2 parts that have nothing
    to do there and each start an actor, a process that imports Ray (with the variables above, set
    while it runs, they delayed the first step on 2 cores by about 7 s, README):
    - DatasetsCallback: a DatasetManager actor and Ray Data in every worker; we pass no datasets.
    - PlacementGroupCleanerCallback: a detached actor that removes the placement group if the
      controller dies on a cluster that outlives it; a local Ray dies with the driver, and it polls
      the State API, which a Ray without the dashboard does not serve.
    - The fixed scaling policy's resource requests: they go to Ray Data's autoscaling coordinator,
      an actor the controller creates and then waits for (up to 5 s, and on a loaded machine it
      times out and prints a traceback), for an autoscaler a local Ray does not have.
    - Ray's torch backend, whose module imports torch into the controller: the same setup from a
      module that does not (process_group.py).
    Through Ray Train's internals (pinned): a Ray without them keeps all of its parts."""
    from ray.train.torch import TorchTrainer

    if not own_ray:
        return TorchTrainer
    try:
        from ray.train.v2._internal.callbacks import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

        from orchestrator.process_group import ProcessGroupConfig
    except ImportError:
        return TorchTrainer
    idle = (DatasetsCallback, PlacementGroupCleanerCallback)

    class UnrequestedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context) -> None:  # noqa: ANN001
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

        def _cancel_resource_request(self) -> None:
            pass

    class OwnRayTrainer(TorchTrainer):
        def __init__(self, *args, torch_config=None, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
            super().__init__(*args, torch_config=torch_config or ProcessGroupConfig(), **kwargs)

        def fit(self):  # noqa: ANN202
            with _environ(OWN_RAY_TRAIN_ENV):  # read here and handed to the controller and workers
                return super().fit()

        def _create_default_callbacks(self):  # noqa: ANN202
            return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, idle)]

        def _initialize_and_run_controller(self, **kwargs):  # noqa: ANN202, ANN003
            if type(kwargs.get("scaling_policy")) is FixedScalingPolicy:
                kwargs["scaling_policy"] = UnrequestedScalingPolicy(self.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)

    return OwnRayTrainer


def _trainer(run: RunConfig, name: str, storage: Path, loop_config: dict):  # noqa: ANN202 - TorchTrainer, imported here only
    """The run's TorchTrainer: train_loop(loop_config) on every worker, Ray Train's own files in
    storage/name."""
    import ray.train

    from orchestrator.train_loop import train_loop

    c = run.cluster
    return _trainer_class(_own_ray())(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,  # one GPU each, added by Ray Train itself
            resources_per_worker={"CPU": c.cpus_per_worker, **c.resources_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=c.max_failures),
            # Ray Train's own worker lines ("Setting up process group...") read like ours: keep them in Ray's logs.
            logging_config=ray.train.LoggingConfig(log_level="INFO" if ray_logs.verbose() else "WARNING"),
        ),
    )
