"""`orchestrator <command>`: argparse for the commands, Hydra only where a run is composed."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shlex
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.rundir import PREEMPTED_EXIT, RunDir, RunDirInUse

log = logging.getLogger("orchestrator")

TRAIN_HELP = """\
fine-tune an adapter; the arguments are Hydra's: overrides such as experiment=demo adapter.r=8,
--cfg job (print the composed config, run nothing), -m (multirun: one run per combination),
--config-dir DIR (your own config groups next to the packaged ones), --hydra-help.
cluster=ray|slurm submits the run; --dry-run prints the job instead of submitting it."""

PLAN_HELP = """\
predict, before any worker starts, each worker's peak memory at load and in steady state, itemised
(base shard, NF4 constants, adapter, gradients, optimizer state, activations, buffers, framework),
for the chosen strategy and every other one; reads only the model's config.json. With
--device-memory (or the memory the workers will have) it says which strategy, micro-batch and
gradient checkpointing fit."""


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description="Distributed LoRA / QLoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="fine-tune an adapter (Hydra overrides follow)", description=TRAIN_HELP, allow_abbrev=False
    )
    _train_flags(train)
    train.add_argument("hydra_args", nargs=argparse.REMAINDER, help="Hydra overrides and flags")

    merge = commands.add_parser("merge", help="merge an adapter into its base and write a Hugging Face model")
    merge.add_argument("adapter", type=Path, help="adapter directory (<run>/adapter or a step checkpoint's adapter/)")
    merge.add_argument("output", type=Path, help="new directory for the merged model (must not hold files)")
    merge.add_argument("--base", type=Path, help="the full-precision base (default: the one in the adapter's manifest)")
    merge.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    merge.set_defaults(func=merge_command)

    jobs = commands.add_parser("jobs", help="status, logs or stop of a job submitted with cluster=ray|slurm")
    jobs.add_argument("action", choices=("status", "logs", "stop"))
    jobs.add_argument("job_id")
    jobs.add_argument("--follow", action="store_true", help="logs: follow the log until the job ends")
    jobs.add_argument("--address", help="Ray dashboard address (default: the one recorded at submission)")
    jobs.set_defaults(func=jobs_command)

    run = commands.add_parser("run", help="train a composed config as is (what cluster jobs execute)")
    run.add_argument("config", type=Path, help="a composed config (from `train --cfg job`)")
    run.set_defaults(func=run_command)

    plan = commands.add_parser(
        "plan",
        help="predict the memory per worker of a run (the overrides of train) before launching it",
        description=PLAN_HELP,
    )
    plan.add_argument("--json", action="store_true", help="print the figures as JSON")
    plan.add_argument(
        "--device-memory",
        metavar="SIZE",
        help="memory of one worker's device, e.g. 24GiB or 80GB (default: this node's GPU for "
        "cluster.use_gpu=true, else the host memory divided among the workers)",
    )
    plan.add_argument("--probe", action="store_true", help="train two real steps and refit the overhead terms")
    plan.add_argument("--config-dir", type=Path, help="a config directory of your own, as for train")
    plan.add_argument("overrides", nargs="*", help="Hydra overrides, as for train (experiment=demo adapter.r=8 ...)")
    plan.set_defaults(func=plan_command)

    sweep = commands.add_parser("sweep", help="summarise a multirun")
    sweep_commands = sweep.add_subparsers(dest="sweep_command", metavar="report", required=True)
    report = sweep_commands.add_parser(
        "report", help="table on the terminal, report.csv/.md and plots in SWEEP_DIR/report/"
    )
    report.add_argument("sweep_dir", type=Path, help="a multirun directory (multirun/<date>/<time>)")
    report.set_defaults(func=report_command)
    return parser


def _train_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="cluster=ray|slurm: print what would be submitted and submit nothing"
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's internal log lines on the terminal too (ORCHESTRATOR_VERBOSE=1)",
    )


# --- train --------------------------------------------------------------------------------------


@dataclass
class TrainCommand:
    """One `orchestrator train` invocation: what the Hydra task needs across the runs of a multirun."""

    problems: list[str]
    """Problems found in the overrides before composition, reported with the config's own."""
    swept: set[str]
    """Keys given several values on the command line."""
    failed: list[str] = field(default_factory=list)
    """One line per failed run of a multirun."""
    sweep_jobs: list[dict] = field(default_factory=list)
    """Cluster jobs of a multirun, awaited together once all are submitted."""
    program: list[str] = field(default_factory=list)
    """How this command was started (`orchestrator`, `python -m orchestrator`); empty: not from a command line."""
    argv: list[str] = field(default_factory=list)
    """The arguments after `train`, as given."""
    flags: list[str] = field(default_factory=list)
    """Hydra's flags among them (--config-dir DIR ...), but -m."""

    def task(self, cfg: Any) -> float | None:
        """Hydra's task. Errors are reported here, not raised: Hydra would print them as tracebacks.
        In a multirun a failed run is logged (into its own train.log too) and the sweep goes on.
        The return value, the final eval loss, is what the Optuna sweeper minimises."""
        from orchestrator.config import ConfigError
        from orchestrator.driver import Interrupted, Preempted, RunFailed

        try:
            return self._train(cfg)
        except Interrupted as e:  # the whole command stops, the rest of a multirun too
            _exit_interrupted(e)
        except Preempted as e:
            print(str(e), file=sys.stderr)
            if not _multirun():
                sys.exit(PREEMPTED_EXIT)
            self.failed.append(f"{cfg.get('output_dir', '?')}: {e}")
            return None
        except (ConfigError, RunFailed, RunDirInUse, FileExistsError) as e:
            if not _multirun():
                if isinstance(e, (ConfigError, RunDirInUse)):
                    _discard_hydra_dir()
                _fail(str(e), 2 if isinstance(e, ConfigError) else 1)
            log.error("error: %s", e)
            self.failed.append(f"{cfg.get('output_dir', '?')}: {str(e).splitlines()[0]}")
            return None

    def _train(self, cfg: Any) -> float | None:
        from orchestrator import demo, driver
        from orchestrator.config import ConfigError, resolve, static_problems, validate

        try:
            try:
                run = resolve(cfg)
                demo.localise(run)
                _refuse_if_in_use(run)
                if not (self.problems or static_problems(run)):
                    driver.start_ray_early(run)  # and the workers: while validation looks at the model and the data
                validate(run)
            except ConfigError as e:
                raise ConfigError(self.problems + e.problems) from None
            if self.problems:
                raise ConfigError(self.problems)
            check_memory(run)
            if _multirun():
                self._name_sweep_run(run)
            if run.cluster.kind == "local":
                print(f"adapter written to {driver.train(run, resume_command=self._resume_command(run))}")
            elif not self._submit(run):
                return None
        finally:
            driver.cancel_early_fit()  # workers that still wait are not needed: nothing passed to them
        return _final_eval_loss(RunDir(Path(run.output_dir)))

    def _resume_command(self, run: Any) -> str | None:
        """The command that resumes this run: the same command line, with output_dir added where
        it was Hydra's fresh timestamped directory. In a multirun: this run's own overrides."""
        if not self.program:
            return None
        args = [*self.program, "train", *self.argv]
        sweep = _multirun()
        if sweep:
            from hydra.core.hydra_config import HydraConfig

            args = [
                *self.program,
                "train",
                *self.flags,
                *(o for o in HydraConfig.get().overrides.task if _override_key(o) != "output_dir"),
            ]
        if sweep or not (any(_override_key(a) == "output_dir" for a in args) or (run.storage_path and run.name)):
            args.append(f"output_dir={_hydra_value(run.output_dir)}")
        return shlex.join(args)

    def _name_sweep_run(self, run: Any) -> None:
        """Every run of a sweep shares a W&B group and is named by its swept values; on shared
        storage each gets its own directory <storage_path>/<name>/<swept values>."""
        from hydra.core.hydra_config import HydraConfig

        from orchestrator.config import ConfigError

        hc = HydraConfig.get()
        swept = self.swept | set(hc.sweeper.get("params") or {})
        label = (
            ",".join(o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") in swept)
            or hc.job.override_dirname
        )
        run.tracking.group = run.tracking.group or (run.name if run.storage_path else hc.sweep.dir)
        run.tracking.name = run.tracking.name or label or run.name
        if run.storage_path and label:
            run.name = f"{run.name}/{label}"
            run.output_dir = run.storage_run_dir()
        if run.cluster.kind != "local" and "optuna" in str(hc.sweeper.get("_target_", "")).lower():
            raise ConfigError(
                [
                    "sweep: the Optuna sweeper runs trials one after another on the final eval loss "
                    "of each; run it with cluster=local, or use a grid preset for cluster sweeps"
                ]
            )

    def _submit(self, run: Any) -> bool:
        """Submit to the run's cluster, then follow the job to its end unless detached (the runs of
        a multirun are awaited together, once all are submitted). True when the run ended here."""
        from orchestrator import launch
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
            self.sweep_jobs.append(job)
            return False
        state = target.follow(job)
        if state == "DETACHED":
            return False
        if state not in launch.SUCCEEDED:
            _, message = target.status(job)
            raise RunFailed(f"job {job['id']} ended {state}{': ' + message if message else ''}")
        print(f"adapter written to {RunDir(Path(run.output_dir)).adapter}")
        return True

    def await_sweep_jobs(self) -> None:
        """Wait for every job of a cluster sweep; each failure joins the sweep's summary."""
        from orchestrator import launch

        print(f"waiting for {len(self.sweep_jobs)} jobs (`orchestrator jobs logs ID` shows one's log)", flush=True)
        for job, (state, message) in launch.wait_all(self.sweep_jobs):
            print(f"job {job['id']} {state}: {job['run_dir']}", flush=True)
            if state not in launch.SUCCEEDED:
                self.failed.append(
                    f"{job['run_dir']}: job {job['id']} ended {state}{': ' + message if message else ''}"
                )


def check_memory(run: Any) -> None:
    """Refuse a run whose predicted peak per worker exceeds the memory its workers will have,
    showing the plan (trainer.check_memory=false trains anyway)."""
    from orchestrator.config import ConfigError

    if not run.trainer.check_memory:
        return
    from orchestrator.plan import check_fits, render

    plan = check_fits(run)
    if plan is not None:
        raise ConfigError(
            ["the run does not fit in memory (set trainer.check_memory=false to train anyway):\n" + render(plan)]
        )


def _override_key(arg: str) -> str:
    return arg.split("=", 1)[0].lstrip("+~") if "=" in arg and not arg.startswith("-") else ""


def _hydra_value(value: str) -> str:
    """A value for Hydra's override grammar: as is where plain, else quoted (Hydra unescapes
    backslashes only before a quote, and before the closing one)."""
    if re.fullmatch(r"[\w./:@%+-]+", value):
        return value
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def _exit_interrupted(e: BaseException) -> None:
    """Say where the interrupted run stands and how to resume it, then exit 128 + signal. A
    further signal while Ray shuts down exits at once, without a traceback."""
    code = e.exit_code
    print(str(e), file=sys.stderr, flush=True)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: os._exit(code))
    sys.exit(code)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def _discard_hydra_dir() -> None:
    """A run that fails validation, or is refused a directory in use, leaves nothing behind. Hydra
    made its run directory (its .hydra/
    and the job log) before any check could run; remove it, and the parents Hydra created, as long
    as they hold nothing else. (A multirun keeps them: the sweep report reads each run's error there.)"""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    out = Path(hc.runtime.output_dir)
    if not out.is_dir() or any(p.name not in (".hydra", f"{hc.job.name}.log") for p in out.iterdir()):
        return
    shutil.rmtree(out, ignore_errors=True)
    cwd = Path.cwd().resolve()
    for parent in out.resolve().parents:
        if parent == cwd or not parent.is_relative_to(cwd):
            break
        try:
            parent.rmdir()  # only if empty
        except OSError:
            break


def _final_eval_loss(rundir: RunDir) -> float | None:
    from orchestrator.report import read_metrics

    if not rundir.metrics.is_file():
        return None
    _, evals = read_metrics(rundir.root)
    return float(evals[-1]["eval_loss"]) if evals else None


def train(argv: list[str]) -> None:
    """`orchestrator train [--dry-run] [--verbose] HYDRA_ARGS...`."""
    import hydra
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from orchestrator.config import CONF_DIR, ConfigError, check_group_overrides
    from orchestrator.interrupt import invocation

    ours = argparse.ArgumentParser(prog="orchestrator train", description=TRAIN_HELP, allow_abbrev=False)
    _train_flags(ours)
    own, rest = ours.parse_known_args(argv)
    if own.verbose:
        os.environ["ORCHESTRATOR_VERBOSE"] = "1"
    # Hydra's own grammar, parsed by Hydra's own parser; Hydra's app wants its flags first.
    hydra_args = get_args_parser().parse_intermixed_args(rest)
    positional, flags = Counter(hydra_args.overrides), []
    for a in rest:
        if positional[a]:
            positional[a] -= 1
        else:
            flags.append(a)
    overrides = [o for o in hydra_args.overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "++hydra"))]
    hydra_overrides = [o for o in hydra_args.overrides if o not in overrides]
    if own.dry_run:
        overrides.append("cluster.dry_run=true")
    config_dirs = [Path(hydra_args.config_dir)] if hydra_args.config_dir else []
    usable, problems = check_group_overrides(overrides, config_dirs=config_dirs)
    if problems and hydra_args.cfg:
        _fail(str(ConfigError(problems)))
    swept = {o.key_or_group for o in OverridesParser.create().parse_overrides(usable) if o.is_sweep_override()}
    command = TrainCommand(
        problems=problems,
        swept=swept,
        program=invocation(),
        argv=list(argv),
        flags=[f for f in flags if f not in ("-m", "--multirun")],
    )
    sys.argv = ["orchestrator-train", *flags, *usable, *hydra_overrides]
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(command.task)()
    if command.sweep_jobs:
        command.await_sweep_jobs()
    if command.failed:
        _fail(f"{len(command.failed)} run(s) of the sweep failed:\n  " + "\n  ".join(command.failed), 1)


# --- the other commands -------------------------------------------------------------------------


def merge_command(args: argparse.Namespace) -> None:
    from orchestrator.merge import BadInput, MergeError, merge

    try:
        out = merge(args.adapter, args.output, args.base, args.dtype)
    except BadInput as e:
        _fail(f"merge: {e}")
    except (MergeError, FileExistsError) as e:
        _fail(str(e), 1)
    print(f"merged model written to {out}")


def jobs_command(args: argparse.Namespace) -> None:
    from orchestrator import launch

    try:
        job = launch.load_job(args.job_id, args.address)
    except launch.UnknownJob as e:
        _fail(f"jobs {args.action}: {e}")
    if args.address:
        job["address"] = args.address
    target = launch.target(job["kind"])
    try:
        if args.action == "status":
            state, message = target.status(job)
            print(f"{args.job_id} {state}{': ' + message if message else ''}")
        elif args.action == "logs":
            target.follow(job) if args.follow else target.logs(job)
        else:
            target.stop(job)
            print(f"stop requested for {args.job_id}")
    except launch.SubmitError as e:
        _fail(str(e), 1)


def _refuse_if_in_use(run: Any) -> None:
    """RunDirInUse before validation, which may tokenize the data for minutes, when another live
    command holds output_dir (the lock itself is taken by driver.train)."""
    root = Path(run.output_dir)
    if root.is_dir():
        RunDir(root).lock().check_free()


def run_command(args: argparse.Namespace) -> None:
    """Train a composed config as is. This is what cluster jobs execute; every check runs again
    here, on the cluster, before any worker starts."""
    from omegaconf import OmegaConf

    from orchestrator import demo, driver
    from orchestrator.config import ConfigError, to_typed, validate
    from orchestrator.config.schema import RunConfig
    from orchestrator.interrupt import invocation

    logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra does this for `train`
    if not args.config.is_file():
        _fail(f"run: {args.config} does not exist")
    try:
        composed = OmegaConf.to_container(OmegaConf.load(args.config))
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf errors alike: the file is not a composed config
        _fail(
            f"run: {args.config} is not a composed config (from `train --cfg job`): {' '.join(str(e).split()) or type(e).__name__}"
        )
    if not isinstance(composed, dict):
        _fail(
            f"run: {args.config} is not a composed config (from `train --cfg job`): a {type(composed).__name__}, not a mapping"
        )
    try:
        run = to_typed(composed, RunConfig)
        demo.localise(run)
        _refuse_if_in_use(run)
        on_cluster = run.cluster.kind != "local"
        validate(run, on_cluster=on_cluster)
        check_memory(run)
        resume = shlex.join([*invocation(), "run", str(args.config)])
        print(f"adapter written to {driver.train(run, on_cluster=on_cluster, resume_command=resume)}")
    except ConfigError as e:
        _fail(str(e))
    except driver.Interrupted as e:
        _exit_interrupted(e)
    except driver.Preempted as e:
        print(str(e), file=sys.stderr)
        sys.exit(PREEMPTED_EXIT)
    except (driver.RunFailed, RunDirInUse, FileExistsError) as e:
        _fail(str(e), 1)


def plan_command(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from orchestrator import demo, plan
    from orchestrator.config import ConfigError, compose, validate

    try:
        device_memory = plan.parse_bytes(args.device_memory) if args.device_memory else None
    except ValueError as e:
        _fail(f"plan: --device-memory: {e}")
    overrides = list(args.overrides)
    if not any(_override_key(o) == "output_dir" for o in overrides):
        overrides.append("output_dir=plan-output-unused")  # nothing is written; composition needs one
    try:
        run = compose(overrides, config_dirs=[args.config_dir] if args.config_dir else [])
        demo.localise(run)
        validate(run, environment=False)  # the config's own checks; the weights and data need not exist
        result = plan.make_plan(run, device_memory)
    except ConfigError as e:
        _fail(str(e))
    except plan.PlanError as e:
        _fail(str(e))
    if args.probe:
        with tempfile.TemporaryDirectory(prefix="orchestrator-probe-") as tmp:
            probed = plan.probe(run, tmp)
        if args.json:
            print(json.dumps({k: v.as_dict() if isinstance(v, plan.Plan) else v for k, v in probed.items()}, indent=2))
            return
        print("before the probe:")
        plan.print_plan(probed["before"])
        m = probed["measured"]
        refitted = ", ".join(f"{k}={v:.4g}" for k, v in probed["refitted"].items())
        print(
            f"\nmeasured per worker: start {plan.human(m['start'])}, load peak {plan.human(m['load_peak'])}, "
            f"steady peak {plan.human(m['steady_peak'])}\n\nafter refitting the overhead terms ({refitted}):"
        )
        plan.print_plan(probed["after"])
        return
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        plan.print_plan(result)


def report_command(args: argparse.Namespace) -> None:
    from orchestrator import report

    if not args.sweep_dir.is_dir():
        _fail(f"sweep report: {args.sweep_dir} {'is not a directory' if args.sweep_dir.exists() else 'does not exist'}")
    rows = report.collect(args.sweep_dir)
    if not rows:
        _fail(f"sweep report: no runs in {args.sweep_dir} (no directory with config.yaml or .hydra/overrides.yaml)")
    report.print_table(rows)
    paths = report.write_report(args.sweep_dir, rows)
    print("report written to:\n" + "\n".join(f"  {p}" for p in paths.values()))


def main(argv: list[str] | None = None) -> None:
    """The `orchestrator` command. Run as a program (no argv given), it stops the Ray it started
    and ends without the rest of Python's teardown: unloading torch, transformers and Ray, and
    Ray's exit hook, which first sleeps half a second, take seconds after the work is done and
    everything the command wrote is closed."""
    if argv is not None:
        return _dispatch(argv)
    status = 0
    try:
        _dispatch(sys.argv[1:])
    except SystemExit as e:
        if isinstance(e.code, int):
            status = e.code
        elif e.code is not None:  # sys.exit("message"): what Python prints, with status 1
            print(e.code, file=sys.stderr)
            status = 1
    if "ray" in sys.modules:
        from orchestrator.driver import stop_ray

        stop_ray()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _dispatch(argv: list[str]) -> None:
    logging.getLogger("orchestrator").setLevel(logging.INFO)
    if not argv:
        build_parser().print_help()
        return None
    if argv[0] == "train":
        return train(argv[1:])  # Hydra's grammar follows; argparse must not read it
    args = build_parser().parse_args(argv)
    args.func(args)
