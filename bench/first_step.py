"""Time to first step of the demo (issue 15, item 4), next to the floor Ray Train sets here.

    python bench/first_step.py --rounds 3

Each round runs, in turns:
- `orchestrator train experiment=demo` as a user types it (2 FSDP workers, QLoRA, W&B offline; the
  demo assets and the data cache already built): seconds until metrics.jsonl has its first row,
  and the CPU seconds each kind of process had used by then (sampled every 50 ms with psutil);
- an empty Ray Train run: a fresh Python that starts a local Ray and fits the command's own
  TorchTrainer (driver._trainer_class) with 2 CPU workers whose train function only writes a
  file: seconds until it does. What no run through Ray Train can start faster than here.
Writes bench/results/first-step-cpu.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
KINDS = (
    "RayTrainWorker",
    "TrainController",
    "SynchronizationActor",
    "DashboardAgent",
    "RuntimeEnvAgent",
    "raylet",
    "gcs_server",
)

EMPTY_RAY_TRAIN = textwrap.dedent("""
    import sys
    import ray
    from ray.train import ScalingConfig
    from orchestrator.driver import OWN_RAY, _trainer_class
    ray.init(address="local", **OWN_RAY)

    def started(config):
        open(config["path"], "w").close()

    _trainer_class(own_ray=True)(started, train_loop_config={"path": sys.argv[1]},
                 scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1})).fit()
""")


def kind(proc: psutil.Process) -> str:
    line = " ".join(proc.cmdline())
    if "default_worker.py" in line:
        return "Ray worker, before its actor"
    for k in KINDS:
        if k in line:
            return k
    if "orchestrator" in line and "train" in line:
        return "orchestrator train (CLI)"
    return "other Ray daemons"


def timed(cmd: list[str], done: Path, env: dict) -> dict:
    """Run cmd; seconds until `done` exists, and CPU seconds by process kind at that moment."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    cpu: dict[int, tuple[str, float]] = {}
    first = None
    while proc.poll() is None:
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                cpu[p.pid] = (kind(p), t.user + t.system)
            except psutil.Error:
                pass
        if first is None and done.is_file() and (done.stat().st_size or done.suffix != ".jsonl"):
            first = time.perf_counter() - t0
            at_first = dict(cpu)
            for p in [*root.children(recursive=True), root]:  # what comes after is not the start
                try:  # Ray's agents included: killed with the command alone they outlive it
                    p.kill()
                except psutil.Error:
                    pass
            break
        time.sleep(0.05)
    err = proc.communicate()[1]
    if first is None:
        raise RuntimeError(f"{cmd} ended before its first step:\n{err[-3000:]}")
    by_kind = collections.Counter()
    for name, seconds in at_first.values():
        by_kind[name] += seconds
    return {"seconds": round(first, 2), "cpu_seconds": {k: round(v, 1) for k, v in by_kind.most_common()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "first-step-cpu.json")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"orchestrator train experiment=demo": [], "empty Ray Train fit": []}
    with tempfile.TemporaryDirectory(prefix="first-step-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "WANDB_MODE": "offline", "ORCHESTRATOR_HOME": str(work / "home")}
        env.setdefault("ORCHESTRATOR_DEMO_DIR", str(work / "demo"))
        warm = [sys.executable, "-m", "orchestrator", "train", "experiment=demo", "trainer.max_steps=1"]
        subprocess.run([*warm, f"output_dir={work / 'warm'}"], env=env, check=True, capture_output=True)
        for r in range(args.rounds):
            out = work / f"run{r}"
            demo = [sys.executable, "-m", "orchestrator", "train", "experiment=demo", f"output_dir={out}"]
            runs["orchestrator train experiment=demo"].append(timed(demo, out / "metrics.jsonl", env))
            flag = work / f"empty{r}"
            runs["empty Ray Train fit"].append(timed([sys.executable, "-c", EMPTY_RAY_TRAIN, str(flag)], flag, env))
            for name, rows in runs.items():
                print(f"round {r + 1}: {name}: {rows[-1]['seconds']} s; CPU s {rows[-1]['cpu_seconds']}", flush=True)
    summary = {name: statistics.median(x["seconds"] for x in rows) for name, rows in runs.items()}
    ratio = summary["orchestrator train experiment=demo"] / summary["empty Ray Train fit"]
    print(f"median first step {summary}; the demo at {ratio:.2f}x an empty Ray Train run's start")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "host": platform.node(),
                "cpus": os.cpu_count(),
                "median_seconds": summary,
                "ratio_to_empty_ray_train": round(ratio, 2),
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
