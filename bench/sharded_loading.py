"""Peak private memory of each worker while a large base loads and trains one step, as a user runs
it (`orchestrator train` on 2 CPU workers), above the same command on the tiny demo model, as a
multiple of the base's bytes on disk; fsdp and zero3, fp32 and NF4.

    python bench/sharded_loading.py                       # this checkout
    python bench/sharded_loading.py --repo /work/main     # another checkout (before/after)

The base is a random fp32 Llama (hidden 1536, 14 layers, 1.6 GB, 7% of it per layer) built once
in --work. USS (private resident bytes, psutil) of every Ray Train worker under the command is
sampled every 20 ms, over the whole run and while loading (until the run's summary.json appears).
--only picks variants (e.g. --only fsdp-none); the environment passes through, so e.g.
MALLOC_MMAP_THRESHOLD_=1048576 shows what glibc's heap keeps. Writes bench/results/sharded-loading-cpu.json
(or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import peak_worker_uss

HERE = Path(__file__).resolve().parent
CHEAP = [
    "experiment=demo",
    "tracking=none",
    "cluster.num_workers=2",
    "trainer.max_steps=1",
    "trainer.micro_batch_size=1",
    "trainer.grad_accum=1",
    "trainer.save_every=0",
    "data.eval_fraction=0",
    "data.max_seq_len=64",
    "model.dtype=fp32",
]


def build_base(work: Path) -> Path:
    from orchestrator import demo

    path = work / "llama-h1536-l14"
    if not (path / "config.json").exists():
        demo.build_tiny_model(
            path,
            tokenizer_dir=demo.ensure_demo_assets(),
            hidden_size=1536,
            intermediate_size=4096,
            num_layers=14,
            num_heads=12,
            num_kv_heads=12,
        )
    return path


def peak_uss(repo: Path, out: Path, overrides: list[str]) -> dict:
    """Run the command and return each worker's peak USS and the run's wall time."""
    env = {**os.environ, "PYTHONPATH": str(repo)}
    t0 = time.perf_counter()
    log_file = out.with_name(out.name + ".log")
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "train", *CHEAP, f"output_dir={out}", *overrides],
            cwd=repo,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        peaks = peak_worker_uss(proc, load_end=out / "summary.json")
    if proc.wait() != 0:
        raise RuntimeError(f"{overrides} failed:\n{log_file.read_text()[-3000:]}")
    return {
        "worker_load_peak_uss": sorted(peaks["load"].values()),
        "worker_peak_uss": sorted(peaks["run"].values()),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose orchestrator runs")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "orchestrator-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sharded-loading-cpu.json")
    ap.add_argument("--label", default="", help="stored with the results (e.g. before/after)")
    ap.add_argument("--only", nargs="*", default=[], help="variants to run, e.g. fsdp-none zero3-nf4")
    args = ap.parse_args()
    from orchestrator import demo

    args.work.mkdir(parents=True, exist_ok=True)
    base = build_base(args.work)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    tiny = demo.ensure_demo_assets()
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    results = {"repo": str(args.repo.resolve()), "label": args.label, "env": env, "base_bytes": size, "variants": {}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        refs = {}
        for strategy in ("fsdp", "zero3"):
            if args.only and not any(v.startswith(strategy) for v in args.only):
                continue
            ref = peak_uss(args.repo, Path(tmp) / f"tiny-{strategy}", [f"model.path={tiny}", f"strategy={strategy}"])
            refs[strategy] = ref
            for quant in ("none", "nf4"):
                if args.only and f"{strategy}-{quant}" not in args.only:
                    continue
                run = peak_uss(
                    args.repo,
                    Path(tmp) / f"{strategy}-{quant}",
                    [f"model.path={base}", f"strategy={strategy}", f"quant={quant}"],
                )
                load = max(run["worker_load_peak_uss"]) - max(ref["worker_load_peak_uss"])
                above = max(run["worker_peak_uss"]) - max(ref["worker_peak_uss"])
                results["variants"][f"{strategy}-{quant}"] = {
                    **run,
                    "tiny_worker_load_peak_uss": ref["worker_load_peak_uss"],
                    "tiny_worker_peak_uss": ref["worker_peak_uss"],
                    "load_peak_above_tiny_bytes": load,
                    "load_peak_above_tiny_x_base": round(load / size, 3),
                    "peak_above_tiny_bytes": above,
                    "peak_above_tiny_x_base": round(above / size, 3),
                }
                if "fsdp" in refs:  # the test's one baseline for all four runs
                    load_fsdp = max(run["worker_load_peak_uss"]) - max(refs["fsdp"]["worker_load_peak_uss"])
                    results["variants"][f"{strategy}-{quant}"]["load_peak_above_fsdp_tiny_x_base"] = round(
                        load_fsdp / size, 3
                    )
                print(
                    f"{strategy:6s} {quant:5s} above tiny: loading {load / 2**20:6.0f} MiB = {load / size:.2f}x base, "
                    f"whole run {above / 2**20:6.0f} MiB = {above / size:.2f}x base"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.label or str(args.repo)] = results
    args.out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
