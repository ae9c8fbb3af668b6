"""`orchestrator merge`: a QLoRA adapter merged into the original full-precision base."""

from __future__ import annotations

import pytest
import torch
from conftest import cli
from transformers import AutoModelForCausalLM

from orchestrator.config import ModelConfig, QuantConfig
from orchestrator.model import load_base

pytestmark = pytest.mark.slow


def test_merged_model_equals_base_plus_adapter(demo_run, demo_model, tmp_path):
    from peft import PeftModel

    run = demo_run  # trained on an NF4 base
    merged_dir = tmp_path / "merged"
    r = cli("merge", str(run / "adapter"), str(merged_dir), "--dtype", "fp32", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert list(merged_dir.glob("*.safetensors")) and (merged_dir / "tokenizer_config.json").is_file()

    ids = torch.randint(0, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = load_base(ModelConfig(path=str(demo_model), dtype="fp32"), QuantConfig(kind="none"))
    with torch.no_grad():
        plain = base(input_ids=ids).logits
        unmerged = PeftModel.from_pretrained(base, str(run / "adapter")).eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, unmerged, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-2, "the merge did not change the model"
    assert not any("lora" in k for k in merged.state_dict())

    again = cli("merge", str(run / "adapter"), str(merged_dir), cwd=tmp_path)
    assert again.returncode == 1 and "not empty" in again.stderr  # never overwrites


def test_merge_refuses_another_base(demo_run, demo_model, tmp_path):
    from orchestrator import demo

    run = demo_run
    # Same architecture, tokenizer, shapes and file sizes; other weights (a base's fine-tuned sibling).
    other = demo.build_tiny_model(tmp_path / "other", tokenizer_dir=demo_model, seed=1)
    assert (other / "model.safetensors").stat().st_size == (demo_model / "model.safetensors").stat().st_size
    r = cli("merge", str(run / "adapter"), str(tmp_path / "m"), "--base", str(other), cwd=tmp_path)
    assert r.returncode == 1 and "not the base" in r.stderr and "weights" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists()
