"""The one place that loads (and quantizes) a base model, and fingerprints it.

Nothing else calls from_pretrained on a model: tests, workers, merge and benchmarks all load
through here so that every path sees the same dtype, quantization and device placement.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.config.schema import AdapterConfig, ModelConfig, QuantConfig

if TYPE_CHECKING:  # transformers is imported where it is used
    from peft import PeftModel
    from transformers import BitsAndBytesConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

    from orchestrator.loading import ShardHook

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
)


def resolve_model_path(path: str) -> Path:
    """model.path as a directory: a local one as given; a hub id (org/name) that is not a local
    path as its snapshot in the local Hugging Face cache (HF_HUB_CACHE), never downloaded here.
    FileNotFoundError, saying where it looked, when neither holds it."""
    local = Path(path)
    if local.exists() or not _REPO_ID.match(path):
        return local
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - not cached, or a revision without files: said as such
        raise FileNotFoundError(
            f"{path} is neither a local directory nor a model in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}; {type(e).__name__}); download it first (`hf download {path}`)"
        ) from None


_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_model_config(model: ModelConfig) -> PretrainedConfig:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(model.path), trust_remote_code=model.trust_remote_code)


def module_names(model_config: PretrainedConfig, model: ModelConfig) -> dict[str, str]:
    """{module name: class name} of the architecture, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model.trust_remote_code)
    out = {n: type(mod).__name__ for n, mod in m.named_modules() if n}
    output = m.get_output_embeddings()
    for n, mod in m.named_modules():
        if mod is output:
            out[n] = "OutputHead"  # PEFT's all-linear skips the output layer; so do our checks
    return out


def bnb_config(model: ModelConfig, quant: QuantConfig) -> BitsAndBytesConfig:
    from transformers import BitsAndBytesConfig

    dtype = DTYPES[model.dtype]
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # A float storage dtype lets FSDP/ZeRO flatten and shard the packed weights with the rest
        # of the layer; uint8 storage fails there or silently escapes sharding.
        bnb_4bit_quant_storage=DTYPES[quant.storage_dtype or model.dtype],
    )


def load_base(model: ModelConfig, quant: QuantConfig, device: torch.device | str = "cpu") -> PreTrainedModel:
    """The frozen base, whole, on `device`, in model.dtype or 4-bit NF4 (merge, benchmarks, tests):
    the same weights load_model gives every worker, through the same layer-by-layer loader."""
    from orchestrator import loading

    if not loading.has_safetensors(resolve_model_path(model.path)):
        return _from_pretrained(model, quant, device)
    m = loading.skeleton(model, quant)
    loading.fill(m, model, device)
    return m


def load_model(
    model: ModelConfig,
    quant: QuantConfig,
    adapter: AdapterConfig,
    device: torch.device | str,
    shard: ShardHook | None = None,
) -> tuple[PeftModel, tuple[int, int]]:
    """The frozen base with a fresh adapter (identical on every worker), loaded one decoder layer at
    a time and handed to `shard` layer by layer (see orchestrator/loading.py), so that a sharding
    strategy never holds more than its shard plus about one layer. Returns the model and its
    (trainable, total) parameter counts, taken before sharding hides the sizes."""
    from orchestrator import loading

    if not loading.has_safetensors(resolve_model_path(model.path)):
        if shard is not None:
            raise loading.LoadError(
                f"{model.path} holds no safetensors weights: a sharding strategy loads the base layer by layer "
                "from safetensors files (convert the .bin files, e.g. save_pretrained with transformers 5)"
            )
        from orchestrator.adapters import attach_adapter

        m = attach_adapter(_from_pretrained(model, quant, device), adapter)
        return m, m.get_nb_trainable_parameters()
    m = loading.skeleton(model, quant, adapter)
    counts = loading.param_counts(m)
    loading.fill(m, model, device, shard)
    return m, counts


def _from_pretrained(model: ModelConfig, quant: QuantConfig, device: torch.device | str) -> PreTrainedModel:
    """A .bin-only base, whole, through from_pretrained."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(
        dtype=DTYPES[model.dtype],
        attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code,
        device_map={"": str(device)},
    )
    if quant.kind == "nf4":
        kwargs["quantization_config"] = bnb_config(model, quant)
    m = AutoModelForCausalLM.from_pretrained(resolve_model_path(model.path), **kwargs)
    if quant.kind == "nf4":
        _keep_4bit_layout(m)
    m.requires_grad_(False)
    m.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
    if model.gradient_checkpointing:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return m


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """Stop bitsandbytes from repacking 4-bit weights in place for its CPU inference kernel.

    On CPUs with AVX512-BF16, Linear4bit.forward in eval mode without grad replaces
    `weight.data` with a CPU-specific layout and flags the quant_state. Under FSDP the weight
    is a gathered copy: the shards keep the old layout while the quant_state now describes the
    new one, so every later forward would dequantize garbage. It also asserts on dimensions
    that are not multiples of 32. Training never takes that path; evaluation must not either.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(model.path), trust_remote_code=model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked everywhere, any id will do
    return tok


SAMPLES, SAMPLE_BYTES = 32, 64 * 1024


def _weights_digest(path: Path, h: hashlib._Hash) -> None:
    """Header (names, dtypes, shapes) plus 32 slices of 64 KiB spread over the tensor data.

    Headers alone cannot tell a base from its fine-tuned sibling (same shapes, same sizes), and
    hashing every byte of a 70B checkpoint takes minutes; two checkpoints that differ in their
    weights differ nearly everywhere, so evenly spread samples catch them in milliseconds."""
    size = path.stat().st_size
    with path.open("rb") as f:
        start = 0
        if path.suffix == ".safetensors":
            (n,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(n))
            start = 8 + n
        span = max(size - start - SAMPLE_BYTES, 0)
        for i in range(SAMPLES):
            f.seek(start + span * i // max(SAMPLES - 1, 1))
            h.update(f.read(SAMPLE_BYTES))


def fingerprint(model: ModelConfig, quant: QuantConfig) -> dict:
    """Identity of a base: architecture config, tokenizer and chat template, quantization, and
    its weight files (sizes, safetensors headers and sampled contents; see _weights_digest)."""
    path = resolve_model_path(model.path)
    h = hashlib.sha256()
    cfg = json.loads((path / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache"):
        cfg.pop(volatile, None)
    parts = {"config": hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()}
    tok = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            tok.update(name.encode() + (path / name).read_bytes())
    parts["tokenizer"] = tok.hexdigest()
    weights = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin")):
        weights.update(f.name.encode() + str(f.stat().st_size).encode())
        _weights_digest(f, weights)
    parts["weights"] = weights.hexdigest()
    parts["quant"] = hashlib.sha256(
        json.dumps([quant.kind, quant.double_quant, quant.storage_dtype or model.dtype]).encode()
    ).hexdigest()
    for k in ("config", "tokenizer", "weights", "quant"):
        h.update(parts[k].encode())
    return {"sha256": h.hexdigest(), "parts": parts}
