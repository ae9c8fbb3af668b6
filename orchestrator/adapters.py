"""PEFT adapters: configuration per kind, attachment, and saving with integrity checks."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from orchestrator.config.schema import AdapterConfig
from orchestrator.rundir import MANIFEST

if TYPE_CHECKING:  # peft and transformers are imported where they are used
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

ALL_LINEAR = "all-linear"


def peft_config(cfg: AdapterConfig) -> LoraConfig:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.kind == "dora",
        use_rslora=cfg.kind == "rslora",
        bias="none",
        task_type="CAUSAL_LM",
    )


def unmatched_targets(targets: str | list[str], names: dict[str, str]) -> list[str]:
    """Targets that would match no module, following PEFT's matching rules."""
    if targets == ALL_LINEAR:
        linear = [n for n, kind in names.items() if kind in ("Linear", "Linear4bit")]
        return [] if linear else [ALL_LINEAR]
    if isinstance(targets, str):  # PEFT treats a single string as a full-match regex
        return [] if any(re.fullmatch(targets, n) for n in names) else [targets]
    return [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]


def attach_adapter(model: PreTrainedModel, cfg: AdapterConfig) -> PeftModel:
    """Wrap the frozen base with a fresh adapter, identical on every worker (seeded init)."""
    from peft import get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(cfg.init_seed)
        # autocast_adapter_dtype keeps adapter weights in fp32 over a bf16 base: the optimizer
        # updates full-precision masters while the base stays small.
        return get_peft_model(model, peft_config(cfg), autocast_adapter_dtype=True)


def adapter_shapes(peft_model: PeftModel) -> dict[str, tuple[int, ...]]:
    """Expected full shapes of the saved adapter tensors, taken before any sharding."""
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def to_peft_keys(peft_model: PeftModel, trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, state_dict=trainable)


class AdapterIntegrityError(RuntimeError):
    pass


def check_adapter(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse to save a partial adapter: every tensor present, full-size, non-empty and finite.

    Sharded strategies can hand back a rank's local shard instead of the full tensor; that
    would save and load without complaint and then silently produce a different model.
    """
    problems = []
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        problems.append(f"missing tensors: {missing[:5]}{'...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors: {extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k, t in state.items():
        if k in expected and tuple(t.shape) != expected[k]:
            problems.append(
                f"{k}: shape {tuple(t.shape)} but the adapter defines {expected[k]} (a shard, not the full tensor?)"
            )
        elif t.numel() == 0:
            problems.append(f"{k}: empty tensor")
        elif not torch.isfinite(t).all():
            problems.append(f"{k}: contains NaN or inf")
    if problems:
        raise AdapterIntegrityError("adapter failed its save-time check:\n  " + "\n  ".join(problems))


def save_adapter(
    peft_model: PeftModel,
    trainable: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    out_dir: Path,
    manifest: dict,
) -> None:
    """Check, then write adapter_config.json + adapter_model.safetensors (plain PEFT format) and
    manifest.json. `trainable` holds full tensors under the model's parameter names."""
    trainable = {k: v.detach().to("cpu").contiguous() for k, v in trainable.items()}
    check_adapter(to_peft_keys(peft_model, trainable), expected)
    peft_model.save_pretrained(str(out_dir), state_dict=trainable, safe_serialization=True)
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
