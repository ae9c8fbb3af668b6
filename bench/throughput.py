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


def build_llama3(work: Path, size: str) -> Path:
    """A Llama-3-`size`-shaped model with random bf16 weights, built on the GPU and saved as
    safetensors, with the demo tokenizer (ids below its vocabulary; the 128k-wide head and
    embeddings are there all the same)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator import demo

    path = work / f"llama3-{size}"
    if not (path / "model.safetensors.index.json").exists():
        demo.write_llama3_config(path, size, tokenizer_dir=demo.ensure_demo_assets())
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.bfloat16)
        model.save_pretrained(path, max_shard_size="5GB")
        del model
        torch.cuda.empty_cache()
    return path


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


def build_data(work: Path, join: int, repeat: int = 1) -> Path:
    """The demo rows, `join` at a time merged into one longer example (GPU runs need sequences
    long enough for the matmuls, not the launch overheads, to dominate), `repeat` times over
    (packed 2048-token rows need more tokens than the demo's 320 rows hold)."""
    from orchestrator import demo

    rows = [json.loads(line) for line in demo.DEMO_DATA.read_text().splitlines()] * repeat
    path = work / f"data-x{join}-r{repeat}.jsonl"
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


def step_rates(tokens: list[int], ends: list[float], warmup: int) -> float:
    """Median tokens/s over the steps after warm-up, each step timed from the end of the one
    before: data, collation and the host's own work count, as they do in our runs' windows."""
    rates = [n / (b - a) for n, a, b in zip(tokens[1:], ends, ends[1:])]
    return statistics.median(rates[max(warmup - 1, 0) :])


def hf_baseline(args, padding_free: bool = False) -> dict:
    """The baseline: transformers.Trainer with a PEFT LoRA model on the same NF4 base, its rows
    padded per batch, or with padding_free, transformers' DataCollatorWithFlattening: each batch's
    examples are concatenated into one row with restarting position ids (HF's own padding-free
    packing)."""
    import torch
    from peft import get_peft_model
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

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
    flatten = DataCollatorWithFlattening()

    def collator(batch):
        tokens.append(sum(len(ids) for ids, _ in batch))
        if padding_free:
            return flatten([{"input_ids": ids, "labels": labels} for ids, labels in batch])
        return collate(batch, tok.pad_token_id)

    ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            if args.gpu:
                torch.cuda.synchronize()
            ends.append(time.perf_counter())

    # Padding-free, a batch is one row of its examples end to end: as many examples per step as
    # our packed rows of args.seq tokens hold, so both sides take steps of the same size.
    mean_len = statistics.mean(len(ids) for ids, _ in examples)
    batch = max(1, round(args.global_batch * args.seq / mean_len)) if padding_free else args.global_batch
    targs = TrainingArguments(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=batch,
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
    peak = torch.cuda.max_memory_allocated() if args.gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The collator may run one batch ahead of the step; pair tokens with timed steps in order.
    return {"tokens_per_s": step_rates(tokens, ends, args.warmup), "peak_memory_bytes": peak}


def bare_loop(args) -> dict:
    """Our recipe's components in a plain loop, one process, no Ray, no checkpoints or tracking:
    the same rows as our run (packed where ours packs), loss, optimizer and schedule. What
    `orchestrator train` on one worker costs on top is the overhead of Ray and the loop."""
    import torch

    from orchestrator.adapters import attach_adapter
    from orchestrator.config import compose, validate
    from orchestrator.data.dataset import open_data
    from orchestrator.loss import build_loss
    from orchestrator.model import load_base, load_tokenizer
    from orchestrator.optim import build_optimizer, build_scheduler

    run = validate(compose(orchestrator_overrides(args, "single", 1, Path(args.out) / "bare")))
    tok = load_tokenizer(run.model)
    rows, _ = open_data(run, tok)
    device = "cuda" if args.gpu else "cpu"
    model = attach_adapter(load_base(run.model, run.quant, device), run.adapter)
    loss_fn = build_loss(model, run.trainer.loss_chunk_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, run.optim, run.trainer.lr)
    scheduler = build_scheduler(optimizer, run.optim, args.steps)
    model.train()
    tokens, ends = [], [time.perf_counter()]
    for step in range(args.steps):
        idx = [(step * args.global_batch + i) % len(rows) for i in range(args.global_batch)]
        batch = {k: v.to(device) for k, v in rows.collate([rows[i] for i in idx], tok.pad_token_id).items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        loss_fn(model, batch, n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if args.gpu:
            torch.cuda.synchronize()
        tokens.append(sum(n for i in idx for n in rows.example_lengths(i)))
        ends.append(time.perf_counter())
    peak = torch.cuda.max_memory_allocated() if args.gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": step_rates([0, *tokens], ends, args.warmup), "peak_memory_bytes": peak}


CHILDREN = {"hf": hf_baseline, "hf-padding-free": lambda args: hf_baseline(args, True), "bare": bare_loop}


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


def orchestrator_overrides(args, strategy: str, workers: int, out: Path, *extra: str) -> list[str]:
    """The demo experiment on the bench's model and data; everything not named keeps its default
    (packing where the model supports it, trainer.sync_every_s)."""
    return [
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
        *extra,
    ]


def orchestrator_run(args, strategy: str, workers: int, *extra: str) -> dict:
    out = Path(
        tempfile.mkdtemp(
            prefix="-".join(["orch", strategy, str(workers), *(x.replace("=", "_") for x in extra)]) + "-", dir=args.out
        )
    )
    cmd = [sys.executable, "-m", "orchestrator", "train", *orchestrator_overrides(args, strategy, workers, out, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"orchestrator train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r][args.warmup :]
    return {
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
        "mfu": statistics.median(r["mfu"] for r in steps) if steps[0].get("mfu") is not None else None,
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
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=2, help="rounds of every variant, taking turns; each keeps its best")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--join", type=int, default=1, help="demo rows merged into one example (longer sequences)")
    p.add_argument("--llama3", choices=["8b", "70b"], help="a Llama-3-shaped model with random weights (GPU)")
    p.add_argument(
        "--variants",
        default="hf,hf-padding-free,bare,ours,ours-padded,ours-compile",
        help="which to run, the first the baseline of the ratios",
    )
    p.add_argument("--repeat", type=int, default=1, help="the demo rows this many times over")
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
    args.model = str(build_llama3(work, args.llama3) if args.llama3 else build_model(work, args.hidden, args.layers))
    args.data = str(build_data(work, args.join, args.repeat))
    args.out = str(work)
    variants = {
        "hf": ("hf_trainer_peft (1 process)", lambda: child_run(args, "hf")),
        "hf-padding-free": ("hf_trainer_peft padding-free (1 process)", lambda: child_run(args, "hf-padding-free")),
        "bare": ("bare torch loop (1 process, no Ray)", lambda: child_run(args, "bare")),
        "ours": ("orchestrator single (1 worker)", lambda: orchestrator_run(args, "single", 1)),
        "ours-padded": (
            "orchestrator single, data.packing=false",
            lambda: orchestrator_run(args, "single", 1, "data.packing=false"),
        ),
        "ours-compile": (
            "orchestrator single, trainer.compile=true",
            lambda: orchestrator_run(args, "single", 1, "trainer.compile=true"),
        ),
    }
    chosen = args.variants.split(",")
    if unknown := set(chosen) - set(variants):
        sys.exit(f"--variants: unknown {sorted(unknown)}; valid: {', '.join(variants)}")
    variants = dict(variants[k] for k in variants if k in chosen)  # the first one is the baseline
    # This machine's speed drifts by 10-20% over minutes (a shared VM): the variants take turns,
    # round after round, and each keeps its best round, the one least disturbed.
    rounds: dict[str, list[dict]] = {k: [] for k in variants}
    for _ in range(args.rounds):
        for name, measure in variants.items():
            rounds[name].append(measure())
    results = {
        k: {**max(v, key=lambda r: r["tokens_per_s"]), "rounds_tokens_per_s": [r["tokens_per_s"] for r in v]}
        for k, v in rounds.items()
    }
    baseline = next(iter(results.values()))
    strategies = {s: orchestrator_run(args, s, args.workers) for s in args.strategies.split(",") if s}

    print(
        f"\nmodel: {f'llama3-{args.llama3}' if args.llama3 else f'llama hidden={args.hidden} layers={args.layers}'}, {args.quant} base, {args.dtype}, LoRA r={args.r}, "
        f"global batch {args.global_batch} x {args.seq} tokens max, {args.steps} steps ({'GPU' if args.gpu else 'CPU'})"
    )
    table(
        f"against {next(iter(results))}",
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
            {k: v for k, v in results.items() if k.startswith("orchestrator")},
            results["bare torch loop (1 process, no Ray)"],
        )
        if "bare" in chosen
        else {},
        "strategy_ratios_to_first": ratios(strategies, next(iter(strategies.values()))) if strategies else {},
    }
    dest = (
        HERE
        / "results"
        / (
            f"throughput-{device}-llama3-{args.llama3}-{args.quant}.json"
            if args.llama3
            else f"throughput-{device}.json"
        )
    )
    dest.write_text(json.dumps(record, indent=2) + "\n")
    print(f"written to {dest}")


if __name__ == "__main__":
    main()
