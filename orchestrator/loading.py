"""Loading a base that no worker holds whole: built on the meta device, filled decoder layer by
decoder layer from its safetensors files, and handed to the strategy to shard as soon as each
layer is real. Owned by orchestrator/model.py, which every path (train under any strategy, merge,
benchmarks, tests) loads through, so all of them see bit-identical base weights and adapter init.

The steps, per worker:
1. skeleton(): the PreTrainedModel on the meta device, in model.dtype; for NF4 its nn.Linear
   replaced by bitsandbytes Linear4bit through transformers' own quantizer (the same modules,
   quant_storage and compute dtype from_pretrained gives), frozen, with the adapter attached
   (on meta too: nothing is allocated yet).
2. fill(): non-persistent buffers (rotary inv_freq: not in any checkpoint) are computed by the
   model's own _init_weights, as from_pretrained does. Then, for each decoder layer, then the
   input embeddings and the output head (each alone when they are untied: at a 128k vocabulary
   each is larger than a decoder layer), and last the root's remaining parameters: its base
   tensors are read from the safetensors files, cast to the dtype from_pretrained would use, put
   on the worker's device and, for Linear4bit weights, quantized (Params4bit, as transformers'
   Bnb4bitQuantize does) one layer at a time; its adapter is initialised by PEFT's own
   update_layer on the real base (DoRA's magnitude needs the real weight), from one seeded RNG
   stream continued layer after layer, so LoRA matrices come out bit-identical to
   get_peft_model on a whole model when every target lies in a decoder layer (all-linear does);
   then the strategy's shard_layer lays the layer out (FSDP2 fully_shard, ZeRO-3 partitioning)
   and the whole layer is freed. A worker so holds its shard plus about one layer (plus, under
   NF4, that layer's quantization scratch), host and device.

Who reads: every rank reads each layer itself from the files, rather than rank 0 reading and
broadcasting. On one node the ranks share the page cache, so the checkpoint is read from storage
once per node whatever the worker count, and the per-layer cost is a copy out of the cache; N nodes
read it N times from shared storage. Tensors are read with pread, not through mmap: a mapped
checkpoint's pages count in a worker's resident (and, while only it maps them, private) memory
until the file is closed, which would look exactly like holding the whole base. Rank-0-and-broadcast reads it once but ships every byte of
the base over the interconnect to every rank anyway (the same bytes shared storage serves, in
series behind one reader, and over gloo on CPU), needs a collective per layer that every strategy
would have to schedule, and makes rank 0's memory the bottleneck. NF4 quantization is
deterministic, so every rank quantizes its layer to the same bits (FSDP then keeps its slice of the
packed storage; the quant state stays replicated, ~3% of the 4-bit bytes). Reading only this rank's
rows (safe_open().get_slice) would cut host bytes further for bf16 under FSDP but not for NF4
(blocks of 64 span the flattened weight) nor for ZeRO (flat partitions): a whole layer at a time is
the simple bound that holds for all four.

Checkpoint keys map to module names through transformers' own key renaming (legacy names, the
base_model_prefix); architectures whose checkpoints need tensor conversions beyond renaming (fused
MoE experts) are refused with a clear error rather than loaded wrongly. Only safetensors load this
way; a .bin-only base still loads whole through from_pretrained where the strategy keeps the base
whole (single, ddp, zero2) and is refused under fsdp and zero3.
"""

from __future__ import annotations

import json
import mmap
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from orchestrator.config.schema import AdapterConfig, ModelConfig, QuantConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Called on each decoder layer once it is real, then on the whole model: shards what is not yet.
ShardHook = Callable[[nn.Module], None]


class LoadError(ValueError):
    """The base's weight files do not fit its config (missing tensor, wrong shape, bad file)."""


class Checkpoint:
    """The tensors of a model directory's safetensors files by name, each read on demand with
    pread into memory of its own: the file is never mapped into the worker, so the page cache
    holds the bytes once per node and a worker's resident memory is only what it keeps."""

    def __init__(self, path: Path):
        from orchestrator.weights import SAFE_INDEX, SAFE_SINGLE, _index_shards, model_weight_problems

        self.path = Path(path)
        problems = model_weight_problems(self.path)
        if problems:
            raise LoadError("base " + "; ".join(problems))
        if (self.path / SAFE_INDEX).exists():
            self.files = [self.path / f for f in _index_shards(self.path / SAFE_INDEX)]
        elif (self.path / SAFE_SINGLE).exists():
            self.files = [self.path / SAFE_SINGLE]
        else:
            raise LoadError(
                f"{self.path} holds no safetensors weights; loading layer by layer reads safetensors only "
                "(convert the .bin files, e.g. save_pretrained with transformers 5)"
            )
        self.file: dict[str, Path] = {}
        self._info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for f in self.files:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            for k, v in header.items():
                if k == "__metadata__":
                    continue
                begin, end = v["data_offsets"]
                self.file[k] = f
                self._info[k] = (v["dtype"], tuple(v["shape"]), 8 + n + begin, end - begin)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def get(self, key: str) -> torch.Tensor:
        dtype, shape, offset, size = self._info[key]
        if dtype not in ST_DTYPES:
            raise LoadError(f"{self.file[key]}: tensor {key!r} has dtype {dtype}, which a base cannot load from")
        if size == 0:
            return torch.empty(shape, dtype=ST_DTYPES[dtype])
        # Anonymous memory of its own, unmapped when the tensor dies: a heap block of this size
        # would stay in the allocator's arena, pinned there by the shards allocated around it,
        # and every layer read would add to the worker's memory for good.
        buf = mmap.mmap(-1, size)
        with self.file[key].open("rb", buffering=0) as f:
            f.seek(offset)
            got = f.readinto(buf)
        if got != size:
            raise LoadError(f"{self.file[key]}: tensor {key!r} is cut short ({got} of {size} bytes read)")
        return torch.frombuffer(buf, dtype=torch.uint8).view(ST_DTYPES[dtype]).reshape(shape)


ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def has_safetensors(path: Path) -> bool:
    from orchestrator.weights import SAFE_INDEX, SAFE_SINGLE

    return (Path(path) / SAFE_INDEX).exists() or (Path(path) / SAFE_SINGLE).exists()


def skeleton(model: ModelConfig, quant: QuantConfig, adapter: AdapterConfig | None = None) -> nn.Module:
    """The model on the meta device as load_base shapes it (dtype, NF4 modules, frozen, no KV
    cache, gradient checkpointing, bitsandbytes' CPU repack off), with `adapter` attached."""
    from transformers import AutoModelForCausalLM

    from orchestrator.model import DTYPES, _keep_4bit_layout, bnb_config, load_model_config

    dtype = DTYPES[model.dtype]
    config = load_model_config(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(
            config,
            dtype=dtype,
            attn_implementation=model.attn_implementation,
            trust_remote_code=model.trust_remote_code,
        )
    if quant.kind == "nf4":
        from transformers.quantizers import AutoHfQuantizer

        quantizer = AutoHfQuantizer.from_config(bnb_config(model, quant), pre_quantized=False)
        quantizer.validate_environment(device_map=None)
        with torch.device("meta"):
            quantizer.preprocess_model(model=m, dtype=dtype, device_map=None)
        # What from_pretrained sets after loading; PEFT reads is_loaded_in_4bit to pick its
        # Linear4bit LoRA layers, so it must be there before the adapter is attached.
        m.hf_quantizer = quantizer
        quantizer.postprocess_model(m)
        _keep_4bit_layout(m)
    m.eval()  # as from_pretrained returns it
    m.requires_grad_(False)
    m.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    if model.gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m._orchestrator_keys = _base_keys(m)  # before PEFT nests the base modules under base_layer
    if adapter is None:
        return m
    from orchestrator.adapters import attach_adapter

    # DoRA's magnitude is the norm of the base weight, which the skeleton does not have yet (and
    # bitsandbytes cannot copy a meta Linear4bit to dequantize it): attach the same adapter as
    # plain LoRA, and fill() runs PEFT's update_layer with DoRA on each real layer.
    peft_model = attach_adapter(m, replace(adapter, kind="lora") if adapter.kind == "dora" else adapter)
    for config in peft_model.peft_config.values():
        config.use_dora = adapter.kind == "dora"
    peft_model._orchestrator_init_seed = adapter.init_seed  # fill() replays the init with it
    return peft_model


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters as PEFT counts them on a loaded model, from the skeleton: a
    Linear4bit weight counts in x out, as PEFT's unpacking of the packed storage does, and DoRA's
    magnitude (one value per output feature, made by fill()) is counted ahead."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    if hasattr(model, "peft_config"):
        from peft.tuners.lora import LoraLayer

        for sub in model.modules():
            if isinstance(sub, LoraLayer):
                extra = sum(sub.out_features for name in sub.r if model.peft_config[name].use_dora)
                trainable, total = trainable + extra, total + extra
    return trainable, total


def fill(model: nn.Module, cfg: ModelConfig, device: torch.device | str, shard: ShardHook | None = None) -> None:
    """Make the skeleton real in place on `device`, decoder layer by decoder layer, calling
    `shard` on each layer when it is complete and on `model` at the end."""
    from orchestrator.model import DTYPES, resolve_model_path
    from orchestrator.strategies.fsdp import decoder_layers, root_units

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    device = torch.device(device)
    ckpt = Checkpoint(resolve_model_path(cfg.path))
    keys = _checkpoint_keys(base, ckpt)
    adapter = _AdapterInit(model)
    _init_buffers(base, ckpt, device)
    fill_dtype = DTYPES[cfg.dtype]
    for unit in [*decoder_layers(base), *root_units(base)]:
        _materialise(unit, keys, ckpt, device, fill_dtype)
        adapter.init(unit)
        if shard is not None:
            shard(unit)
    _materialise(base, keys, ckpt, device, fill_dtype)
    adapter.init(base)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise LoadError(f"{cfg.path}: nothing loads {left[:5]}: not in the checkpoint and not an adapter parameter")
    if shard is not None:
        shard(model)


# --- the pieces ---------------------------------------------------------------------------------


def _base_keys(m: PreTrainedModel) -> dict[int, list[str]]:
    """{id(parameter): its names in the model}: tied parameters are one object under several names."""
    out: dict[int, list[str]] = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(name)
    return out


def _checkpoint_keys(base: PreTrainedModel, ckpt: Checkpoint) -> dict[int, str]:
    """{id(parameter): checkpoint key} for every base parameter, with every missing or misshapen
    tensor reported in one error before anything is read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    names = base._orchestrator_keys
    params = {}
    for _, p in base.named_parameters(remove_duplicate=False):
        if id(p) in names:
            params[id(p)] = p
    meta = {n: params[i] for i, ns in names.items() for n in ns}
    transforms = get_model_conversion_mapping(base, None, getattr(base, "hf_quantizer", None))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix = getattr(base, "base_model_prefix", None) or None
    to_ckpt: dict[str, str] = {}
    converted = []
    for key in ckpt.file:
        renamed, source = rename_source_key(key, renamings, converters, prefix, meta)
        if renamed not in meta and key in meta:
            renamed, source = key, None
        if source is not None and renamed in meta:
            converted.append(key)
        to_ckpt.setdefault(renamed, key)
    if converted:
        raise LoadError(
            f"{ckpt.path}: {type(base).__name__} checkpoints need tensor conversions transformers applies "
            f"while loading ({converted[:3]}...), which layer-by-layer loading does not do"
        )
    out: dict[int, str] = {}
    problems = []
    for i, ns in names.items():
        found = next((to_ckpt[n] for n in ns if n in to_ckpt), None)
        if found is None:
            problems.append(f"no tensor {ns[0]!r} in {_files(ckpt, ns[0])}")
            continue
        want, have = tuple(params[i].shape), ckpt.shape(found)
        if want != have:
            problems.append(
                f"{ckpt.file[found]}: tensor {found!r} has shape {list(have)}, the model's config.json needs {list(want)}"
            )
        out[i] = found
    if problems:
        raise LoadError(f"base {ckpt.path} does not fit its config:\n  " + "\n  ".join(problems))
    return out


def _files(ckpt: Checkpoint, key: str) -> str:
    from orchestrator.weights import SAFE_INDEX

    index = ckpt.path / SAFE_INDEX
    return str(index) + " (its weight_map)" if index.exists() else ", ".join(str(f) for f in ckpt.files)


def _init_buffers(base: PreTrainedModel, ckpt: Checkpoint, device: torch.device) -> None:
    """Buffers are not sharded and are small: all of them now. Non-persistent ones (rotary
    inv_freq) are computed as from_pretrained does (empty, then the model's _init_weights on their
    module, whose parameters are still meta and so untouched); persistent ones are read."""
    owners = {}
    for name, buf in base.named_buffers():
        if not buf.is_meta:
            continue
        mod_name, _, attr = name.rpartition(".")
        mod = base.get_submodule(mod_name)
        if attr in mod._non_persistent_buffers_set:
            mod._buffers[attr] = torch.empty_like(buf, device=device)
            owners[id(mod)] = mod
        elif name in ckpt.file:
            mod._buffers[attr] = ckpt.get(name).to(device=device, dtype=buf.dtype)
        else:
            raise LoadError(f"no tensor {name!r} in {_files(ckpt, name)} (a buffer the model needs)")
    for mod in owners.values():
        base._init_weights(mod)


def _materialise(
    module: nn.Module, keys: dict[int, str], ckpt: Checkpoint, device: torch.device, dtype: torch.dtype
) -> None:
    """Replace module's meta base parameters by real ones read from the checkpoint (tied ones by
    the same object); NF4 weights are quantized here."""
    import bitsandbytes as bnb

    made: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for attr, p in list(sub._parameters.items()):
            if p is None or not p.is_meta or id(p) not in keys:
                continue
            new = made.get(id(p))
            if new is None:
                value = ckpt.get(keys[id(p)])
                if isinstance(p, bnb.nn.Params4bit):
                    # transformers' Bnb4bitQuantize: the checkpoint tensor in model.dtype on the
                    # device, quantized by Params4bit.to with the meta parameter's settings.
                    value = value.to(device=device, dtype=dtype)
                    new = bnb.nn.Params4bit(value, requires_grad=False, **p.__dict__).to(value.device)
                else:
                    new = nn.Parameter(value.to(device=device, dtype=p.dtype), requires_grad=False)
                del value
                made[id(p)] = new
            sub._parameters[attr] = new


class _AdapterInit:
    """The adapter's init as get_peft_model does it on a whole model, one layer at a time.

    PEFT's update_layer is run again on each LoRA layer once its base is real: it draws lora_A
    from the global RNG, zeroes lora_B, computes DoRA's magnitude from the base weight, and
    moves the adapter to the base's device; the fp32 upcast of get_peft_model follows. The RNG
    is one stream seeded with adapter.init_seed (attach_adapter's), carried from layer to layer
    and isolated from everything else the fill does."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.peft = hasattr(model, "peft_config")
        if not self.peft:
            return
        self.names = {m: n for n, m in model.get_base_model().named_modules()}
        self.done: set[int] = set()
        seed = model._orchestrator_init_seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.rng = torch.get_rng_state()

    def init(self, module: nn.Module) -> None:
        if not self.peft:
            return
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import cast_adapter_dtype

        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng)
            for sub in module.modules():
                if not isinstance(sub, LoraLayer) or id(sub) in self.done:
                    continue
                for name in list(sub.r):
                    sub.update_layer(
                        name,
                        sub.r[name],
                        lora_alpha=sub.lora_alpha[name],
                        target_name=self.names[sub],
                        config=self.model.peft_config[name],
                    )
                self.done.add(id(sub))
            self.rng = torch.get_rng_state()
        for name in self.model.peft_config:
            cast_adapter_dtype(module, name, autocast_adapter_dtype=True)
