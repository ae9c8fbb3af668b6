"""Cross-field and environment checks that run before any Ray worker starts.

Every check appends to one list so the user sees all problems in one message. Model-aware
checks read the model's config.json and build the module tree on the meta device: no weights
are loaded.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from orchestrator.config.schema import ZERO_STAGES, RunConfig
from orchestrator.config.typed import ConfigError


def _static(run: RunConfig) -> list[str]:
    p: list[str] = []
    a, t, d, o, c = run.adapter, run.trainer, run.data, run.optim, run.cluster

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(a.r > 0, f"adapter.r: must be a positive integer, got {a.r}")
    need(a.alpha > 0, f"adapter.alpha: must be positive, got {a.alpha}")
    need(0 <= a.dropout < 1, f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    need(bool(a.target_modules), "adapter.target_modules: must name at least one module, or 'all-linear'")
    need(t.micro_batch_size >= 1, f"trainer.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    need(t.grad_accum >= 1, f"trainer.grad_accum: must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, f"trainer.lr: must be positive, got {t.lr}")
    need(
        t.max_steps == -1 or t.max_steps >= 1, f"trainer.max_steps: must be -1 (use epochs) or >= 1, got {t.max_steps}"
    )
    need(t.epochs >= 1, f"trainer.epochs: must be >= 1, got {t.epochs}")
    need(t.log_every >= 1, f"trainer.log_every: must be >= 1, got {t.log_every}")
    for f in ("save_every", "eval_every", "keep_last"):
        need(getattr(t, f) >= 0, f"trainer.{f}: must be >= 0, got {getattr(t, f)}")
    need(d.max_seq_len >= 8, f"data.max_seq_len: must be >= 8, got {d.max_seq_len}")
    need(0 <= d.eval_fraction < 1, f"data.eval_fraction: must be in [0, 1), got {d.eval_fraction}")
    need(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas: must be two numbers in [0, 1), got {o.betas}",
    )
    need(o.eps > 0, f"optim.eps: must be positive, got {o.eps}")
    need(0 <= o.warmup_ratio < 1, f"optim.warmup_ratio: must be in [0, 1), got {o.warmup_ratio}")
    need(o.max_grad_norm >= 0, f"optim.max_grad_norm: must be >= 0 (0 disables clipping), got {o.max_grad_norm}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(c.num_workers >= 1, f"cluster.num_workers: must be >= 1, got {c.num_workers}")
    need(c.cpus_per_worker > 0, f"cluster.cpus_per_worker: must be positive, got {c.cpus_per_worker}")
    need(c.max_failures >= 0, f"cluster.max_failures: must be >= 0, got {c.max_failures}")
    need(
        run.strategy.name != "single" or c.num_workers == 1,
        f"strategy=single runs one process but cluster.num_workers={c.num_workers}; "
        "set cluster.num_workers=1, or use strategy=fsdp or strategy=ddp for several workers",
    )
    p.extend(_cluster_static(run))
    if run.resume not in ("auto", "never"):
        from orchestrator.checkpoint import is_committed

        if not is_committed(Path(run.resume)):
            p.append(
                f"resume: {run.resume} is not a committed checkpoint (a step-<N> directory with a COMMITTED marker); "
                "valid: auto, never, or such a directory"
            )
    q, name = run.quant, run.strategy.name
    if q.kind == "nf4" and q.storage_dtype not in (None, run.model.dtype) and name in SHARDS_BASE:
        p.append(
            f"quant.storage_dtype={q.storage_dtype} with model.dtype={run.model.dtype} under strategy={name}: "
            f"{SHARDS_BASE[name]}; set quant.storage_dtype=null (same as model.dtype)"
        )
    p += _deepspeed_static(run)
    if run.model.dtype == "fp16" and not c.use_gpu:
        p.append("model.dtype=fp16: half precision is not supported for CPU training; use fp32 or bf16")
    return p


# The DeepSpeed strategies, from the one table of ZeRO stages (schema.ZERO_STAGES).
DEEPSPEED = tuple(ZERO_STAGES)
_DEEPSPEED_LIST = ", ".join(DEEPSPEED[:-1]) + " or " + DEEPSPEED[-1]
# Why each strategy that touches the base's storage needs the packed NF4 weights in model.dtype.
_DS_CAST = (
    "DeepSpeed casts the whole module to the training precision, which would reinterpret the packed 4-bit weights"
)
SHARDS_BASE = {
    "fsdp": "FSDP flattens each layer's parameters into one buffer of one dtype",
    **{name: _DS_CAST for name in DEEPSPEED},
}


def _cluster_static(run: RunConfig) -> list[str]:
    c, s, p = run.cluster, run.cluster.slurm, []
    if c.kind != "local":
        if not run.storage_path:
            p.append(
                f"storage_path: required for cluster={c.kind}: a directory every node of the cluster sees "
                "(shared filesystem); the run is kept in <storage_path>/<name>"
            )
        if not run.name:
            p.append(
                f"name: required for cluster={c.kind}: the run is kept in <storage_path>/<name>; "
                "submitting the same name again continues that run, a new run needs a new name"
            )
    if run.storage_path and "://" in run.storage_path:
        p.append(
            f"storage_path: {run.storage_path} is a URI; checkpoints are committed with POSIX renames, so give "
            "a shared filesystem path (mount a bucket with its FUSE driver to use object storage)"
        )
    for field in ("name", "storage_path"):
        if any(ord(ch) < 32 for ch in getattr(run, field) or ""):
            p.append(
                f"{field}: {getattr(run, field)!r} contains control characters (newlines); they cannot name a directory or a job"
            )
    if run.name and (run.name.startswith(("/", ".")) or ".." in run.name.split("/")):
        p.append(f"name: {run.name!r} must be a relative name (letters, digits, -, _, and / for groups), not a path")
    bad_env = [k for k in [*c.env, *c.secret_env] if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k)]
    if bad_env:
        p.append(
            f"cluster.env / cluster.secret_env: {', '.join(map(repr, bad_env))} are not environment variable names"
        )
    leaked = sorted(set(c.env) & set(c.secret_env))
    if leaked:
        p.append(
            f"cluster.env: {', '.join(leaked)} are secrets (cluster.secret_env); export them in your shell "
            "instead, so they travel in the environment only and are never written to a file"
        )
    if c.kind == "slurm":
        if s.nodes < 1 or c.num_workers % s.nodes:
            p.append(
                f"cluster.slurm.nodes={s.nodes} must be >= 1 and divide cluster.num_workers={c.num_workers} "
                "(one Ray node per Slurm node, the same number of workers on each)"
            )
        elif c.use_gpu and s.gpus_per_node < c.num_workers // s.nodes:
            p.append(
                f"cluster.slurm.gpus_per_node={s.gpus_per_node} is fewer than the {c.num_workers // s.nodes} "
                "workers per node, each of which needs a GPU"
            )
        if s.signal_grace_s < 0:
            p.append(f"cluster.slurm.signal_grace_s: must be >= 0, got {s.signal_grace_s}")
        if not re.fullmatch(r"(\d+-)?\d{1,2}(:\d{2}){0,2}|\d+", s.time):
            p.append(f"cluster.slurm.time: {s.time!r} is not a Slurm time (MM, HH:MM:SS or D-HH:MM:SS)")
        bad = [x for x in s.extra_sbatch if not x.startswith("-")]
        if bad:
            p.append(
                f"cluster.slurm.extra_sbatch: {bad} must be sbatch options such as --exclusive or --reservation=name"
            )
    return p


def _deepspeed_static(run: RunConfig) -> list[str]:
    s = run.strategy
    p: list[str] = []
    if s.name not in DEEPSPEED:
        if s.offload:
            p.append(
                f"strategy.offload=true with strategy={s.name}: CPU offload is a DeepSpeed option; "
                f"use one of strategy={_DEEPSPEED_LIST} with strategy.offload=true"
            )
        if s.ds_config:
            p.append(
                f"strategy.ds_config={s.ds_config} with strategy={s.name}: a DeepSpeed JSON only applies to "
                f"strategy={_DEEPSPEED_LIST}; remove strategy.ds_config or pick one of those"
            )
        return p
    if s.name == "zero3_offload" and not s.offload:
        p.append("strategy=zero3_offload with strategy.offload=false: contradictory; use strategy=zero3 for no offload")
    for f in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size"):
        if getattr(s, f) < 1:
            p.append(f"strategy.{f}: must be >= 1 element, got {getattr(s, f)}")
    if s.param_persistence_threshold < 0:
        p.append(f"strategy.param_persistence_threshold: must be >= 0, got {s.param_persistence_threshold}")
    if run.model.dtype == "fp16":
        p.append(
            f"model.dtype=fp16 under strategy={s.name}: fp16 needs DeepSpeed's dynamic loss scaling, whose skipped "
            "steps the loop does not account for; use model.dtype=bf16"
        )
    return p


def _deepspeed_json(run: RunConfig) -> list[str]:
    """The user DeepSpeed JSON exists, parses and does not contradict the run (needs the file)."""
    s = run.strategy
    if s.name not in DEEPSPEED or not s.ds_config:
        return []
    if not Path(s.ds_config).is_file():
        return [f"strategy.ds_config: {s.ds_config} does not exist"]
    from orchestrator.strategies.deepspeed import build_ds_config

    t = run.trainer
    try:
        build_ds_config(
            s,
            micro_batch_size=t.micro_batch_size,
            grad_accum=t.grad_accum,
            max_grad_norm=run.optim.max_grad_norm,
            dtype=run.model.dtype,
            world_size=run.cluster.num_workers,
        )
    except ValueError as e:
        return [str(e)]
    return []


def _model(run: RunConfig) -> list[str]:
    path = Path(run.model.path)
    if not (path / "config.json").is_file():
        return [f"model.path: {path} is not a Hugging Face model directory (no config.json)"]
    from orchestrator.adapters import unmatched_targets
    from orchestrator.model import load_model_config, module_names

    p = []
    try:
        mcfg = load_model_config(run.model)
    except Exception as e:  # noqa: BLE001 - any reason the config cannot load is reported as is
        return [f"model.path: cannot read {path / 'config.json'}: {e}"]
    ctx = getattr(mcfg, "max_position_embeddings", None)
    if ctx and run.data.max_seq_len > ctx:
        p.append(f"data.max_seq_len: {run.data.max_seq_len} exceeds the model's context of {ctx} tokens ({path})")
    try:
        names = module_names(mcfg, run.model)
    except Exception as e:  # noqa: BLE001
        return p + [f"model.path: {path} is not a causal language model transformers can build: {e}"]
    bad = unmatched_targets(run.adapter.target_modules, names)
    if bad:
        linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind == "Linear"})
        p.append(
            f"adapter.target_modules: {', '.join(bad)} match no module of {mcfg.model_type}; "
            f"linear modules there: {', '.join(linear)} (or use all-linear)"
        )
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        p.append(f"model.path: {path} has no tokenizer files (tokenizer.json or tokenizer_config.json)")
    return p


def _data(run: RunConfig) -> list[str]:
    from orchestrator.data.formats import DataError, read_rows

    p = []
    n_rows = None
    for field, path in (("data.path", run.data.path), ("data.eval_path", run.data.eval_path)):
        if path is None:
            continue
        try:
            rows = read_rows(path, run.data.format)
        except DataError as e:
            p.extend(f"{field}: {x}" for x in e.problems)
            continue
        if field == "data.path":
            n_rows = len(rows)
    if n_rows is not None:
        n_train = n_rows if run.data.eval_path else n_rows - int(n_rows * run.data.eval_fraction)
        if n_train < run.global_batch():
            p.append(
                f"data.path: {n_train} training rows are fewer than one global batch of {run.global_batch()} "
                "(micro_batch_size * grad_accum * num_workers); lower the batch or add data"
            )
    return p


def _resources(run: RunConfig) -> list[str]:
    c = run.cluster
    if c.address is not None:
        return []  # checked against the live cluster at submission
    p = []
    if c.use_gpu:
        import torch

        have = torch.cuda.device_count()
        if have < c.num_workers:
            p.append(f"cluster.num_workers={c.num_workers} with use_gpu=true, but this machine has {have} GPU(s)")
    else:
        cpus = os.cpu_count() or 1
        if c.num_workers * c.cpus_per_worker > cpus:
            p.append(
                f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs "
                f"{c.num_workers * c.cpus_per_worker:g} CPUs but this machine has {cpus}"
            )
    out = Path(run.output_dir)
    probe = next((q for q in [out, *out.parents] if q.exists()), None)
    if probe is None or not os.access(probe, os.W_OK):
        p.append(f"output_dir: {out} cannot be created ({probe} is not writable)")
    else:
        import shutil

        need, free = _checkpoint_bytes(run), shutil.disk_usage(probe).free
        if free < need:
            p.append(
                f"output_dir: {probe} has {_human(free)} free but the run's checkpoints need about "
                f"{_human(need)}; free space, lower trainer.keep_last, or choose another output_dir"
            )
    return p


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _checkpoint_bytes(run: RunConfig) -> int:
    """Rough disk need: per kept checkpoint the fp32 adapter, its optimizer state (two fp32 moments)
    and a margin, for the final adapter plus keep_last (or every) step checkpoint."""
    from orchestrator.model import load_model_config

    try:
        cfg = load_model_config(run.model)
    except Exception:  # noqa: BLE001 - reported by the model checks
        return 0
    h = getattr(cfg, "hidden_size", 0)
    inter = getattr(cfg, "intermediate_size", 4 * h)
    layers = getattr(cfg, "num_hidden_layers", 0)
    per_layer = run.adapter.r * (4 * 2 * h + 3 * (h + inter))  # upper bound: q,k,v,o and the MLP
    adapter = per_layer * layers * 4
    t = run.trainer
    step_checkpoints = 0
    if t.save_every:
        step_checkpoints = t.keep_last or max(1, t.max_steps // t.save_every)
    return int(adapter * 3 * (1 + step_checkpoints) * 1.2)


def validate(run: RunConfig, environment: bool = True, on_cluster: bool = False) -> RunConfig:
    """Raise ConfigError with every problem, or return the config unchanged.

    environment=False skips checks that need the model, the data and the machine (used to
    validate configs meant for another cluster). on_cluster: this is a cluster job's driver,
    whose resources the driver checks against the live cluster instead of this machine.
    """
    problems = _static(run)
    if environment:
        here = run.cluster.kind == "local"
        # A job for a cluster may name paths that exist only there: those are checked on the
        # cluster by `orchestrator run` before any worker starts.
        if here or on_cluster or Path(run.model.path).exists():
            problems += _model(run)
        if here or on_cluster or Path(run.data.path).exists():
            problems += _data(run)
        problems += (_resources(run) if here else []) + _deepspeed_json(run)
    if problems:
        raise ConfigError(problems)
    return run
