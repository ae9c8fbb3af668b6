"""`orchestrator <command>`: thin dispatch; `train` hands its arguments to Hydra."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

USAGE = """usage: orchestrator <command> [args]

commands:
  train [hydra overrides]   fine-tune an adapter (e.g. orchestrator train experiment=demo);
                            --cfg job prints the composed config, -m runs a Hydra multirun,
                            cluster=ray|slurm submits it (--dry-run prints the job instead)
  merge adapter=DIR output=DIR [base=DIR] [dtype=bf16|fp32]
                            merge an adapter into its base and write a Hugging Face model
  jobs status|logs|stop ID [--follow]
                            a job submitted with cluster=ray or cluster=slurm
  run CONFIG.yaml           train a composed config as is (what cluster jobs execute)
  sweep report SWEEP_DIR    summarise a multirun (multirun/<date>/<time>): table on the terminal,
                            report.csv/.md and loss/heatmap plots in SWEEP_DIR/report/
"""

HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--info"}

_pending_problems: list[str] = []


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


_failed_runs: list[str] = []
_sweep_jobs: list[dict] = []  # cluster jobs of a multirun, awaited together once all are submitted


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _train_task(cfg) -> float | None:
    # Errors are reported here, not raised: Hydra would print them as tracebacks. In a multirun a
    # failed run is logged (into its own train.log too) and the sweep goes on with the next one.
    # The return value, the final eval loss, is what the Optuna sweeper minimises.
    from orchestrator.config import ConfigError
    from orchestrator.driver import RunFailed

    try:
        return _train(cfg)
    except (ConfigError, RunFailed, FileExistsError) as e:
        if not _multirun():
            _fail(str(e), 2 if isinstance(e, ConfigError) else 1)
        logging.getLogger("orchestrator").error("error: %s", e)
        _failed_runs.append(f"{cfg.get('output_dir', '?')}: {str(e).splitlines()[0]}")
        return None


_swept_keys: set[str] = set()  # keys given several values on the command line


def _sweep_label(hc) -> str:
    """This run's values of the swept keys, e.g. adapter.r=8,adapter.alpha=16: what tells the runs
    of a sweep apart (Hydra's override_dirname also holds everything they share)."""
    swept = _swept_keys | set(hc.sweeper.get("params") or {})
    parts = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(parts) or hc.job.override_dirname


def _final_eval_loss(run_dir: str) -> float | None:
    from orchestrator.report import read_metrics

    if not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    _, evals = read_metrics(Path(run_dir))
    return float(evals[-1]["eval_loss"]) if evals else None


def _train(cfg) -> float | None:
    from orchestrator import demo, driver
    from orchestrator.config import ConfigError, resolve, validate

    try:
        run = resolve(cfg)
    except ConfigError as e:
        raise ConfigError(_pending_problems + e.problems) from None
    demo.localise(run)
    try:
        validate(run)
    except ConfigError as e:
        raise ConfigError(_pending_problems + e.problems) from None
    if _pending_problems:
        raise ConfigError(_pending_problems)
    if _multirun():
        # Every run of a sweep shares a W&B group and is named by its overrides; on shared storage
        # each run gets its own directory <storage_path>/<name>/<overrides>.
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        label = _sweep_label(hc)
        run.tracking.group = run.tracking.group or (run.name if run.storage_path else hc.sweep.dir)
        run.tracking.name = run.tracking.name or label or run.name
        if run.storage_path and label:
            run.name = f"{run.name}/{label}"
            run.output_dir = run.storage_run_dir()
        if run.cluster.kind != "local" and "optuna" in str(hc.sweeper.get("_target_", "")).lower():
            raise ConfigError(["sweep: the Optuna sweeper runs trials one after another on the final eval loss "
                               "of each; run it with cluster=local, or use a grid preset for cluster sweeps"])
    if run.cluster.kind == "local":
        print(f"adapter written to {driver.train(run)}")
    elif not _submit(run):
        return None
    return _final_eval_loss(run.output_dir)


def _submit(run) -> bool:
    """Submit to the run's cluster, then follow the job to its end unless detached (the runs of a
    multirun are awaited together, once all are submitted). True when the run ended here."""
    import launch
    from orchestrator.driver import RunFailed, check_output_dir

    if Path(run.storage_path).exists():
        check_output_dir(run)  # refuse another run's directory here, not after queueing on the cluster
    target = launch.target(run.cluster.kind)
    try:
        job = target.submit(run)
    except launch.SubmitError as e:
        raise RunFailed(str(e)) from None
    if job is None:
        return False  # dry run
    print(f"submitted {run.cluster.kind} job {job['id']} for the run in {run.output_dir}", flush=True)
    if run.cluster.detach:
        print(f"follow it with `orchestrator jobs logs {job['id']}`; `orchestrator jobs status {job['id']}`")
        return False
    if _multirun():
        _sweep_jobs.append(job)
        return False
    state = target.follow(job)
    if state == "DETACHED":
        return False
    if state not in launch.SUCCEEDED:
        _, message = target.status(job)
        raise RunFailed(f"job {job['id']} ended {state}{': ' + message if message else ''}")
    print(f"adapter written to {run.output_dir}/adapter")
    return True


def _await_sweep_jobs() -> None:
    """Wait for every job of a cluster sweep; each failure joins the sweep's summary."""
    import launch

    print(f"waiting for {len(_sweep_jobs)} jobs (`orchestrator jobs logs ID` shows one's log)", flush=True)
    for job, (state, message) in launch.wait_all(_sweep_jobs):
        print(f"job {job['id']} {state}: {job['run_dir']}", flush=True)
        if state not in launch.SUCCEEDED:
            _failed_runs.append(f"{job['run_dir']}: job {job['id']} ended {state}{': ' + message if message else ''}")


def _split_args(args: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(run overrides, hydra.* overrides, Hydra's own flags): only run overrides are checked
    against conf/, and flags must come before all overrides for Hydra's argument parser."""
    overrides, hydra_overrides, flags = [], [], []
    it = iter(args)
    for a in it:
        if a.startswith("-"):
            flags.append(a)
            if a in HYDRA_FLAGS_WITH_VALUE and "=" not in a:
                flags.append(next(it, ""))
        elif a.startswith(("hydra.", "hydra/", "+hydra")):
            hydra_overrides.append(a)
        else:
            overrides.append(a)
    return overrides, hydra_overrides, flags


def train(args: list[str]) -> None:
    import hydra

    from orchestrator.config import CONF_DIR, ConfigError, check_group_overrides

    if "--dry-run" in args:  # ours, not Hydra's: print what would be submitted
        args = [a for a in args if a != "--dry-run"] + ["cluster.dry_run=true"]
    overrides, hydra_overrides, flags = _split_args(args)
    usable, problems = check_group_overrides(overrides)
    _pending_problems[:] = problems
    from hydra.core.override_parser.overrides_parser import OverridesParser

    _swept_keys.update(o.key_or_group for o in OverridesParser.create().parse_overrides(usable) if o.is_sweep_override())
    if problems and any(f in ("--cfg", "-c") for f in flags):
        _fail(str(ConfigError(problems)))

    task = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(_train_task)
    sys.argv = ["orchestrator-train", *flags, *usable, *hydra_overrides]
    task()
    if _sweep_jobs:
        _await_sweep_jobs()
    if _failed_runs:
        _fail(f"{len(_failed_runs)} run(s) of the sweep failed:\n  " + "\n  ".join(_failed_runs), 1)


def merge(args: list[str]) -> None:
    from orchestrator.merge import MergeError
    from orchestrator.merge import merge as run_merge

    allowed = {"adapter", "output", "base", "dtype"}
    kv = dict(a.split("=", 1) for a in args if "=" in a)
    bad = [a for a in args if "=" not in a or a.split("=", 1)[0] not in allowed]
    missing = [k for k in ("adapter", "output") if k not in kv]
    if bad or missing:
        _fail(f"merge: {'unknown arguments ' + ', '.join(bad) if bad else ''}{'; ' if bad and missing else ''}"
              f"{'missing ' + ', '.join(missing) if missing else ''}\n{USAGE}")
    if kv.get("dtype", "bf16") not in ("bf16", "fp32"):
        _fail(f"merge: dtype={kv['dtype']} is not valid; valid: bf16, fp32")
    try:
        out = run_merge(Path(kv["adapter"]), Path(kv["output"]), Path(kv["base"]) if "base" in kv else None, kv.get("dtype", "bf16"))
    except (MergeError, FileExistsError) as e:
        _fail(str(e), 1)
    print(f"merged model written to {out}")


def sweep(args: list[str]) -> None:
    if len(args) != 2 or args[0] != "report":
        _fail(f"sweep: expected `sweep report SWEEP_DIR`, got {' '.join(args) or 'nothing'}\n{USAGE}")
    from orchestrator import report

    sweep_dir = Path(args[1])
    if not sweep_dir.is_dir():
        _fail(f"sweep report: {sweep_dir} {'is not a directory' if sweep_dir.exists() else 'does not exist'}")
    rows = report.collect(sweep_dir)
    if not rows:
        _fail(f"sweep report: no runs in {sweep_dir} (no directory with config.yaml or .hydra/overrides.yaml)")
    report.print_table(rows)
    paths = report.write_report(sweep_dir, rows)
    print("report written to:\n" + "\n".join(f"  {p}" for p in paths.values()))


def run_file(args: list[str]) -> None:
    """`orchestrator run CONFIG.yaml`: train a composed config as is. This is what cluster jobs
    execute; every check runs again here, on the cluster, before any worker starts."""
    if len(args) != 1:
        _fail(f"run: expected one composed config file (from `train --cfg job`), got {len(args)} arguments")
    from omegaconf import OmegaConf

    from orchestrator import demo, driver
    from orchestrator.config import ConfigError, to_typed, validate
    from orchestrator.config.schema import RunConfig

    logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra does this for `train`
    path = Path(args[0])
    if not path.is_file():
        _fail(f"run: {path} does not exist")
    try:
        run = to_typed(OmegaConf.to_container(OmegaConf.load(path)), RunConfig)
        demo.localise(run)
        validate(run, on_cluster=run.cluster.kind != "local")
        print(f"adapter written to {driver.train(run, on_cluster=run.cluster.kind != 'local')}")
    except ConfigError as e:
        _fail(str(e))
    except driver.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except (driver.RunFailed, FileExistsError) as e:
        _fail(str(e), 1)


# EX_TEMPFAIL: the run checkpointed on a preemption signal and should be requeued.
PREEMPTED_EXIT = 75


def jobs(args: list[str]) -> None:
    """`orchestrator jobs status|logs|stop ID [--follow] [address=...]` for Ray and Slurm jobs."""
    import launch

    flags = {a for a in args if a.startswith("--")}
    kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("--"))
    rest = [a for a in args if not a.startswith("--") and "=" not in a]
    if len(rest) != 2 or rest[0] not in ("status", "logs", "stop") or flags - {"--follow"} or set(kv) - {"address"}:
        _fail(f"jobs: expected `jobs status|logs|stop JOB_ID [--follow] [address=URL]`, got {' '.join(args) or 'nothing'}")
    action, job_id = rest
    job = launch.load_job(job_id)
    if "address" in kv:
        job["address"] = kv["address"]
    target = launch.target(job["kind"])
    try:
        if action == "status":
            state, message = target.status(job)
            print(f"{job_id} {state}{': ' + message if message else ''}")
        elif action == "logs":
            target.follow(job) if "--follow" in flags else target.logs(job)
        else:
            target.stop(job)
            print(f"stop requested for {job_id}")
    except launch.SubmitError as e:
        _fail(str(e), 1)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        return train(rest)
    if command == "merge":
        return merge(rest)
    if command == "sweep":
        return sweep(rest)
    if command == "run":
        return run_file(rest)
    if command == "jobs":
        return jobs(rest)
    _fail(f"unknown command {command!r}\n{USAGE}")
