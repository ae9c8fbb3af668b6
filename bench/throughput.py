"""Training throughput and peak memory: `orchestrator train` against a plain Hugging Face
Trainer + PEFT baseline and against a bare torch loop without Ray (the same components: base,
adapter, loss, optimizer, schedule), on the same model, data, masking, batch and optimizer, in
one run; then the sharding strategies against each other on the same workload.

    python bench/throughput.py                      # CPU: tiny Llama, NF4, 2 workers vs 1
    python bench/throughput.py --gpu --hidden 2048 --layers 8 --steps 30 --workers 1

Each variant runs in its own process so that peak memory is its own. tokens/s counts non-pad
tokens of the global batch over the step's wall time, median over the steps after warm-up.
Prints a table with ratios to the baseline and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build_model(work: Path, hidden: int, layers: int) -> Path:
    from orchestrator import demo

    tok = demo.ensure_demo_assets()
    path = work / f"llama-h{hidden}-l{layers}"
    if not (path / "config.json").exists():
        inter = (hidden * 8 // 3 + 31) // 32 * 32
        demo.build_tiny_model(
            path,
            tok,
            "llama",
            hidden_size=hidden,
            intermediate_size=inter,
            num_layers=layers,
            num_heads=max(4, hidden // 64),
            num_kv_heads=max(2, hidden // 256),
        )
    return path


def build_data(work: Path, join: int) -> Path:
    """The demo rows, `join` at a time merged into one longer example (GPU runs need sequences
    long enough for the matmuls, not the launch overheads, to dominate)."""
    from orchestrator import demo

    rows = [json.loads(line) for line in demo.DEMO_DATA.read_text().splitlines()]
    path = work / f"data-x{join}.jsonl"
    with path.open("w") as f:
        for i in range(0, len(rows) - join + 1, join):
            group = rows[i : i + join]
            f.write(
                json.dumps(
                    {
                        "instruction": "\n".join(r["instruction"] + " " + r["input"] for r in group),
                        "input": "",
                        "output": "\n".join(r["output"] for r in group),
                    }
                )
                + "\n"
            )
    return path


def hf_baseline(args) -> dict:
    """The baseline: transformers.Trainer with a PEFT LoRA model on the same NF4 base."""
    import torch
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from orchestrator.adapters import peft_config
    from orchestrator.config import AdapterConfig, ModelConfig, QuantConfig
    from orchestrator.data import collate, encode_rows, read_rows
    from orchestrator.model import load_base, load_tokenizer

    mcfg = ModelConfig(path=args.model, dtype=args.dtype)
    qcfg = QuantConfig(kind=args.quant)
    tok = load_tokenizer(mcfg)
    examples = encode_rows(read_rows(args.data, "alpaca"), "alpaca", tok, args.seq)
    device = "cuda" if args.gpu else "cpu"
    model = get_peft_model(
        load_base(mcfg, qcfg, device), peft_config(AdapterConfig(r=args.r, alpha=2 * args.r, dropout=0.0))
    )
    tokens: list[int] = []

    def collator(batch):
        b = collate(batch, tok.pad_token_id)
        tokens.append(int(b["attention_mask"].sum()))
        return b

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if args.gpu:
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    targs = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.global_batch,
        learning_rate=3e-3,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.1 * args.steps),
        optim="paged_adamw_8bit",
        logging_steps=10**9,
        save_strategy="no",
        report_to=[],
        use_cpu=not args.gpu,
        seed=42,
        bf16=args.dtype == "bf16",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        gradient_checkpointing=False,
        max_grad_norm=1.0,
    )
    Trainer(model=model, args=targs, train_dataset=examples, data_collator=collator, callbacks=[StepTimer()]).train()
    # The collator may run one batch ahead of the step; pair tokens with timed steps in order.
    rates = [n / t for n, t in zip(tokens, times)][args.warmup :]
    peak = torch.cuda.max_memory_allocated() if args.gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": statistics.median(rates), "peak_memory_bytes": peak}


def bare_loop(args) -> dict:
    """Our recipe's components in a plain loop, one process, no Ray, no checkpoints or tracking:
    what `orchestrator train` on one worker costs on top is the overhead of Ray and the loop."""
    import torch

    from orchestrator.adapters import attach_adapter
    from orchestrator.config import AdapterConfig, ModelConfig, OptimConfig, QuantConfig
    from orchestrator.data import collate, encode_rows, read_rows
    from orchestrator.loss import build_loss
    from orchestrator.model import load_base, load_tokenizer
    from orchestrator.optim import build_optimizer, build_scheduler

    mcfg = ModelConfig(path=args.model, dtype=args.dtype)
    tok = load_tokenizer(mcfg)
    examples = encode_rows(read_rows(args.data, "alpaca"), "alpaca", tok, args.seq)
    device = "cuda" if args.gpu else "cpu"
    model = attach_adapter(
        load_base(mcfg, QuantConfig(kind=args.quant), device), AdapterConfig(r=args.r, alpha=2 * args.r, dropout=0.0)
    )
    loss_fn = build_loss(model, 256)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, OptimConfig(name="paged_adamw_8bit"), 3e-3)
    scheduler = build_scheduler(optimizer, OptimConfig(), args.steps)
    model.train()
    rates = []
    for step in range(args.steps):
        rows = [examples[(step * args.global_batch + i) % len(examples)] for i in range(args.global_batch)]
        batch = {k: v.to(device) for k, v in collate(rows, tok.pad_token_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        t0 = time.perf_counter()
        loss_fn(model, batch, n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if args.gpu:
            torch.cuda.synchronize()
        rates.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() if args.gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": statistics.median(rates[args.warmup :]), "peak_memory_bytes": peak}


CHILDREN = {"hf": hf_baseline, "bare": bare_loop}


def child_run(args, which: str) -> dict:
    """One variant in a process of its own, so that its peak memory is its own."""
    child = [
        sys.executable,
        __file__,
        f"--child={which}",
        *sys.argv[1:],
        f"--model={args.model}",
        f"--data={args.data}",
        f"--out={Path(args.out) / which}",
    ]
    proc = subprocess.run(child, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{which} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def orchestrator_run(args, strategy: str, workers: int) -> dict:
    out = Path(args.out) / f"orch-{strategy}-{workers}"
    cmd = [
        sys.executable,
        "-m",
        "orchestrator",
        "train",
        "experiment=demo",
        f"model.path={args.model}",
        f"model.dtype={args.dtype}",
        f"quant={args.quant}",
        f"strategy={strategy}",
        f"cluster.num_workers={workers}",
        f"cluster.use_gpu={str(args.gpu).lower()}",
        f"trainer.micro_batch_size={args.global_batch // workers}",
        f"trainer.max_steps={args.steps}",
        "trainer.save_every=0",
        f"data.max_seq_len={args.seq}",
        f"data.path={args.data}",
        "data.eval_fraction=0",
        f"adapter.r={args.r}",
        f"adapter.alpha={2 * args.r}",
        "tracking=none",
        f"output_dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"orchestrator train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][args.warmup :]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in steps),
        "param_bytes_per_worker": steps[0]["param_bytes_per_worker"],
    }


def ratios(rows: dict, ref: dict) -> dict:
    return {
        k: {
            "tokens_per_s": v["tokens_per_s"] / ref["tokens_per_s"],
            "peak_memory": v["peak_memory_bytes"] / ref["peak_memory_bytes"],
        }
        for k, v in rows.items()
    }


def table(title: str, rows: dict, ref: dict) -> None:
    print(f"\n{title}")
    print(f"{'variant':42} {'tokens/s':>10} {'ratio':>6} {'peak MiB':>9} {'ratio':>6} {'base MiB/worker':>16}")
    for name, r in rows.items():
        base = r.get("param_bytes_per_worker")
        print(
            f"{name:42} {r['tokens_per_s']:10.1f} {r['tokens_per_s'] / ref['tokens_per_s']:6.2f} "
            f"{r['peak_memory_bytes'] / 2**20:9.1f} {r['peak_memory_bytes'] / ref['peak_memory_bytes']:6.2f} "
            f"{'' if base is None else f'{base / 2**20:16.2f}'}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--join", type=int, default=1, help="demo rows merged into one example (longer sequences)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--quant", default="nf4", choices=["nf4", "none"])
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"])
    p.add_argument("--workers", type=int, default=2, help="workers of the sharded runs (CPU processes or GPUs)")
    p.add_argument(
        "--strategies",
        default="fsdp,zero2,zero3,zero3_offload",
        help="sharded strategies to compare (ratios to the first)",
    )
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("bf16" if args.gpu else "fp32")
    os.environ.setdefault("WANDB_MODE", "disabled")

    if args.child:  # a child process: one variant, its result as JSON on stdout's last line
        print(json.dumps(CHILDREN[args.child](args)))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-"))
    args.model = str(build_model(work, args.hidden, args.layers))
    args.data = str(build_data(work, args.join))
    args.out = str(work)
    baseline = child_run(args, "hf")
    results = {
        "hf_trainer_peft (1 process)": baseline,
        "bare torch loop (1 process, no Ray)": child_run(args, "bare"),
        "orchestrator single (1 worker)": orchestrator_run(args, "single", 1),
    }
    strategies = {s: orchestrator_run(args, s, args.workers) for s in args.strategies.split(",") if s}

    print(
        f"\nmodel: llama hidden={args.hidden} layers={args.layers}, {args.quant} base, {args.dtype}, LoRA r={args.r}, "
        f"global batch {args.global_batch} x {args.seq} tokens max, {args.steps} steps ({'GPU' if args.gpu else 'CPU'})"
    )
    table(
        "against the Hugging Face Trainer + PEFT baseline",
        {**results, **{f"orchestrator {k} ({args.workers} workers)": v for k, v in strategies.items()}},
        baseline,
    )
    if strategies:
        first = next(iter(strategies))
        table(f"strategies against {first} ({args.workers} workers each)", strategies, strategies[first])
    device = "gpu" if args.gpu else "cpu"
    record = {
        "args": {k: v for k, v in vars(args).items() if k not in ("model", "data", "out", "child")},
        "machine": platform.platform(),
        "results": results,
        "strategies": strategies,
        "ratios_to_baseline": ratios(results, baseline),
        "orchestrator_over_bare_loop": ratios(
            {"orchestrator single (1 worker)": results["orchestrator single (1 worker)"]},
            results["bare torch loop (1 process, no Ray)"],
        ),
        "strategy_ratios_to_first": ratios(strategies, next(iter(strategies.values()))) if strategies else {},
    }
    dest = HERE / "results" / f"throughput-{device}.json"
    dest.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
