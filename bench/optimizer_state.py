"""Adapter optimizer state per worker: measured under every strategy on the demo model, and
worked out for Llama-3-70B with LoRA r=64 on all linear layers.

    python bench/optimizer_state.py                # CPU: demo model, 2 workers, 2 steps each
    python bench/optimizer_state.py --no-train     # only the 70B arithmetic (meta device)

The measured figure is what each run logs as optimizer_bytes_per_worker (the largest worker's
optimizer state after its first step). The fsdp run is also trained with
strategy.shard_optimizer=false, and the two adapters must be equal bit for bit. The 70B figures
partition the adapter's real tensor sizes (built on the meta device) exactly as the strategy
does, with the bytes each optimizer keeps per tensor. Writes bench/results/optimizer-state.json.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

TWO = ["cluster.num_workers=2", "trainer.micro_batch_size=4"]
STRATEGIES = [  # the same global batch of 8 everywhere
    ("single", ["strategy=single", "cluster.num_workers=1", "trainer.micro_batch_size=8"]),
    ("ddp", ["strategy=ddp", *TWO]),
    ("fsdp", ["strategy=fsdp", *TWO]),
    ("fsdp, shard_optimizer=false", ["strategy=fsdp", "strategy.shard_optimizer=false", *TWO]),
    ("zero2", ["strategy=zero2", *TWO]),
    ("zero3", ["strategy=zero3", *TWO]),
]
COMMON = [
    "trainer.max_steps=2",
    "trainer.save_every=0",
    "adapter.dropout=0",
    "data.eval_fraction=0",
    "model.dtype=fp32",
    "quant=none",
]


def measure(optim: str) -> list[dict]:
    import ray
    from safetensors.torch import load_file

    from orchestrator import driver
    from orchestrator.config import as_dict, compose, validate
    from orchestrator.train_loop import train_loop

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows, adapters = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in STRATEGIES:
            out = Path(tmp) / label.replace(" ", "").replace(",", "-").replace("=", "-")
            args = ["experiment=demo", f"output_dir={out}", "tracking=none", f"optim={optim}", *COMMON, *overrides]
            run = validate(compose(args))
            if run.cluster.num_workers > 1:
                driver.train(run)
            elif driver.prepare_output_dir(run):
                train_loop({"run": as_dict(run)})
            first = next(json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
            adapters[label] = load_file(out / "adapter" / "adapter_model.safetensors")
            rows.append(
                {
                    "strategy": label,
                    "workers": run.cluster.num_workers,
                    "optimizer": optim,
                    "optimizer_bytes_per_worker": int(first["optimizer_bytes_per_worker"]),
                }
            )
            print(f"{label:30s} {rows[-1]['optimizer_bytes_per_worker']:>10d} bytes", flush=True)
    ray.shutdown()
    a, b = adapters["fsdp"], adapters["fsdp, shard_optimizer=false"]
    same = a.keys() == b.keys() and all((a[k] == b[k]).all().item() for k in a)
    print(f"fsdp adapter sharded == replicated, bit for bit: {same}")
    for r in rows:
        r["adapter_equal_to_replicated"] = same if r["strategy"] == "fsdp" else None
    return rows


def adapter_numels(r: int) -> list[int]:
    """The trainable tensor sizes of Llama-3-70B with LoRA r on all linear layers (meta device)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    with torch.device("meta"):
        model = get_peft_model(
            AutoModelForCausalLM.from_config(cfg),
            LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
    return [p.numel() for p in model.parameters() if p.requires_grad]


def state_bytes_of(numel: int, optim: str) -> int:
    """What the optimizer keeps for one tensor: AdamW two fp32 moments (+ its step); bitsandbytes
    8-bit two uint8 moments with an fp32 absmax per 256-value block for tensors of at least 4096
    values (min_8bit_size), two fp32 moments below that. (Each 8-bit optimizer also holds two
    256-entry fp32 quantization maps, shared by all its tensors: QMAPS.)"""
    if optim == "adamw":
        return 8 * numel + 4
    if optim.endswith("8bit") and numel >= 4096:
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)
    return 8 * numel


QMAPS = 2 * 256 * 4


def arithmetic_70b(r: int = 64) -> list[dict]:
    from orchestrator.strategies.optimizer_shard import partition

    numels = adapter_numels(r)
    rows = []
    for optim in ("adamw", "paged_adamw_8bit"):
        fixed = QMAPS if optim.endswith("8bit") else 0
        whole = fixed + sum(state_bytes_of(n, optim) for n in numels)
        for n in (1, 2, 8):
            share = fixed + max(sum(state_bytes_of(numels[i], optim) for i in o) for o in partition(numels, n))
            rows.append(
                {
                    "model": f"Llama-3-70B LoRA r={r} all-linear",
                    "adapter_params": sum(numels),
                    "optimizer": optim,
                    "workers": n,
                    "replicated_bytes_per_worker": whole,
                    "sharded_bytes_per_worker": share,
                }
            )
            print(
                f"70B r={r} {optim:17s} N={n}: replicated {whole / 2**30:6.2f} GiB, "
                f"sharded {share / 2**30:6.2f} GiB per worker"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-train", action="store_true", help="only the 70B arithmetic")
    ap.add_argument("--optim", default="paged_adamw_32bit")
    args = ap.parse_args()
    result = {"arithmetic": arithmetic_70b()}
    if not args.no_train:
        result["measured"] = measure(args.optim)
    out = HERE / "results" / "optimizer-state.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
