"""The planner's figures for Llama-3-8B and Llama-3-70B QLoRA (README, issue 13 item 6), from
config.json alone: r=16 and r=64 on every linear layer, sequences of 2048 and 4096, on 1x80 GB,
2x24 GB and 8x80 GB: peak GiB per GPU of each strategy (micro-batch 1, gradient checkpointing, paged
8-bit AdamW, bf16 compute) and what the planner advises.

    python bench/plan_table.py        # prints a markdown table, writes bench/results/plan-llama3.json
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETUPS = {"1x80GB": (1, "80GB"), "2x24GB": (2, "24GB"), "8x80GB": (8, "80GB")}


def _totals(p) -> dict:  # noqa: ANN001 - a StrategyPlan
    d = p.as_dict()
    return {k: d[k] for k in ("load_bytes", "steady_bytes", "peak_bytes", "host")}


def main() -> None:
    from orchestrator import demo
    from orchestrator.config import compose
    from orchestrator.plan import make_plan, parse_bytes

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in ("8b", "70b"):
            path = demo.write_llama3_config(Path(tmp) / size, size)
            shape = None
            for r in (16, 64):
                for seq in (2048, 4096):
                    for setup, (n, mem) in SETUPS.items():
                        run = compose(
                            [
                                "experiment=llama3_8b_qlora",
                                f"model.path={path}",
                                "output_dir=unused",
                                f"adapter.r={r}",
                                f"adapter.alpha={2 * r}",
                                f"data.max_seq_len={seq}",
                                "trainer.micro_batch_size=1",
                                f"cluster.num_workers={n}",
                                "strategy=" + ("single" if n == 1 else "fsdp"),
                            ]
                        )
                        if rows and rows[-1]["r"] != r:
                            shape = None
                        plan = make_plan(run, device_memory=parse_bytes(mem), shape=shape)
                        shape = plan.shape
                        rows.append(
                            {
                                "model": f"llama3-{size}",
                                "r": r,
                                "seq": seq,
                                "setup": setup,
                                "adapter_params": plan.shape.adapter_params,
                                "strategies": {s: _totals(p) for s, p in plan.plans.items() if p.problem is None},
                                "advice": plan.advice,
                            }
                        )
    out = HERE / "results" / "plan-llama3.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    gib = 2**30
    print("| model | r | seq | GPUs | single | ddp | fsdp load / steady | zero3 | zero3_offload GPU (host) | advice |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for x in rows:
        t = x["strategies"]
        single = f"{t['single']['peak_bytes'] / gib:.1f}" if "single" in t else "-"
        off = t["zero3_offload"]
        host = sum(i["bytes"] for i in off["host"])
        advice = x["advice"]
        advice = advice.split(". Fits: ")[-1].split(";")[0] if "Fits:" in advice else advice.split(":")[0]
        print(
            f"| {x['model']} | {x['r']} | {x['seq']} | {x['setup']} | {single} | {t['ddp']['peak_bytes'] / gib:.1f} | "
            f"{t['fsdp']['load_bytes'] / gib:.1f} / {t['fsdp']['steady_bytes'] / gib:.1f} | "
            f"{t['zero3']['peak_bytes'] / gib:.1f} | {off['peak_bytes'] / gib:.1f} ({host / gib:.1f}) | {advice} |"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
