"""Start-up and worker memory at real data scale: `orchestrator train` on 200k alpaca rows of
about 150 tokens against the same command on 2k rows, cold (nothing cached) and warm (the cache
of an earlier run), 2 CPU workers, the tiny demo model, 3 steps; and the driver's tokenization
throughput next to `datasets.map` with the same tokenizer and chat template.

    python bench/data_scale.py                 # writes bench/results/data-scale-cpu.json
    python bench/data_scale.py --rows 20000    # a quicker look

Start-up is the wall time from the command to the first logged step (metrics.jsonl step 1 is
written at once: log_every=1). Each worker's private memory (USS, psutil) is sampled from outside
every 50 ms; "extra" is the 200k run's largest worker peak above the 2k run's. Every run has its
own ORCHESTRATOR_HOME, so "cold" really starts without a cache; "warm" reuses the cold run's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers import peak_worker_uss

HERE = Path(__file__).resolve().parent


def _env(home: Path) -> dict:
    """A fresh ORCHESTRATOR_HOME (so, no data cache), with the demo's model kept where it is."""
    from orchestrator import demo

    return {**os.environ, "ORCHESTRATOR_HOME": str(home), "ORCHESTRATOR_DEMO_DIR": str(demo.demo_dir())}


MAX_SEQ_LEN = 256
COMMAND = [
    "experiment=demo",
    "tracking=none",
    "cluster.num_workers=2",
    "trainer.max_steps=3",
    "trainer.log_every=1",
    "trainer.save_every=0",
    "data.eval_fraction=0",
    f"data.max_seq_len={MAX_SEQ_LEN}",
]


def build_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Alpaca rows of about 150 tokens of the demo tokenizer: a word list and its reverse."""
    words = "ship leaf door star bird moon tree rock fish lamp road cup king song rain".split()
    rnd = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            seq = [rnd.choice(words) for _ in range(rnd.randint(30, 45))]
            row = {"instruction": f"Reverse the order of the words ({i}).", "input": " ".join(seq)}
            f.write(json.dumps({**row, "output": " ".join(reversed(seq))}) + "\n")
    return path


def run(data: Path, out: Path, home: Path) -> dict:
    """One `orchestrator train`: seconds to its first step, in all, and each worker's peak USS."""
    env = {**_env(home), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "orchestrator", "train", *COMMAND, f"data.path={data}", f"output_dir={out}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    metrics = out / "metrics.jsonl"

    def tick() -> None:
        nonlocal first
        if first is None and metrics.is_file() and metrics.stat().st_size:
            first = time.perf_counter() - t0

    peaks = peak_worker_uss(proc, tick)["run"]
    log = proc.stdout.read()
    if proc.wait() != 0:
        raise RuntimeError(f"{cmd} failed:\n{log[-3000:]}")
    return {
        "first_step_s": round(first or time.perf_counter() - t0, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
        "worker_peak_uss_mib": sorted(round(v / 2**20) for v in peaks.values()),
    }


def validate_seconds(data: Path, home: Path, out: Path) -> float:
    """The driver's validation with a cold cache, as `train` runs it before any worker starts."""
    code = (
        "import time, json, sys\n"
        "from orchestrator.config import compose, validate\n"
        "t = time.perf_counter()\n"
        f"validate(compose({[*COMMAND, f'data.path={data}', f'output_dir={out}']!r}))\n"
        "print(json.dumps({'seconds': time.perf_counter() - t}))\n"
    )
    env = _env(home)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def tokenize_ours(large: Path, small: Path, w: Path) -> dict:
    """Tokenization alone: the cold validation of the large data less that of the small, whose
    difference is only rows read, checked, encoded and written to the cache."""
    big, little = validate_seconds(large, w / "h-tok-l", w / "o5"), validate_seconds(small, w / "h-tok-s", w / "o6")
    (cache,) = (p.parent for p in (w / "h-tok-l" / "data").glob("*/meta.json"))
    n_tokens = os.path.getsize(cache / "tokens.bin") // 4
    return {
        "seconds": round(big - little, 2),
        "tokens": n_tokens,
        "validate_s": round(big, 2),
        "num_proc": os.cpu_count(),
    }


def tokenize_datasets_map(data: Path) -> dict:
    """What a user writes with `datasets`: load the JSON, apply the chat template, tokenize."""
    import datasets
    from transformers import AutoTokenizer

    from orchestrator import demo

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(demo.ensure_demo_assets())

    def encode(batch):
        chats = [
            [{"role": "user", "content": f"{i}\n\n{x}" if x else i}, {"role": "assistant", "content": o}]
            for i, x, o in zip(batch["instruction"], batch["input"], batch["output"])
        ]
        ids = tok.apply_chat_template(chats, tokenize=True, truncation=True, max_length=MAX_SEQ_LEN)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids  # a BatchEncoding, or a plain list
        return {"input_ids": ids, "n": [len(x) for x in ids]}

    t = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", keep_in_memory=True)
    ds = ds.map(encode, batched=True, num_proc=os.cpu_count(), remove_columns=ds.column_names, keep_in_memory=True)
    seconds = time.perf_counter() - t
    return {"seconds": round(seconds, 2), "tokens": int(sum(ds["n"])), "num_proc": os.cpu_count()}


def tokenization(ours: dict, theirs: dict, rows: int, small: int) -> dict:
    """Rows/s and tokens/s of each (ours over the rows the large data has beyond the small)."""
    out = {}
    for name, r, n in [
        ("orchestrator (cache build: large less small validation)", ours, rows - small),
        ("datasets.map (load_dataset json + apply_chat_template)", theirs, rows),
    ]:
        per_row = r["tokens"] / rows
        out[name] = {**r, "rows_per_s": round(n / r["seconds"]), "tokens_per_s": round(n * per_row / r["seconds"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=2_000)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "data-scale-cpu.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        small, large = build_rows(w / "small.jsonl", args.small), build_rows(w / "large.jsonl", args.rows)
        runs = {
            # The small runs first warm the machine's page cache of the libraries for every later run.
            "small cold": run(small, w / "o1", w / "h-small"),
            "small warm": run(small, w / "o2", w / "h-small"),
            "large cold": run(large, w / "o3", w / "h-large"),
            "large warm": run(large, w / "o4", w / "h-large"),
        }
        ours = tokenize_ours(large, small, w)
        theirs = tokenize_datasets_map(large)
    uss = {k: max(v["worker_peak_uss_mib"]) for k, v in runs.items()}
    record = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "rows": {"large": args.rows, "small": args.small},
        "tokens_per_row": round(ours["tokens"] / args.rows, 1),
        "runs": runs,
        "extra_vs_small": {
            "startup_cold_s": round(runs["large cold"]["first_step_s"] - runs["small cold"]["first_step_s"], 1),
            "startup_warm_s": round(runs["large warm"]["first_step_s"] - runs["small warm"]["first_step_s"], 1),
            "worker_uss_cold_mib": uss["large cold"] - uss["small cold"],
            "worker_uss_warm_mib": uss["large warm"] - uss["small warm"],
        },
        "tokenization": tokenization(ours, theirs, args.rows, args.small),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
