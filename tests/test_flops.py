"""Model FLOPs per token by the documented convention (orchestrator/flops.py), and the peak."""

from __future__ import annotations

import pytest
import torch

from orchestrator.adapters import attach_adapter
from orchestrator.config.schema import AdapterConfig, ModelConfig, QuantConfig
from orchestrator.flops import FlopCounter, cuda_peak_flops, peak_flops
from orchestrator.model import load_base


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_counts_frozen_matmuls_trainable_params_and_causal_attention(demo_model, quant):
    base = load_base(ModelConfig(path=str(demo_model), dtype="fp32"), QuantConfig(kind=quant))
    c = base.config
    h, inter, layers, vocab = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = c.num_key_value_heads * (h // c.num_attention_heads)
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    head = vocab * h
    model = attach_adapter(base, AdapterConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora = layers * 4 * (h + h) + layers * 4 * (h + kv)  # A: r x in, B: out x r, for q and v
    counter = FlopCounter.of(model, c)
    assert counter == FlopCounter(layers * per_layer + head, lora, layers, h)
    n = 10
    assert counter.sequence(n) == n * (4 * counter.frozen_matmul + 6 * lora) + 3 * layers * 4 * h * n * (n + 1) / 2
    assert counter.batch([n, 3]) == counter.sequence(n) + counter.sequence(3)


def test_peak_is_looked_up_measured_or_overridden():
    assert cuda_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert cuda_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert cuda_peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 494e12  # TF32
    assert cuda_peak_flops("Some Future GPU", "bf16") is None
    assert peak_flops(torch.device("cpu"), "bf16", 2.5) == (2.5e12, "trainer.peak_tflops")
    rng = torch.get_rng_state()
    measured, source = peak_flops(torch.device("cpu"), "fp32")
    assert source == "measured matmul (cpu)" and 1e8 < measured < 1e14
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's stream, restored on resume, is untouched
