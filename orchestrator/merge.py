"""Merging an adapter into its base and exporting a standard Hugging Face model directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from orchestrator import checkpoint
from orchestrator.config.schema import ModelConfig, QuantConfig
from orchestrator.model import fingerprint, load_base, load_tokenizer
from orchestrator.rundir import ADAPTER_WEIGHTS, MANIFEST

log = logging.getLogger("orchestrator")


class MergeError(RuntimeError):
    pass


def merge(adapter: Path, output: Path, base: Path | None = None, dtype: str = "bf16", shard_size: str = "2GB") -> Path:
    """Merge `adapter` into `base` (default: the base recorded in its manifest) on CPU and write
    a sharded safetensors model with its tokenizer to `output`.

    For a QLoRA adapter the merge goes into the original full-precision weights, never into
    dequantized 4-bit ones, so the exported model is the trained model without quantization
    error on top of the base; the base is checked against the adapter's fingerprint first.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    adapter, output = Path(adapter), Path(output)
    manifest_file = adapter / MANIFEST
    if not manifest_file.is_file():
        raise MergeError(f"{adapter} has no manifest.json: not an adapter written by orchestrator")
    manifest = json.loads(manifest_file.read_text())
    base = Path(base or manifest["base_model_path"])
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"output {output} is not empty; refusing to overwrite it")

    model_cfg = ModelConfig(path=str(base), dtype=dtype)
    trained_on = manifest["base_fingerprint"]["parts"]
    here = fingerprint(model_cfg, QuantConfig(kind="none"))["parts"]
    differs = [k for k in ("config", "tokenizer", "weights") if trained_on[k] != here[k]]
    if differs:
        raise MergeError(f"{base} is not the base {adapter} was trained on: its {', '.join(differs)} differ")
    if "quantization_config" in json.loads((base / "config.json").read_text()):
        log.warning(
            "%s holds quantized weights only: merging into their dequantized values adds the "
            "quantization error to the result; merge into the original full-precision base if you have it",
            base,
        )

    model = PeftModel.from_pretrained(load_base(model_cfg, QuantConfig(kind="none"), "cpu"), str(adapter))
    saved = set(load_file(adapter / ADAPTER_WEIGHTS))
    expected = set(get_peft_model_state_dict(model))
    if saved != expected:
        raise MergeError(
            f"{adapter} does not fit this base's adapter layout: missing {sorted(expected - saved)[:5]}, "
            f"unexpected {sorted(saved - expected)[:5]}"
        )
    merged = model.merge_and_unload()
    merged.config.use_cache = True

    def write(tmp: Path) -> None:
        merged.save_pretrained(tmp, max_shard_size=shard_size)
        load_tokenizer(model_cfg).save_pretrained(tmp)
        (tmp / "merge_manifest.json").write_text(
            json.dumps(
                {
                    "adapter": str(adapter.resolve()),
                    "base": str(base.resolve()),
                    "adapter_manifest": manifest,
                    "dtype": dtype,
                },
                indent=2,
            )
            + "\n"
        )

    with torch.no_grad():
        return checkpoint.commit(output, write)
