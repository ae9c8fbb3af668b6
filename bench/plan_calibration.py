"""The memory planner against measured peaks: every strategy, bf16/fp32 and NF4, on the demo's
tiny Llama and on a mid-size one, 2 CPU workers (single: 1), a few real steps each.

    python bench/plan_calibration.py                       # CPU, both models, every strategy
    python bench/plan_calibration.py --models mid --cases fp32-nf4 --strategies fsdp,zero3

Each worker logs the memory it held when setup began, its peak while loading and its peak over
the steps (VmHWM on CPU, reset between the phases; CUDA's max_memory_allocated on GPU). The
planner is asked for the same run with the micro-batch's real token count. Writes JSON to
bench/results/plan-calibration-<device>.json and prints prediction / measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from throughput import build_data, build_model  # noqa: E402

STRATEGIES = ["single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload"]
CASES = {
    "fp32": ["model.dtype=fp32", "quant=none"],
    "bf16": ["model.dtype=bf16", "quant=none"],
    "fp32-nf4": ["model.dtype=fp32", "quant=nf4"],
    "bf16-nf4": ["model.dtype=bf16", "quant=nf4"],
}
MODELS = {"tiny": None, "mid": (1024, 8)}


def overrides(work: Path, model: Path | None, data: Path, case: str, strategy: str, seq: int, steps: int) -> list[str]:
    shape = ["cluster.num_workers=1", "trainer.micro_batch_size=8"]
    if strategy != "single":
        shape = ["cluster.num_workers=2", "trainer.micro_batch_size=4"]
    out = work / f"{model.name if model else 'tiny'}-{case}-{strategy}"
    return [
        "experiment=demo",
        f"output_dir={out}",
        "tracking=none",
        f"trainer.max_steps={steps}",
        "trainer.save_every=0",
        "data.eval_fraction=0",
        f"data.path={data}",
        f"data.max_seq_len={seq}",
        "optim=paged_adamw_32bit",
        f"strategy={strategy}",
        *CASES[case],
        *shape,
        *([f"model.path={model}"] if model is not None else []),
    ]


def predict(run, strategy: str, seq: int) -> dict:  # noqa: ANN001 - a RunConfig
    from orchestrator.plan import make_plan

    plan = make_plan(run, tokens=run.trainer.micro_batch_size * seq)
    p = plan.plans[strategy]
    return {"load": p.load_bytes, "steady": p.steady_bytes, "items": p.as_dict(), "shape": plan.shape}


def measure(work: Path, model: Path | None, data: Path, case: str, strategy: str, seq: int, steps: int) -> dict:
    from orchestrator import driver
    from orchestrator.config import compose, validate

    ov = overrides(work, model, data, case, strategy, seq, steps)
    out = Path(ov[1].split("=", 1)[1])
    run = validate(compose(ov))
    t0 = time.perf_counter()
    driver.train(run)  # single too: one Ray worker, a process of its own like the others
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps_rows = [r for r in rows if "steady_peak_memory_bytes" in r]
    measured = {
        "start": max(r["start_memory_bytes"] for r in steps_rows),
        "load": max(r["load_peak_memory_bytes"] for r in steps_rows),
        "steady": max(r["steady_peak_memory_bytes"] for r in steps_rows),
    }
    pred = predict(run, strategy, seq)
    return {
        "model": model.name if model else "tiny-llama",
        "case": case,
        "strategy": strategy,
        "workers": run.cluster.num_workers,
        "base_params": pred["shape"].base_params,
        "adapter_params": pred["shape"].adapter_params,
        "measured": measured,
        "predicted": {"load": pred["load"], "steady": pred["steady"]},
        "ratio": {k: pred[k] / measured[k] for k in ("load", "steady")},
        "items": pred["items"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def repredict(paths: list[Path], out: Path, seq: int, steps: int) -> None:
    """The predictions of the current planner for runs measured before (no training)."""
    from orchestrator import demo
    from orchestrator.config import compose

    results = []
    with tempfile.TemporaryDirectory(prefix="plan-calibration-") as tmp:
        work = Path(tmp)
        import os

        os.environ.setdefault("ORCHESTRATOR_DEMO_DIR", str(work / "demo"))
        demo.ensure_demo_assets()
        data = build_data(work, 4)
        models = {"tiny-llama": None}
        for path in paths:
            for r in json.loads(path.read_text())["results"]:
                if r["model"] not in models:
                    name = next(k for k, v in MODELS.items() if v and r["model"] == f"llama-h{v[0]}-l{v[1]}")
                    models[r["model"]] = build_model(work, *MODELS[name])
                run = compose(overrides(work, models[r["model"]], data, r["case"], r["strategy"], seq, steps))
                pred = predict(run, r["strategy"], seq)
                r["predicted"] = {"load": pred["load"], "steady": pred["steady"]}
                r["ratio"] = {k: pred[k] / r["measured"][k] for k in ("load", "steady")}
                r["items"] = pred["items"]
                results.append(r)
                report(r)
    out.write_text(json.dumps({"host": platform.node(), "results": results}, indent=2) + "\n")
    print(f"written to {out}")


def report(r: dict) -> None:
    m, p = r["measured"], r["predicted"]
    print(
        f"{r['model']:18} {r['case']:9} {r['strategy']:13} load {p['load'] / 2**20:8.1f} / "
        f"{m['load'] / 2**20:8.1f} MiB ({r['ratio']['load']:.3f})   steady {p['steady'] / 2**20:8.1f} / "
        f"{m['steady'] / 2**20:8.1f} MiB ({r['ratio']['steady']:.3f})",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,mid")
    ap.add_argument("--cases", default="fp32,fp32-nf4,bf16")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "plan-calibration-cpu.json")
    ap.add_argument("--repredict", type=Path, nargs="+", help="measured results to predict again, no training")
    args = ap.parse_args()
    if args.repredict:
        return repredict(args.repredict, args.out, args.seq, args.steps)
    import ray

    results = []
    with tempfile.TemporaryDirectory(prefix="plan-calibration-") as tmp:
        work = Path(tmp)
        import os

        os.environ.setdefault("ORCHESTRATOR_DEMO_DIR", str(work / "demo"))
        from orchestrator import demo

        demo.ensure_demo_assets()
        data = build_data(work, 4)  # joined rows: every micro-batch is max_seq_len long
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        for name in args.models.split(","):
            model = build_model(work, *MODELS[name]) if MODELS[name] else None
            for case in args.cases.split(","):
                for strategy in args.strategies.split(","):
                    try:
                        r = measure(work, model, data, case, strategy, args.seq, args.steps)
                    except Exception as e:  # noqa: BLE001 - a failed variant is reported, the rest go on
                        print(f"{name} {case} {strategy}: failed: {e}", flush=True)
                        continue
                    results.append(r)
                    report(r)
        ray.shutdown()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"host": platform.node(), "python": sys.version.split()[0], "results": results}, indent=2) + "\n"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
