"""Peak private memory of each worker while a large base loads and trains one step, as a user runs
it (`orchestrator train` on 2 CPU workers), above the same command on the tiny demo model, as a
multiple of the base's bytes on disk; fsdp and zero3, fp32 and NF4.

    python bench/sharded_loading.py                       # this checkout
    python bench/sharded_loading.py --repo /work/main     # another checkout (before/after)

The base is a random fp32 Llama (hidden 1536, 14 layers, 1.6 GB, 7% of it per layer) built once
in --work. USS (private resident bytes, psutil) of every Ray Train worker under the command is
sampled every 50 ms. Writes bench/results/sharded_loading.json (or --out).
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
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "train", *CHEAP, f"output_dir={out}", *overrides],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    peaks = peak_worker_uss(proc)
    log = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{overrides} failed:\n{log[-3000:]}")
    return {"worker_peak_uss": sorted(peaks.values()), "wall_s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose orchestrator runs")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "orchestrator-bench")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "sharded_loading.json")
    ap.add_argument("--label", default="", help="stored with the results (e.g. before/after)")
    args = ap.parse_args()
    from orchestrator import demo

    args.work.mkdir(parents=True, exist_ok=True)
    base = build_base(args.work)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    tiny = demo.ensure_demo_assets()
    results = {"repo": str(args.repo.resolve()), "label": args.label, "base_bytes": size, "variants": {}}
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for strategy in ("fsdp", "zero3"):
            ref = peak_uss(args.repo, Path(tmp) / f"tiny-{strategy}", [f"model.path={tiny}", f"strategy={strategy}"])
            for quant in ("none", "nf4"):
                run = peak_uss(
                    args.repo,
                    Path(tmp) / f"{strategy}-{quant}",
                    [f"model.path={base}", f"strategy={strategy}", f"quant={quant}"],
                )
                above = max(run["worker_peak_uss"]) - max(ref["worker_peak_uss"])
                results["variants"][f"{strategy}-{quant}"] = {
                    **run,
                    "tiny_worker_peak_uss": ref["worker_peak_uss"],
                    "peak_above_tiny_bytes": above,
                    "peak_above_tiny_x_base": round(above / size, 3),
                }
                print(f"{strategy:6s} {quant:5s} peak above tiny: {above / 2**20:7.0f} MiB = {above / size:.2f}x base")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    previous[args.label or str(args.repo)] = results
    args.out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
