"""`orchestrator plan`: the memory each worker will need, predicted before any worker starts.

The model is built from `config.json` on the meta device (no weight is read) and the PEFT
adapter is attached to it there, so parameter counts are exact: the base per parameter (which
linear weights NF4 packs, which stay in `model.dtype`), the adapter per tensor (bitsandbytes
keeps 32-bit state for tensors under 4096 elements). From them and the run's config come, per
worker, at load and in steady state, itemised:

- base shard and the NF4 quantization constants (absmax, double-quant: replicated everywhere);
- adapter parameters, gradients and optimizer state, as each strategy lays them out;
- activations of one micro-batch: per layer and token, coefficients measured from the tensors
  autograd saves for a Llama decoder layer with LoRA on every linear layer (an upper bound for
  fewer targets), the layer inputs only under gradient checkpointing plus one layer recomputed,
  and the loss over the vocabulary (one chunk of logits with trainer.loss_chunk_tokens, else the
  whole batch's logits, their fp32 copy, log-softmax and its gradient);
- communication buffers: FSDP's gathered layers, DeepSpeed's buckets, the flat all-reduce;
- framework overhead: on CPU the Python, torch and Ray worker process (calibrated against the
  runs' measured peaks, see CALIBRATION), on GPU the CUDA context.

Figures are per worker and for the worst micro-batch: every sequence `data.max_seq_len` long.
The load figures follow orchestrator/loading.py (layer by layer, sharded as it fills;
`load_items` is the one function with them).
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config.schema import ZERO_STAGES, RunConfig

if TYPE_CHECKING:
    from transformers import PretrainedConfig

STRATEGIES = ("single", "ddp", "fsdp", "zero2", "zero3", "zero3_offload")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB, MiB = 2**30, 2**20

# Bytes autograd keeps per token and decoder layer, as c_h * hidden + c_i * intermediate +
# c_kv * (kv heads x head dim) + 4 per attention head (SDPA's log-sum-exp) + 4 * r per adapted
# module (lora_A's output). Measured with torch.autograd.graph.saved_tensors_hooks on Llama
# layers (transformers 4.5x, PEFT, SDPA), LoRA on all linear layers, keyed by (compute dtype
# bytes, dropout > 0): dropout keeps a mask and a dropped copy of every adapted input.
ACTIVATION_COEFFS = {
    (4, False): (24, 16, 8),
    (4, True): (58, 20, 8),
    (2, False): (36, 10, 4),
    (2, True): (54, 14, 4),
}

# Calibrated terms (see README "Memory planner" for the runs they come from and `--probe` to refit
# them on your machine).
CALIBRATION: dict[str, float] = {
    # A CPU worker when its setup begins: Python, torch and the Ray Train worker. Measured from
    # ~390 to ~490 MiB between runs of one tree on one machine (likely what Ray ran in that
    # process before); the workers log it as start_memory_bytes.
    "cpu_worker_bytes": 400 * MiB,
    # What setup adds before the base: transformers, PEFT, bitsandbytes, the tokenizer and the data.
    "cpu_libraries_bytes": 200 * MiB,
    # DeepSpeed's import and engine on top of that.
    "cpu_deepspeed_bytes": 25 * MiB,
    # One-time buffers of the first forward/backward on CPU (oneDNN/OpenMP scratch, thread pools).
    "cpu_first_step_bytes": 25 * MiB,
    # glibc keeps freed activation memory mapped (its mmap threshold grows with each freed block),
    # so a CPU worker's resident peak exceeds the live activations by this fraction of them.
    "cpu_allocator_slack": 1.0,
    # The same where the worker has glibc unmap freed blocks of 128 KiB and more (every strategy on
    # 2+ CPU workers) and trims its heap after each step: mid-size model -0.05 to 0.2.
    "cpu_allocator_slack_unmapped": 0.1,
    # The CUDA context (kernels, cuBLAS/cuDNN workspaces): outside torch's allocated bytes.
    "cuda_context_bytes": 600 * MiB,
    # Caching-allocator fragmentation, as a fraction of the activation peak.
    "cuda_allocator_slack": 0.1,
}


class PlanError(ValueError):
    """The model's config cannot be planned for (no config.json, an architecture transformers
    cannot build); the message says which."""


# --- the model, counted on the meta device -----------------------------------------------------


@dataclass
class BaseParam:
    numel: int
    dim0: int
    quantized: bool
    """An nn.Linear weight NF4 packs (every linear layer but the output head)."""
    layer: int | None
    """Index of its decoder layer; None for embeddings, final norm, output head."""
    unit: int | None = None
    """Index of the unit the loader fills and FSDP gathers it in: its decoder layer, then the
    embeddings and an untied output head as units of their own; None for the root's rest."""


@dataclass
class Shape:
    """What the planner needs of a model: exact parameter and adapter counts, and dimensions."""

    model_type: str
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_dim: int
    base: list[BaseParam]
    adapter: list[int]
    """Element count of every trainable adapter tensor."""
    adapted_per_layer: int
    """Adapted modules in one decoder layer."""
    largest_adapted: int
    """Elements of the largest adapted weight (DoRA recomputes its norm each forward)."""
    checkpoint_bytes: int = 0
    """Bytes of the weight files (their sizes; none is opened), or the parameters in config.json's
    dtype where there are none."""
    checkpoint_dtype_bytes: int = 2
    safetensors: bool = True
    """Weights in safetensors (or none yet: config.json alone is planned as safetensors)."""

    @property
    def base_params(self) -> int:
        return sum(p.numel for p in self.base)

    @property
    def adapter_params(self) -> int:
        return sum(self.adapter)


def model_shape(run: RunConfig, model_config: PretrainedConfig | None = None) -> Shape:
    """Build the base and its adapter on the meta device from config.json; count them."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from orchestrator.adapters import peft_config
    from orchestrator.model import load_model_config, resolve_model_path
    from orchestrator.strategies.fsdp import decoder_layers, root_units

    try:
        cfg = model_config if model_config is not None else load_model_config(run.model)
    except Exception as e:  # noqa: BLE001 - any reason config.json does not load
        raise PlanError(f"model.path: cannot read the model's config.json ({run.model.path}): {e}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=run.model.trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"model.path: transformers cannot build {run.model.path} as a causal LM: {e}") from None
    layers = decoder_layers(model)
    layer_of = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    unit_of = {id(p): i for i, unit in enumerate([*layers, *root_units(model)]) for p in unit.parameters()}
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    quantized = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head and id(m.weight) not in head_params
    }
    base = [
        BaseParam(p.numel(), p.shape[0] if p.dim() else 1, id(p) in quantized, layer_of.get(id(p)), unit_of.get(id(p)))
        for p in model.parameters()  # tied weights are one parameter, counted once
    ]
    try:
        # PEFT calls transformers APIs deprecated in their newer release: noise the user cannot act on.
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = get_peft_model(model, peft_config(run.adapter))
    except Exception as e:  # noqa: BLE001 - e.g. targets PEFT cannot adapt; validation words most
        raise PlanError(f"adapter: PEFT cannot attach {run.adapter.kind} to {cfg.model_type}: {e}") from None
    adapter = [p.numel() for p in peft_model.parameters() if p.requires_grad]
    from peft.tuners.lora import LoraLayer

    adapted = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    first = decoder_layers(peft_model)[0]
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    hidden = getattr(cfg, "hidden_size", 0)
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    source = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "bfloat16")
    source_bytes = 4 if "32" in source else 2
    model_dir = resolve_model_path(run.model.path)
    files = sorted(model_dir.glob("*.safetensors"))
    checkpoint = sum(f.stat().st_size for f in files) or sum(p.numel for p in base) * source_bytes
    return Shape(
        safetensors=bool(files) or not any(model_dir.glob("*.bin")),
        checkpoint_bytes=checkpoint,
        checkpoint_dtype_bytes=source_bytes,
        model_type=cfg.model_type,
        layers=len(layers),
        hidden=hidden,
        intermediate=getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden,
        vocab=getattr(cfg, "vocab_size", 0),
        heads=heads,
        kv_dim=(getattr(cfg, "num_key_value_heads", None) or heads) * head_dim,
        base=base,
        adapter=adapter,
        adapted_per_layer=sum(1 for m in first.modules() if isinstance(m, LoraLayer)),
        largest_adapted=max((m.get_base_layer().weight.numel() for m in adapted), default=0),
    )


# --- bytes of the pieces --------------------------------------------------------------------------


def nf4_packed_bytes(numel: int, storage_bytes: int) -> int:
    """bitsandbytes packs two 4-bit values per byte into a (k, 1) tensor of the storage dtype."""
    return (numel + 1) // 2 // storage_bytes * storage_bytes


def nf4_constants_bytes(numel: int, double_quant: bool) -> int:
    """QuantState of one NF4 weight: absmax per block of 64 (fp32, or uint8 with double
    quantization plus an fp32 absmax per 256 blocks and its 256-entry code), the 16-value code."""
    blocks = math.ceil(numel / 64)
    if not double_quant:
        return 4 * blocks + 16 * 4
    return blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 16 * 4


def param_bytes(p: BaseParam, run: RunConfig) -> tuple[int, int]:
    """(elements as stored, bytes) of one base parameter."""
    dt = DTYPE_BYTES[run.model.dtype]
    if run.quant.kind == "nf4" and p.quantized:
        storage = DTYPE_BYTES[run.quant.storage_dtype or run.model.dtype]
        b = nf4_packed_bytes(p.numel, storage)
        return b // storage, b
    return p.numel, p.numel * dt


def optimizer_state_bytes(numels: list[int], name: str) -> int:
    """Adam's two moments for these tensors: fp32 for adamw and the 32-bit optimizers; 8-bit
    (one byte each, plus an fp32 absmax per 256 values) for tensors of 4096+ elements, which is
    where bitsandbytes switches to 8 bits."""
    total = 0
    for n in numels:
        if name.endswith("8bit") and n >= 4096:
            total += 2 * n + 2 * 4 * math.ceil(n / 256)
        else:
            total += 8 * n
    return total


def activation_bytes(shape: Shape, run: RunConfig, tokens: int, device: str, unmapped: bool = False) -> dict[str, int]:
    """Live activation bytes of one micro-batch of `tokens` tokens at its peak; `unmapped`: a CPU
    worker whose freed blocks go back to the OS (distributed.unmaps_freed_blocks)."""
    dt = DTYPE_BYTES[run.model.dtype]
    c_h, c_i, c_kv = ACTIVATION_COEFFS[(4 if dt == 4 else 2, run.adapter.dropout > 0)]
    per_layer_token = (
        c_h * shape.hidden
        + c_i * shape.intermediate
        + c_kv * shape.kv_dim
        + 4 * shape.heads
        + 4 * run.adapter.r * shape.adapted_per_layer
    )
    out = {}
    if run.model.gradient_checkpointing:
        out["layer inputs (checkpointed)"] = shape.layers * tokens * shape.hidden * dt
        out["one layer recomputed"] = tokens * per_layer_token
    else:
        out["saved by every layer"] = shape.layers * tokens * per_layer_token
    chunk = getattr(run.trainer, "loss_chunk_tokens", 0)
    if chunk > 0:
        # orchestrator/loss.py: per chunk of target positions the logits in dtype and fp32 and
        # their softmax; the target rows' hidden states and their gradient, kept for backward.
        out["loss chunk (logits of one chunk)"] = min(chunk, tokens) * shape.vocab * (dt + 8)
        out["loss: target hidden states and gradient"] = 2 * tokens * shape.hidden * dt
    else:
        # transformers' loss: logits in dtype, their fp32 copy's log-softmax, and in backward its
        # gradient and the gradient of the logits: the largest tensors at a 128k vocabulary.
        out["logits and loss"] = tokens * shape.vocab * (dt + 12)
    if run.adapter.kind == "dora":
        out["DoRA weight norm (one weight)"] = 2 * shape.largest_adapted * 4
    slack = CALIBRATION["cuda_allocator_slack"]
    if device == "cpu":
        slack = CALIBRATION["cpu_allocator_slack_unmapped" if unmapped else "cpu_allocator_slack"]
    out["allocator slack"] = int(slack * sum(out.values()))
    return out


# --- per strategy ---------------------------------------------------------------------------------


@dataclass
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass
class StrategyPlan:
    strategy: str
    workers: int
    load: list[Item]
    steady: list[Item]
    host: list[Item] = field(default_factory=list)
    """GPU runs: what a worker keeps in host memory (offloaded state); not in the device peak."""
    problem: str | None = None
    """Why this strategy cannot run this config at all (e.g. single with several workers)."""

    @property
    def load_bytes(self) -> int:
        return sum(i.bytes for i in self.load)

    @property
    def steady_bytes(self) -> int:
        return sum(i.bytes for i in self.steady)

    @property
    def peak_bytes(self) -> int:
        return max(self.load_bytes, self.steady_bytes)

    def as_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "workers": self.workers,
            "load_bytes": self.load_bytes,
            "steady_bytes": self.steady_bytes,
            "peak_bytes": self.peak_bytes,
            "load": [asdict(i) for i in self.load],
            "steady": [asdict(i) for i in self.steady],
            "host": [asdict(i) for i in self.host],
            "problem": self.problem,
        }


def _base_shard(shape: Shape, run: RunConfig, strategy: str, n: int) -> int:
    total = 0
    threshold = run.strategy.param_persistence_threshold
    for p in shape.base:
        numel, b = param_bytes(p, run)
        per = b // max(numel, 1)
        if strategy == "fsdp":  # FSDP2 shards every parameter on dim 0, padded to n
            total += math.ceil(p.dim0 / n) * (b // max(p.dim0, 1)) if n > 1 else b
        elif ZERO_STAGES.get(strategy) == 3:
            part = math.ceil(numel / n) * per
            total += part + (b if numel < threshold else 0)  # small tensors persist whole
        else:
            total += b
    return total


def _units(shape: Shape) -> list[list[BaseParam]]:
    """The base's parameters by loading and FSDP unit (decoder layers, embeddings, an untied
    output head, the root's rest)."""
    units: dict[int | None, list[BaseParam]] = {}
    for p in shape.base:
        units.setdefault(p.unit, []).append(p)
    return list(units.values())


def _layer_bytes(shape: Shape, run: RunConfig) -> int:
    """The largest unit's base parameters as stored (what FSDP gathers at once)."""
    return max((sum(param_bytes(p, run)[1] for p in unit) for unit in _units(shape)), default=0)


def _source_layer_bytes(shape: Shape, run: RunConfig, dt: int) -> int:
    """The largest unit the loader fills at once, at `dt` bytes per parameter before quantization."""
    return max((sum(p.numel * dt for p in unit) for unit in _units(shape)), default=0)


def _overhead(run: RunConfig, strategy: str, device: str) -> Item:
    if device == "cuda":
        return Item("framework: CUDA context", int(CALIBRATION["cuda_context_bytes"]), "outside torch's allocator")
    b = CALIBRATION["cpu_worker_bytes"] + CALIBRATION["cpu_libraries_bytes"]
    if strategy in ZERO_STAGES:
        b += CALIBRATION["cpu_deepspeed_bytes"]
    return Item("framework: Python, torch, Ray worker", int(b), "calibrated")


def load_items(shape: Shape, run: RunConfig, strategy: str, n: int, device: str) -> list[Item]:
    """Peak of loading the base on one worker: the one function with the load formulas.

    orchestrator/loading.py builds the model on the meta device and fills it one decoder layer at
    a time from the safetensors files (read with pread, never memory-mapped), hands each layer to
    the strategy to shard as soon as it is filled (fsdp, zero3, zero3_offload) and frees the rest.
    A worker so holds what it keeps of the base (its shard, or the whole base under single, ddp and
    zero2), plus the layer being filled in the checkpoint's dtype and, for NF4, the quantization
    scratch of one weight. A .bin-only base loads whole through from_pretrained (single, ddp,
    zero2 only)."""
    dt = DTYPE_BYTES[run.model.dtype]
    nf4 = run.quant.kind == "nf4"
    largest_quantized = max((p.numel for p in shape.base if p.quantized), default=0)
    items = [_overhead(run, strategy, device)]
    held = _base_shard(shape, run, strategy, n)
    if not shape.safetensors:
        items.append(Item("base weights held", held, "whole, through from_pretrained (.bin weights)"))
        if nf4:
            items.append(Item("quantization scratch (one weight in source dtype)", largest_quantized * dt))
    else:
        if strategy == "zero3_offload" and device == "cuda":
            items.append(Item("base weights held", 0, f"partition of {human(held)} in host memory"))
        else:
            whole = held >= _base_shard(shape, run, "single", 1)
            items.append(Item("base weights held", held, "whole" if whole else "shard, filled layer by layer"))
        layer = max(_source_layer_bytes(shape, run, shape.checkpoint_dtype_bytes), _source_layer_bytes(shape, run, dt))
        items.append(Item("layer being filled", layer, "the largest: a decoder layer or the root's own"))
        if nf4:
            items.append(Item("quantization scratch (one weight, fp32)", 4 * largest_quantized))
    if nf4:
        items.append(Item("NF4 constants", _nf4_constants(shape, run)))
    return items


def _nf4_constants(shape: Shape, run: RunConfig) -> int:
    return sum(nf4_constants_bytes(p.numel, run.quant.double_quant) for p in shape.base if p.quantized)


def strategy_plan(shape: Shape, run: RunConfig, strategy: str, device: str, tokens: int | None = None) -> StrategyPlan:
    """Per-worker figures of `run` under `strategy` (with the run's worker count; single: 1)."""
    n = 1 if strategy == "single" else run.cluster.num_workers
    problem = None
    if strategy == "single" and run.cluster.num_workers > 1:
        problem = f"one process only (cluster.num_workers={run.cluster.num_workers})"
    dt = DTYPE_BYTES[run.model.dtype]
    stage = ZERO_STAGES.get(strategy)
    A = shape.adapter_params
    seq = tokens or run.trainer.micro_batch_size * run.data.max_seq_len
    offload = strategy == "zero3_offload" or (stage is not None and run.strategy.offload)
    host: list[Item] = []
    steady = [_overhead(run, strategy, device)]
    base = _base_shard(shape, run, strategy, n)
    if strategy == "zero3_offload":
        host.append(Item("base (offloaded)", base))
        base = 0
    steady.append(Item("base weights held", base, "whole" if base >= _base_shard(shape, run, "single", 1) else "shard"))
    if run.quant.kind == "nf4":
        steady.append(Item("NF4 constants", _nf4_constants(shape, run), "replicated on every worker"))

    transient_step: list[Item] = []
    if stage is None:
        state = optimizer_state_bytes(shape.adapter, run.optim.name)
        sharded = strategy != "single" and n > 1 and run.strategy.shard_optimizer
        if sharded:  # the tensors each worker steps, as strategies/optimizer_shard assigns them
            from orchestrator.strategies.optimizer_shard import partition

            owned = partition(shape.adapter, n)
            state = max(optimizer_state_bytes([shape.adapter[i] for i in o], run.optim.name) for o in owned)
            largest_share = max(sum(shape.adapter[i] for i in o) for o in owned)
        steady.append(Item("adapter parameters (fp32)", 4 * A))
        steady.append(Item("adapter gradients (fp32)", 4 * A))
        steady.append(
            Item(f"optimizer state ({run.optim.name})", state, "this worker's share" if sharded else "replicated")
        )
        if n > 1:
            transient_step.append(Item("flat gradient all-reduce", 4 * A, "during the optimizer step"))
        if sharded:
            transient_step.append(Item("parameter all-gather buffers", 4 * largest_share * (n + 1), "after the step"))
    else:
        lp = A * dt
        part = math.ceil(A / n)
        if stage == 3:
            steady.append(Item(f"adapter partition ({run.model.dtype})", part * dt))
        else:
            steady.append(Item(f"adapter parameters ({run.model.dtype})", lp))
        grads = Item("gradient partition (fp32)", 4 * part)
        masters = Item("fp32 master partition", 4 * part)
        state = Item(f"optimizer state ({run.optim.name}, partition)", optimizer_state_bytes([part], run.optim.name))
        if offload:
            host += [grads, masters, state]
        else:
            steady += [grads, masters, state]
        bucket = min(run.strategy.reduce_bucket_size, A) * dt
        steady.append(Item("reduce bucket", bucket, "strategy.reduce_bucket_size"))
        if stage == 2:
            transient_step.append(
                Item("all-gather bucket", min(run.strategy.allgather_bucket_size, A) * dt, "after the step")
            )

    from orchestrator.distributed import unmaps_freed_blocks

    acts = activation_bytes(shape, run, seq, device, unmaps_freed_blocks(device, n))
    compute = [Item(f"activations: {k}", v) for k, v in acts.items()]
    layer = _layer_bytes(shape, run)
    if strategy == "fsdp" and n > 1:
        if run.strategy.reshard_after_forward:
            compute.append(Item("gathered layers (FSDP, one + prefetch)", 2 * layer))
        else:
            full = _base_shard(shape, run, "single", 1)
            compute.append(Item("gathered layers (reshard_after_forward=false)", full - steady[1].bytes))
    elif stage == 3:
        # From the second step on (the first traces the module order) ZeRO-3 prefetches ahead of
        # use, a bucket at a time, until max_live_parameters elements are gathered: a base under
        # that bound stays gathered whole (the 1.6 GB test base: all 397M of its parameters from
        # the first layer of step 2 on, logged at DeepSpeed's fetches). A prefetch bucket is
        # gathered into one flat buffer and then copied out parameter by parameter, so while it
        # lands both copies are live.
        full = _base_shard(shape, run, "single", 1)
        prefetch = min(run.strategy.prefetch_bucket_size * dt, full)
        live = run.strategy.max_live_parameters * dt
        gathered = min(max(layer + prefetch, live + layer), full)
        compute.append(
            Item(
                "gathered parameters (live + one layer)", gathered, "strategy.max_live_parameters, prefetch_bucket_size"
            )
        )
        if live and prefetch:
            compute.append(Item("prefetch bucket landing (flat buffer)", prefetch, "strategy.prefetch_bucket_size"))
    if device == "cpu":
        compute.append(Item("first-step buffers", int(CALIBRATION["cpu_first_step_bytes"])))
    # Activations and the step's buffers are never live together: the step runs after backward.
    if sum(i.bytes for i in transient_step) > sum(i.bytes for i in compute):
        steady += transient_step
    else:
        steady += compute
    if device == "cpu":  # on CPU the host is the device: offloaded state is in the same memory
        steady += host
        host = []
    return StrategyPlan(strategy, n, load_items(shape, run, strategy, n, device), steady, host, problem)


# --- the plan ---------------------------------------------------------------------------------------


@dataclass
class Plan:
    run: RunConfig
    shape: Shape
    device: str
    device_memory: int | None
    device_memory_source: str
    plans: dict[str, StrategyPlan]
    advice: str = ""

    @property
    def chosen(self) -> StrategyPlan:
        return self.plans[self.run.strategy.name]

    def fits(self, p: StrategyPlan | None = None) -> bool | None:
        p = p or self.chosen
        if self.device_memory is None:
            return None
        return p.problem is None and p.peak_bytes <= self.device_memory

    def as_dict(self) -> dict:
        r = self.run
        return {
            "model": {
                "path": r.model.path,
                "model_type": self.shape.model_type,
                "layers": self.shape.layers,
                "hidden_size": self.shape.hidden,
                "vocab_size": self.shape.vocab,
                "base_params": self.shape.base_params,
                "adapter_params": self.shape.adapter_params,
            },
            "run": {
                "strategy": r.strategy.name,
                "workers": r.cluster.num_workers,
                "device": self.device,
                "dtype": r.model.dtype,
                "quant": r.quant.kind,
                "adapter": f"{r.adapter.kind} r={r.adapter.r}",
                "optimizer": r.optim.name,
                "micro_batch_size": r.trainer.micro_batch_size,
                "max_seq_len": r.data.max_seq_len,
                "gradient_checkpointing": r.model.gradient_checkpointing,
            },
            "peak_bytes_per_worker": self.chosen.peak_bytes,
            "load_bytes_per_worker": self.chosen.load_bytes,
            "steady_bytes_per_worker": self.chosen.steady_bytes,
            "device_memory": self.device_memory,
            "device_memory_source": self.device_memory_source,
            "fits": self.fits(),
            "strategies": {k: v.as_dict() for k, v in self.plans.items()},
            "advice": self.advice,
        }


def default_device_memory(run: RunConfig) -> tuple[int | None, str]:
    """What one worker will have: the local GPU's memory for GPU runs on this machine, else the
    host memory divided among the workers of a local run; unknown for a remote cluster."""
    if run.trainer.device_memory:
        return parse_bytes(run.trainer.device_memory), "trainer.device_memory"
    if run.cluster.use_gpu:
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_properties(0).total_memory, f"{torch.cuda.get_device_name(0)} (this node)"
        except Exception:  # noqa: BLE001 - no usable CUDA here
            pass
        return None, "unknown (no GPU on this node; give --device-memory)"
    if run.cluster.kind != "local" or run.cluster.address:
        return None, "unknown (a cluster's nodes; give --device-memory)"
    import psutil

    total = psutil.virtual_memory().total
    return total // run.cluster.num_workers, f"host memory / {run.cluster.num_workers} workers"


def make_plan(
    run: RunConfig,
    device_memory: int | None = None,
    shape: Shape | None = None,
    tokens: int | None = None,
) -> Plan:
    shape = shape or model_shape(run)
    device = "cuda" if run.cluster.use_gpu else "cpu"
    source = "--device-memory"
    if device_memory is None:
        device_memory, source = default_device_memory(run)
    plans = {s: strategy_plan(shape, run, s, device, tokens) for s in STRATEGIES}
    plan = Plan(run, shape, device, device_memory, source, plans)
    plan.advice = advise(plan)
    return plan


def _variant(run: RunConfig, strategy: str, micro: int, gc: bool) -> RunConfig:
    return replace(
        run,
        strategy=replace(run.strategy, name=strategy),
        trainer=replace(run.trainer, micro_batch_size=micro),
        model=replace(run.model, gradient_checkpointing=gc),
    )


def advise(plan: Plan) -> str:
    """Which strategy, micro-batch and checkpointing fit, or why nothing does."""
    if plan.device_memory is None:
        return "device memory unknown: give --device-memory (e.g. 80GiB) to check what fits"
    run, mem = plan.run, plan.device_memory
    if plan.fits():
        return f"fits: {run.strategy.name} needs {human(plan.chosen.peak_bytes)} of {human(mem)} per worker"
    options = []
    micros = sorted({m for m in (run.trainer.micro_batch_size, 8, 4, 2, 1) if m <= run.trainer.micro_batch_size})
    for strategy in STRATEGIES:
        if strategy == "single" and run.cluster.num_workers > 1:
            continue
        for gc in (run.model.gradient_checkpointing, True):
            for micro in reversed(micros):
                p = strategy_plan(plan.shape, _variant(run, strategy, micro, gc), strategy, plan.device)
                if p.peak_bytes <= mem:
                    options.append((strategy, micro, gc, p.peak_bytes))
                    break
            else:
                continue
            break
    if options:
        # Keep the global batch: fewer sequences per micro-batch, more accumulation.
        rank = {s: i for i, s in enumerate(("fsdp", "zero3", "ddp", "zero2", "single", "zero3_offload"))}
        best = max(options, key=lambda o: (o[1], not o[2], -rank[o[0]]))
        s, micro, gc, peak = best
        accum = math.ceil(run.trainer.micro_batch_size * run.trainer.grad_accum / micro)
        alts = ", ".join(f"{o[0]} (micro {o[1]}{', checkpointing' if o[2] else ''})" for o in options if o != best)
        return (
            f"does not fit: {run.strategy.name} needs {human(plan.chosen.peak_bytes)} of {human(mem)} per worker. "
            f"Fits: strategy={s} trainer.micro_batch_size={micro} trainer.grad_accum={accum} "
            f"model.gradient_checkpointing={str(gc).lower()} ({human(peak)})" + (f"; also {alts}" if alts else "")
        )
    smallest = min(
        (strategy_plan(plan.shape, _variant(run, s, 1, True), s, plan.device) for s in STRATEGIES if s != "single"),
        key=lambda p: p.peak_bytes,
    )
    phase = "load" if smallest.load_bytes > smallest.steady_bytes else "steady"
    biggest = max(getattr(smallest, phase), key=lambda i: i.bytes)
    helps = ["more workers"] if phase == "steady" else []
    if run.quant.kind != "nf4":
        helps.append("quant=nf4")
    if phase == "steady":
        helps.append("a shorter data.max_seq_len")
    helps.append("a larger device")
    return (
        f"nothing fits {human(mem)} per worker with {run.cluster.num_workers} worker(s): the smallest is "
        f"{smallest.strategy} with micro-batch 1 and checkpointing at {human(smallest.peak_bytes)}, "
        f"{'while loading' if phase == 'load' else 'in steady state'}, mostly {biggest.name} "
        f"({human(biggest.bytes)}{', ' + biggest.note if biggest.note else ''}). "
        + f"What would help: {', '.join(helps)}"
    )


# --- output ---------------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '1.5TiB', '2000000' -> bytes (GB = 10^9, GiB = 2^30)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"{text!r} is not a memory size (e.g. 24GiB, 80GB, 512MiB)")
    value = float(m.group(1)) * UNITS[m.group(2).lower()]
    if not 0 < value < 2**63:
        raise ValueError(f"{text!r}: a memory size must be positive and below 8 EiB")
    return int(value)


def table_rows(plan: Plan) -> tuple[list[str], list[list[str]]]:
    """Item rows (load and steady state of every strategy side by side), then the totals."""
    order = [plan.run.strategy.name, *(s for s in STRATEGIES if s != plan.run.strategy.name)]
    header = ["per worker", *(f"{s}{' (chosen)' if s == plan.run.strategy.name else ''}" for s in order)]
    rows: list[list[str]] = []
    for phase in ("load", "steady"):
        names: list[str] = []
        for s in order:
            for i in getattr(plan.plans[s], phase):
                if i.name not in names:
                    names.append(i.name)
        rows.append([f"[{'at load' if phase == 'load' else 'steady state'}]", *[""] * len(order)])
        for name in names:
            cells = []
            for s in order:
                b = sum(i.bytes for i in getattr(plan.plans[s], phase) if i.name == name)
                present = any(i.name == name for i in getattr(plan.plans[s], phase))
                cells.append(human(b) if present else "-")
            rows.append([f"  {name}", *cells])
        rows.append([f"  = {phase} peak", *(human(getattr(plan.plans[s], f"{phase}_bytes")) for s in order)])
    rows.append(["peak per worker", *(human(plan.plans[s].peak_bytes) for s in order)])
    if any(plan.plans[s].host for s in order):
        rows.append(["host memory (offloaded)", *(human(sum(i.bytes for i in plan.plans[s].host)) for s in order)])
    if plan.device_memory is not None:
        rows.append(
            ["fits " + human(plan.device_memory), *("no" if not plan.fits(plan.plans[s]) else "yes" for s in order)]
        )
    return header, rows


def render(plan: Plan) -> str:
    """The table as plain text (what the terminal, the refusal and the README show)."""
    r, s = plan.run, plan.shape
    header, rows = table_rows(plan)
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        f"memory plan: {r.model.path} ({s.model_type}, {s.base_params / 1e9:.3g}B base parameters, "
        f"{s.adapter_params / 1e6:.3g}M adapter parameters)",
        f"  {r.quant.kind} base in {r.model.dtype}, {r.adapter.kind} r={r.adapter.r}, {r.optim.name}, "
        f"{r.cluster.num_workers} worker(s) on {plan.device}, micro-batch {r.trainer.micro_batch_size} x "
        f"{r.data.max_seq_len} tokens, gradient checkpointing {'on' if r.model.gradient_checkpointing else 'off'}",
        f"  device memory per worker: {human(plan.device_memory) if plan.device_memory else '?'} "
        f"({plan.device_memory_source})",
        "",
    ]
    fmt = lambda row: "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row))  # noqa: E731
    lines.append(fmt(header))
    lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(row) for row in rows]
    lines += ["", plan.advice]
    return "\n".join(lines)


def print_plan(plan: Plan) -> None:
    """A rich table on a terminal, plain text otherwise (pipes, logs)."""
    import sys

    if not sys.stdout.isatty() or os.environ.get("NO_COLOR"):
        print(render(plan))
        return
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(plan)
    text = render(plan).split("\n\n")[0]
    table = Table(*header, title=None, show_lines=False)
    for row in rows:
        table.add_row(*row, style="bold" if not row[0].startswith("  ") else None)
    console = Console()
    console.print(text)
    console.print(table)
    console.print(plan.advice)


def check_fits(run: RunConfig) -> Plan | None:
    """Before a run starts: the plan when the run cannot fit the memory its workers will have
    (None when it fits, or when that memory is unknown)."""
    memory, source = default_device_memory(run)
    if memory is None:
        return None  # nothing to compare with: the model is not even built
    try:
        plan = make_plan(run, memory)
    except PlanError:
        return None  # validation reports an unreadable model
    plan.device_memory_source = source
    return plan if plan.fits() is False else None


def probe(run: RunConfig, workdir: Any) -> dict[str, Any]:
    """Train two real steps of `run` (in this process for one CPU worker, as the tests do, else on
    Ray) and refit the calibrated overhead terms to what its workers measured. Returns the plans
    before and after, the measured figures and the refitted terms; CALIBRATION is left as it was."""
    import json

    from orchestrator import driver
    from orchestrator.config import as_dict

    out = Path(workdir) / "probe"
    probe_run = replace(
        run,
        output_dir=str(out),
        resume="never",
        trainer=replace(run.trainer, max_steps=2, save_every=0, eval_every=0, log_every=1, check_memory=False),
        data=replace(run.data, eval_fraction=0.0, eval_path=None),
        tracking=replace(run.tracking, backend="none"),
    )
    before = make_plan(probe_run)
    if probe_run.cluster.num_workers > 1 or probe_run.cluster.use_gpu:
        driver.train(probe_run)
    else:
        from orchestrator.train_loop import train_loop

        driver.prepare_output_dir(probe_run)
        train_loop({"run": as_dict(probe_run)})
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "steady_peak_memory_bytes" in r]
    measured = {k: max(r[f"{k}_memory_bytes"] for r in steps) for k in ("start", "load_peak", "steady_peak")}
    saved = dict(CALIBRATION)
    try:
        refitted = refit(before, measured["steady_peak"])
        after = make_plan(probe_run, shape=before.shape)
    finally:
        CALIBRATION.clear()
        CALIBRATION.update(saved)
    return {"before": before, "after": after, "measured": measured, "refitted": refitted}


def refit(plan: Plan, steady_peak: float) -> dict[str, float]:
    """Move the overhead term so that the chosen strategy's steady prediction meets the measured
    steady peak: on CPU the process's own memory, on GPU the allocator slack (torch's allocated
    bytes, which the measurement is, exclude the CUDA context). Every other item is an exact
    count or a measured coefficient; what remains is the overhead's."""
    p = plan.chosen
    if plan.device == "cuda":
        context = CALIBRATION["cuda_context_bytes"]
        acts = sum(i.bytes for i in p.steady if i.name.startswith("activations") and "slack" not in i.name)
        slack = sum(i.bytes for i in p.steady if i.name == "activations: allocator slack")
        gap = steady_peak - (p.steady_bytes - context)
        CALIBRATION["cuda_allocator_slack"] = max((slack + gap) / max(acts, 1), 0.0)
        return {"cuda_allocator_slack": CALIBRATION["cuda_allocator_slack"]}
    gap = steady_peak - p.steady_bytes
    CALIBRATION["cpu_worker_bytes"] = max(CALIBRATION["cpu_worker_bytes"] + gap, 0.0)
    return {"cpu_worker_bytes": CALIBRATION["cpu_worker_bytes"]}
