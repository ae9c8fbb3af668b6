"""Cross-field and environment checks that run before any Ray worker starts.

Every check appends to one list so the user sees all problems in one message. Model-aware
checks read the model's config.json and build the module tree on the meta device: no weights
are loaded.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from orchestrator.config.schema import ZERO_STAGES, RunConfig, as_dict, flatten
from orchestrator.config.typed import ConfigError

log = logging.getLogger("orchestrator")

# Fields that name files or directories, checked for a shape the filesystem can take before any
# check looks them up (a NUL byte or a 300-character component makes every lookup raise).
PATH_FIELDS = ("model.path", "data.path", "data.eval_path", "output_dir", "storage_path", "strategy.ds_config")
NAME_MAX, PATH_MAX = 255, 4096


def _get(run: RunConfig, dotted: str) -> Any:
    value: Any = run
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def path_problem(field: str, value: str | None) -> str | None:
    """Why `value` cannot name a file at all (None: it can, whether or not it exists)."""
    if value is None:
        return None
    if not value.strip():
        return f"{field}: is empty; give a path"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return f"{field}: {value!r} contains control characters (a newline, a NUL byte); they cannot name a file"
    try:
        encoded = os.fsencode(value)
    except UnicodeError:
        return f"{field}: {value!r} cannot be encoded as a file name on this system"
    if len(encoded) > PATH_MAX or any(len(part) > NAME_MAX for part in encoded.split(b"/")):
        return (
            f"{field}: {value[:80]!r}... is too long to name a file ({len(encoded)} bytes; at most {NAME_MAX} "
            f"per component and {PATH_MAX} in all)"
        )
    return None


def _bad_paths(run: RunConfig) -> dict[str, str]:
    """{field: problem} of the path fields that cannot name a file."""
    found = {f: path_problem(f, _get(run, f)) for f in PATH_FIELDS}
    if run.storage_path and run.name and found["output_dir"]:
        # output_dir is <storage_path>/<name>: named by the part that makes it bad
        found["output_dir"] = (
            found["storage_path"]
            or path_problem("name", run.name)
            or found["output_dir"].replace("output_dir:", "storage_path (with name):", 1)
        )
    if run.resume not in ("auto", "never"):
        found["resume"] = path_problem("resume", run.resume)
    return {f: msg for f, msg in found.items() if msg}


INT_LIMIT = 2**63  # what torch, Ray and the C libraries underneath take


def _unrepresentable(run: RunConfig) -> dict[str, str]:
    """{field: problem} of the numbers no check can compare sensibly: nan or +-inf, which pass every
    comparison or none, and integers beyond 64 bits, which fail deep inside torch or Ray."""
    found = {}
    for key, value in flatten(as_dict(run)).items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            found[key] = f"{key}: must be a finite number, got {value}"
        elif any(isinstance(v, int) and not isinstance(v, bool) and abs(v) >= INT_LIMIT for v in values):
            found[key] = f"{key}: {value} is out of range (a 64-bit integer, below 2**63)"
    for key in ("trainer.seed", "adapter.init_seed"):
        if key not in found and _get(run, key) < 0:
            found[key] = f"{key}: must be >= 0, got {_get(run, key)}"
    return found


def static_problems(run: RunConfig) -> list[str]:
    """Checks of the config alone (validate() makes them first): milliseconds, no model, data or
    machine looked at. A field that is non-finite or cannot name a path is reported once, for that
    reason only."""
    own = {**_unrepresentable(run), **_bad_paths(run)}
    return list(dict.fromkeys(own.values())) + [
        x
        for x in _static_checks(run, skip_resume="resume" in own)
        if not any(x.startswith(f"{k}:") or x.startswith(f"{k}=") for k in own)
    ]


def _static_checks(run: RunConfig, skip_resume: bool = False) -> list[str]:
    p: list[str] = []
    a, t, d, o, c = run.adapter, run.trainer, run.data, run.optim, run.cluster

    def need(cond: bool, msg: str) -> None:
        if not cond:
            p.append(msg)

    need(a.r > 0, f"adapter.r: must be a positive integer, got {a.r}")
    need(a.alpha > 0, f"adapter.alpha: must be positive, got {a.alpha}")
    need(0 <= a.dropout < 1, f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    need(bool(a.target_modules), "adapter.target_modules: must name at least one module, or 'all-linear'")
    if isinstance(a.target_modules, str) and a.target_modules != "all-linear":
        try:
            re.compile(a.target_modules)
        except re.error as e:
            p.append(
                f"adapter.target_modules: {a.target_modules!r} is not a regular expression ({e}); PEFT reads "
                "a single string as one, a list as module names"
            )
    need(t.micro_batch_size >= 1, f"trainer.micro_batch_size: must be >= 1, got {t.micro_batch_size}")
    need(t.grad_accum >= 1, f"trainer.grad_accum: must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, f"trainer.lr: must be positive, got {t.lr}")
    need(
        t.max_steps == -1 or t.max_steps >= 1, f"trainer.max_steps: must be -1 (use epochs) or >= 1, got {t.max_steps}"
    )
    need(t.epochs >= 1, f"trainer.epochs: must be >= 1, got {t.epochs}")
    need(t.log_every >= 1, f"trainer.log_every: must be >= 1, got {t.log_every}")
    need(t.sync_every_s >= 0, f"trainer.sync_every_s: must be >= 0 seconds (0: after every step), got {t.sync_every_s}")
    need(
        not t.compile or run.strategy.name not in ZERO_STAGES,
        f"trainer.compile: not supported with strategy={run.strategy.name} (DeepSpeed's hooks around each layer); "
        "use strategy=single, ddp or fsdp, or trainer.compile=false",
    )
    need(
        t.loss_chunk_tokens >= 0,
        f"trainer.loss_chunk_tokens: must be >= 0 (0: full logits), got {t.loss_chunk_tokens}",
    )
    need(
        t.peak_tflops is None or t.peak_tflops > 0,
        f"trainer.peak_tflops: must be positive (TFLOP/s of one device) or null to look it up, got {t.peak_tflops}",
    )
    if t.device_memory is not None:
        from orchestrator.plan import parse_bytes

        try:
            parse_bytes(t.device_memory)
        except ValueError as e:
            p.append(f"trainer.device_memory: {e}; or null for this node's GPU or host memory per worker")
    for f in ("save_every", "eval_every", "keep_last"):
        need(getattr(t, f) >= 0, f"trainer.{f}: must be >= 0, got {getattr(t, f)}")
    need(d.max_seq_len >= 8, f"data.max_seq_len: must be >= 8, got {d.max_seq_len}")
    p.extend(_data_static(run))
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
    need(
        c.cpus_per_worker is None or c.cpus_per_worker > 0,
        f"cluster.cpus_per_worker: must be positive, or null for the default, got {c.cpus_per_worker}",
    )
    need(c.max_failures >= 0, f"cluster.max_failures: must be >= 0, got {c.max_failures}")
    need(
        run.strategy.name != "single" or c.num_workers == 1,
        f"strategy=single runs one process but cluster.num_workers={c.num_workers}; "
        "set cluster.num_workers=1, or use strategy=fsdp or strategy=ddp for several workers",
    )
    p.extend(_cluster_static(run))
    if run.resume not in ("auto", "never") and not skip_resume:
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


def _data_static(run: RunConfig) -> list[str]:
    from orchestrator.data.formats import FORMAT_FIELDS

    d, p = run.data, []
    if d.path is None and not d.mix:
        p.append(
            "data.path: is required but not set; give a JSONL, JSON, Parquet, CSV or Arrow file, a directory or glob "
            "of them, a save_to_disk directory or a hub dataset name, or several datasets as data.mix"
        )
    if d.path is not None and d.mix:
        p.append(
            "data.path and data.mix: give one of them (data.mix lists every dataset of a mixture, with its weight)"
        )
    for field, fmt, columns in [("data.columns", d.format, d.columns)] + [
        (f"data.mix[{i}].columns", m.format or d.format, m.columns) for i, m in enumerate(d.mix)
    ]:
        unknown = sorted(set(columns or {}) - set(FORMAT_FIELDS[fmt]))
        if unknown:
            p.append(
                f"{field}: {', '.join(unknown)} {'is not a field' if len(unknown) == 1 else 'are not fields'} of "
                f"data.format={fmt}; it maps {', '.join(FORMAT_FIELDS[fmt])} to the dataset's own names"
            )
        bad = sorted(k for k, v in (columns or {}).items() if not isinstance(v, str) or not v)
        if bad:
            p.append(f"{field}: {', '.join(bad)} must map to a column name, a non-empty string")
    for i, m in enumerate(d.mix):
        if not m.weight > 0:
            p.append(f"data.mix[{i}].weight: must be positive (times each row is used per epoch), got {m.weight}")
        if msg := path_problem(f"data.mix[{i}].path", m.path):
            p.append(msg)
    if d.num_proc is not None and d.num_proc < 1:
        p.append(f"data.num_proc: must be >= 1, or null for the machine's cores, got {d.num_proc}")
    if d.cache_dir is not None and (msg := path_problem("data.cache_dir", d.cache_dir)):
        p.append(msg)
    return p


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
    if any(ord(ch) < 32 for ch in run.name or ""):
        p.append(f"name: {run.name!r} contains control characters (newlines); they cannot name a directory or a job")
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
    if not s.shard_optimizer:
        p.append(
            f"strategy.shard_optimizer=false with strategy={s.name}: DeepSpeed always partitions the optimizer state; "
            "drop the override, or use strategy=ddp or strategy=fsdp to keep it whole on every worker"
        )
    for f in ("reduce_bucket_size", "allgather_bucket_size", "prefetch_bucket_size", "max_live_parameters"):
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


def _model_dir(run: RunConfig) -> Path | None:
    """model.path as a directory here (a hub id through the local cache), or None."""
    from orchestrator.model import resolve_model_path

    try:
        path = resolve_model_path(run.model.path)
    except FileNotFoundError:
        return None
    return path if path.exists() else None


def _cluster_cache_here(run: RunConfig) -> bool:
    """Whether a cluster run's data cache is on storage this machine can write: storage_path (or
    data.cache_dir, or its parent) is a writable directory here."""
    if run.data.cache_dir:
        have = next((q for q in (Path(run.data.cache_dir), Path(run.data.cache_dir).parent) if q.is_dir()), None)
    else:
        have = Path(run.storage_path) if run.storage_path and Path(run.storage_path).is_dir() else None
    return have is not None and os.access(have, os.W_OK)


def _data_here(run: RunConfig) -> bool:
    """Whether some of the data a cluster job names can be read from this machine."""
    import glob

    paths = [s.spec.path for s in _sources(run)]
    return any(Path(x).exists() or glob.has_magic(x) and glob.glob(x) for x in paths)


def _model(run: RunConfig) -> tuple[list[str], Any]:
    """(problems, the tokenizer or None): config, architecture, adapter targets, weight files and
    tokenizer of model.path."""
    from orchestrator.model import resolve_model_path

    try:
        path = resolve_model_path(run.model.path)
    except FileNotFoundError as e:
        return [f"model.path: {e}"], None
    if path.is_file():
        return [
            f"model.path: {path} is a file; expected a Hugging Face model directory (config.json, weights, tokenizer)"
        ], None
    if not (path / "config.json").is_file():
        return [f"model.path: {path} is not a Hugging Face model directory (no config.json)"], None
    from orchestrator.adapters import unmatched_targets
    from orchestrator.model import load_model_config, module_names
    from orchestrator.weights import model_weight_problems

    p = [f"model.path: {x}" for x in model_weight_problems(path)]
    try:
        mcfg = load_model_config(run.model)
    except Exception as e:  # noqa: BLE001 - any reason the config cannot load is reported as is
        # (AutoTokenizer reads config.json too: its failure would only repeat this one.)
        return p + [f"model.path: cannot read {path / 'config.json'}: {_first_line(e)}"], None
    tokenizer, problems = _tokenizer(run)
    p += problems
    ctx = getattr(mcfg, "max_position_embeddings", None)
    if ctx and run.data.max_seq_len > ctx:
        p.append(f"data.max_seq_len: {run.data.max_seq_len} exceeds the model's context of {ctx} tokens ({path})")
    widest = max((getattr(mcfg, a, 0) or 0 for a in ("hidden_size", "intermediate_size")), default=0)
    if isinstance(widest, int) and widest and run.adapter.r > widest:
        p.append(
            f"adapter.r: {run.adapter.r} exceeds the width of the model's widest layer ({widest}, {path}); "
            "a LoRA rank above a layer's width adds nothing but memory"
        )
    from orchestrator.data import packing

    if run.data.packing and not packing.supported(path):
        p.append(
            f"data.packing: true, but transformers' {mcfg.model_type} does not read packed rows from position "
            "ids (its attention would cross examples); set data.packing=false"
        )
    try:
        names = module_names(mcfg, run.model)
    except Exception as e:  # noqa: BLE001
        return p + [
            f"model.path: {path} is not a causal language model transformers can build: {_first_line(e)}"
        ], tokenizer
    try:
        bad = unmatched_targets(run.adapter.target_modules, names)
    except re.error:
        bad = []  # reported by the static checks
    if bad:
        linear = sorted({n.rsplit(".", 1)[-1] for n, kind in names.items() if kind == "Linear"})
        p.append(
            f"adapter.target_modules: {', '.join(bad)} match no module of {mcfg.model_type}; "
            f"linear modules there: {', '.join(linear)} (or use all-linear)"
        )
    return p, tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# Tokenizers loaded by validation, by directory and the state of its files: a sweep or a test
# validating many runs of one model loads it once.
_TOKENIZERS: dict[tuple, Any] = {}


def _tokenizer(run: RunConfig) -> tuple[Any, list[str]]:
    """(tokenizer, []) as the workers will load it, or (None, [why it cannot be loaded, naming the file])."""
    import json

    from orchestrator.model import TOKENIZER_FILES, load_tokenizer, resolve_model_path

    path = resolve_model_path(run.model.path)
    present = [f for f in TOKENIZER_FILES if (path / f).is_file()]
    if not any(f in present for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None, [f"model.path: {path} has no tokenizer files (tokenizer.json or tokenizer_config.json)"]
    stats = tuple((f, (path / f).stat().st_mtime_ns, (path / f).stat().st_size) for f in present)
    key = (str(path.resolve()), run.model.trust_remote_code, stats)
    if key in _TOKENIZERS:
        return _TOKENIZERS[key], []
    try:
        tokenizer = load_tokenizer(run.model)
    except Exception as e:  # noqa: BLE001 - reported with what is wrong in the directory
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if name in present:
                try:
                    json.loads((path / name).read_text(encoding="utf-8"))
                except (OSError, UnicodeDecodeError, ValueError, RecursionError) as bad:
                    return None, [
                        f"model.path: {path / name} is garbled or truncated (not JSON: {bad}); "
                        "copy or download it again"
                    ]
        missing = "" if "tokenizer.json" in present else f"; {path / 'tokenizer.json'} is missing"
        return None, [f"model.path: the tokenizer in {path} cannot be loaded{missing} ({_first_line(e)})"]
    if isinstance(getattr(tokenizer, "deprecation_warnings", None), dict):
        # Rows are truncated to max_seq_len: "longer than the specified maximum" says nothing here.
        tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    if len(_TOKENIZERS) >= 4:
        _TOKENIZERS.clear()
    _TOKENIZERS[key] = tokenizer
    return tokenizer, []


SHOWN = 3  # lines named per kind of finding


def _data(run: RunConfig, tokenizer: Any = None, commit: bool = True) -> list[str]:
    """Every source read once: without a tokenizer its rows are only checked; with one, this is
    the tokenize-once pass (orchestrator/data/cache.py), which encodes every row as the workers
    will see it, names those it cannot, counts those truncation leaves without a target, and
    commits the cache the workers then memory-map (commit=False: nothing is written)."""
    d = run.data
    p: list[str] = []
    max_len = d.max_seq_len
    count = tokenizer is not None and max_len >= 8  # a smaller one is reported on its own
    chat = {s.spec.format for s in _sources(run)} & {"chat", "sharegpt"}
    if count and chat and not getattr(tokenizer, "chat_template", None):
        p.append(
            f"data.format={sorted(chat)[0]}: the tokenizer in model.path={run.model.path} has no chat template "
            "(chat_template.jinja or tokenizer_config.json's chat_template) to render the messages with"
        )
        count = False
    if not count:
        return p + _check_rows(run)
    from orchestrator.data import packing
    from orchestrator.data.dataset import packed_train_rows, prepare, train_rows
    from orchestrator.data.formats import MAX_REPORTED

    sizes, eval_given = [], run.data.eval_path is not None
    prepared = prepare(run, tokenizer, commit=commit)
    for prep in prepared:
        field, path = prep.source.field, prep.source.spec.path
        if prep.error is not None:
            p.extend(f"{field}: {x}" for x in prep.error.problems)
            continue
        r = prep.report
        problems_before = len(p)
        if r.bad and d.on_bad_row == "error":
            p.extend(f"{field}: {x}" for x in r.bad_first)
            if r.bad > len(r.bad_first):
                p.append(f"{field}: {path}: ... and {r.bad - len(r.bad_first)} more bad rows ({r.bad} in all)")
        whose = f"the tokenizer in model.path={run.model.path}" + (
            " (its chat template)" if r.spec.format in chat else ""
        )
        failed = sum(r.failed_count.values())
        if failed and d.on_bad_row == "error":
            for why, wheres in list(r.failed.items())[:MAX_REPORTED]:
                more = r.failed_count[why] - 1
                also = (
                    f" (the same for {more} more rows: "
                    + ", ".join(wheres[1 : 1 + SHOWN])
                    + (", ...)" if more > SHOWN else ")")
                    if more
                    else ""
                )
                p.append(f"{field}: {wheres[0]}: cannot be tokenized with {whose}: {why}{also}")
        skipped = (r.bad + failed) if d.on_bad_row == "skip" else 0
        if skipped:
            first = (
                r.bad_first[:SHOWN]
                + [f"{w[0]}: cannot be tokenized: {why}" for why, w in r.failed.items()][
                    : max(0, SHOWN - len(r.bad_first))
                ]
            )
            log.warning(
                "data.on_bad_row=skip: skipped %d of %d rows of %s (%s) that are not %s rows or cannot be tokenized; "
                "the first: %s",
                skipped,
                skipped + r.rows,
                field,
                path,
                r.spec.format,
                "; ".join(first),
            )
            if not r.rows:
                p.append(
                    f"{field}: {path}: no row is left after data.on_bad_row=skip left out all {skipped} rows "
                    f"(e.g. {first[0]}); check data.format={r.spec.format} and data.columns"
                )
                continue
        if len(p) > problems_before:
            continue
        examples = ", ".join(r.targetless_first) + (", ..." if r.targetless > len(r.targetless_first) else "")
        if r.targetless and r.targetless == r.rows:
            p.append(
                f"data.max_seq_len={max_len} leaves all {r.rows} rows of {field} ({path}) without a target token: "
                f"the prompt fills the first {max_len} tokens of every row, so truncation cuts every response "
                f"away (e.g. {r.targetless_first[0]}); raise data.max_seq_len or shorten the prompts"
            )
        elif r.targetless:
            log.warning(
                "data.max_seq_len=%d leaves %d of %d rows of %s (%s) without a target token: their "
                "responses are cut away and they carry no loss (%s); raise data.max_seq_len to train on them",
                max_len,
                r.targetless,
                r.rows,
                field,
                path,
                examples,
            )
        if field != "data.eval_path":
            sizes.append(r.rows)
    if packing.enabled(run) and all(x.cache is not None for x in prepared):
        return p + _batch_check(run, sizes, eval_given, lambda *_: len(packed_train_rows(run, prepared)), "packed rows")
    return p + _batch_check(run, sizes, eval_given, train_rows)


def _sources(run: RunConfig) -> list:
    from orchestrator.data.dataset import eval_source, train_sources

    return [*train_sources(run), *filter(None, [eval_source(run)])]


def _check_rows(run: RunConfig) -> list[str]:
    """Without a tokenizer: every source's rows checked against its format, nothing encoded."""
    from orchestrator.data.dataset import train_rows
    from orchestrator.data.formats import DataError, row_byte_cap
    from orchestrator.data.sources import BadRows, read_source

    d, p, sizes = run.data, [], []
    cap = row_byte_cap(min(max(d.max_seq_len, 0), 1 << 24))
    for s in _sources(run):
        bad = BadRows()
        try:
            n = sum(1 for _ in read_source(s.spec, cap, bad))
        except DataError as e:
            p.extend(f"{s.field}: {x}" for x in e.problems)
            continue
        if bad.count and d.on_bad_row == "error":
            p.extend(f"{s.field}: {x}" for x in bad.first)
            if bad.count > len(bad.first):
                p.append(
                    f"{s.field}: {s.spec.path}: ... and {bad.count - len(bad.first)} more bad rows ({bad.count} in all)"
                )
        elif s.field != "data.eval_path":
            sizes.append(n)
    return p + _batch_check(run, sizes, d.eval_path is not None, train_rows)


def _batch_check(
    run: RunConfig, sizes: list[int], eval_given: bool, train_rows: Any, unit: str = "training rows"
) -> list[str]:
    d, t, c = run.data, run.trainer, run.cluster
    sane = 0 <= d.eval_fraction < 1 and min(t.micro_batch_size, t.grad_accum, c.num_workers) >= 1  # else reported alone
    n_sources = len(d.mix) if d.mix else 1
    if len(sizes) != n_sources or not sane:
        return []
    n_train = train_rows(run, sizes, eval_given)
    if n_train < run.global_batch():
        field = "data.mix" if d.mix else "data.path"
        return [
            f"{field}: {n_train} {unit} are fewer than one global batch of {run.global_batch()} "
            f"(trainer.micro_batch_size={t.micro_batch_size} * trainer.grad_accum={t.grad_accum} * "
            f"cluster.num_workers={c.num_workers}); lower the batch or add data"
        ]
    return []


def _output_dir(run: RunConfig) -> list[str]:
    """output_dir is a directory, or can be made one: no part of it is a file."""
    out, field = Path(run.output_dir), _run_dir_field(run)
    probe = next((q for q in [out, *out.parents] if q.exists()), None)
    if probe is None or probe.is_dir():
        return []
    if probe == out:
        return [f"{field}: {out} is a file, not a directory; choose a directory for the run"]
    return [f"{field}: {out} cannot be created: {probe} is a file, not a directory"]


def _run_dir_field(run: RunConfig) -> str:
    """The field the run directory comes from: output_dir, or storage_path (<storage_path>/<name>)."""
    return "storage_path" if run.storage_path and run.name else "output_dir"


def _resources(run: RunConfig, output_dir: bool = True) -> list[str]:
    c = run.cluster
    if c.address is not None:
        return []  # checked against the live cluster at submission
    p = []
    if c.use_gpu:
        import torch

        have = torch.cuda.device_count()
        if have < c.num_workers:
            p.append(
                f"cluster.num_workers={c.num_workers} with cluster.use_gpu=true, but this machine has {have} GPU(s)"
            )
    else:
        cpus = os.cpu_count() or 1
        if c.num_workers * c.cpus_per_worker > cpus:
            p.append(
                f"cluster.num_workers={c.num_workers} x cluster.cpus_per_worker={c.cpus_per_worker} needs "
                f"{c.num_workers * c.cpus_per_worker:g} CPUs but this machine has {cpus}"
            )
    if not output_dir:
        return p
    out = Path(run.output_dir)
    probe = next((q for q in [out, *out.parents] if q.exists()), None)
    if probe is not None and not probe.is_dir():
        pass  # reported by _output_dir
    elif probe is None or not os.access(probe, os.W_OK):
        p.append(f"{_run_dir_field(run)}: {out} cannot be created ({probe} is not writable)")
    else:
        import shutil

        t = run.trainer
        need, free = _checkpoint_bytes(run), shutil.disk_usage(probe).free
        if free < need:
            p.append(
                f"{_run_dir_field(run)}: {probe} has {_human(free)} free but the run's checkpoints need about "
                f"{_human(need)} (adapter.r={run.adapter.r}, trainer.max_steps={t.max_steps}, "
                f"trainer.save_every={t.save_every}, trainer.keep_last={t.keep_last}); free space, lower "
                "trainer.keep_last, or choose another output_dir"
            )
    return p


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def _checkpoint_bytes(run: RunConfig) -> int:
    """Rough disk need: per kept checkpoint the fp32 adapter, its optimizer state (two fp32 moments)
    and a margin, for the final adapter plus keep_last (or every) step checkpoint."""
    from orchestrator.model import load_model_config

    if (
        path_problem("model.path", run.model.path)
        or not ((_model_dir(run) or Path("/nonexistent")) / "config.json").is_file()
    ):
        return 0  # reported by the model checks
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
    problems = static_problems(run)
    if environment:
        here = run.cluster.kind == "local"
        bad = _bad_paths(run)  # reported by static_problems; nothing can be looked up there
        # A job for a cluster may name paths that exist only there: those are checked on the
        # cluster by `orchestrator run` before any worker starts.
        tokenizer = None
        if "model.path" not in bad and (here or on_cluster or _model_dir(run) is not None):
            model_problems, tokenizer = _model(run)
            problems += model_problems
        data_at = len(problems)
        rest = []
        if "output_dir" not in bad and (here or on_cluster):
            rest += _output_dir(run)
        if here:
            rest += _resources(run, output_dir="output_dir" not in bad)
        if "strategy.ds_config" not in bad:
            rest += _deepspeed_json(run)
        # The data pass tokenizes once, into the cache the workers memory-map: for a run that
        # starts here or in this cluster job, and for a submission whose cluster cache (under
        # storage_path) is on storage this machine shares, so that its job finds the cache built.
        # Any other submission only checks the rows: its job tokenizes where it runs.
        mix_bad = any(path_problem("", m.path) for m in run.data.mix)
        if not {"data.path", "data.eval_path"} & set(bad) and not mix_bad and (here or on_cluster or _data_here(run)):
            tokenize = here or on_cluster or _cluster_cache_here(run)
            commit = tokenize and not (problems or rest)
            problems[data_at:data_at] = _data(run, tokenizer if tokenize else None, commit=commit)
        problems += rest
    if problems:
        raise ConfigError(problems)
    return run
