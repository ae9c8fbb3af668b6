"""Merging an adapter into its base and exporting a standard Hugging Face model directory."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from orchestrator import checkpoint
from orchestrator.config.schema import ModelConfig, QuantConfig
from orchestrator.model import fingerprint, load_base, load_tokenizer, resolve_model_path
from orchestrator.rundir import ADAPTER_WEIGHTS, MANIFEST

log = logging.getLogger("orchestrator")


class MergeError(RuntimeError):
    pass


class BadInput(MergeError):
    """The adapter or the base given to merge is missing, truncated or garbled (exit code 2)."""


ADAPTER_CONFIG = "adapter_config.json"


def _json_object(path: Path, what: str) -> dict:
    if not path.is_file():
        raise BadInput(f"{path} is missing: {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadInput(f"{path}: cannot be read ({e.strerror or e})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadInput(f"{path}: garbled or truncated, not JSON ({e})") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path}: garbled: expected a JSON object, got {type(data).__name__}")
    return data


def check_adapter(adapter: Path) -> dict:
    """The adapter's manifest, after checking (from headers only) that every file merge reads is
    there and whole; BadInput names the first that is not."""
    from orchestrator.weights import WeightsError, safetensors_header

    adapter = Path(adapter)
    if not adapter.is_dir():
        raise BadInput(
            f"{adapter} {'is not a directory' if adapter.exists() else 'does not exist'}: expected an "
            "adapter directory (<run>/adapter or a step checkpoint's adapter/)"
        )
    manifest = _json_object(adapter / MANIFEST, "not an adapter written by orchestrator, or an incomplete copy")
    fp = manifest.get("base_fingerprint")
    parts = fp.get("parts") if isinstance(fp, dict) else None
    if (
        not isinstance(manifest.get("base_model_path"), str)
        or not isinstance(parts, dict)
        or not all(isinstance(parts.get(k), str) for k in ("config", "tokenizer", "weights"))
    ):
        raise BadInput(
            f"{adapter / MANIFEST}: garbled: expected base_model_path and base_fingerprint.parts "
            "(config, tokenizer, weights)"
        )
    config = _json_object(adapter / ADAPTER_CONFIG, "PEFT's adapter configuration")
    if not config.get("r") or not config.get("target_modules"):
        raise BadInput(f"{adapter / ADAPTER_CONFIG}: garbled: no r or target_modules")
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise BadInput(f"{adapter / ADAPTER_WEIGHTS} is missing: the adapter's weights")
    try:
        safetensors_header(adapter / ADAPTER_WEIGHTS)
    except WeightsError as e:
        raise BadInput(str(e)) from None
    return manifest


def check_base(base: Path) -> None:
    from orchestrator.weights import model_weight_problems

    if not (base / "config.json").is_file():
        raise BadInput(f"base {base} is not a Hugging Face model directory (no config.json)")
    problems = model_weight_problems(base)
    if problems:
        raise BadInput("base " + "; ".join(problems))


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
    manifest = check_adapter(adapter)
    try:
        base = resolve_model_path(str(base or manifest["base_model_path"]))
    except FileNotFoundError as e:
        raise BadInput(f"base {e}") from None
    probe = next((q for q in [output, *output.parents] if q.exists()), None)
    if probe is not None and not probe.is_dir():
        raise BadInput(
            f"output {output} is a file; give a new directory for the merged model"
            if probe == output
            else f"output {output} cannot be created: {probe} is a file, not a directory"
        )
    if output.exists() and any(output.iterdir()):
        raise MergeError(f"output {output} is not empty; refusing to overwrite it")
    check_base(base)

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
