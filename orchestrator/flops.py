"""Model FLOPs and MFU: how much of the device's peak the training step uses.

The convention (litgpt's and llm-foundry's, adapted to a frozen base):
- a frozen matmul weight of N parameters costs 4N FLOPs per token: 2N forward and 2N for the
  gradient of its input, which the adapter layers below it need; it gets no weight gradient;
- a trainable weight (the adapter's A and B, DoRA's magnitude) costs 6N: forward, input gradient
  and weight gradient;
- the output head is a frozen matmul and counts; the embedding lookup is not a matmul and does not;
- attention scores and the weighted sum cost 2 x 2 x d FLOPs per pair of positions forward, over
  the causal half only (a token attends to itself and the tokens before it, n(n+1)/2 pairs for a
  sequence of n), times 3 for forward and backward;
- NF4 dequantisation is not counted, so QLoRA's overhead shows as a lower MFU;
- only real tokens count: a padded position costs compute but is not model work.

MFU = model FLOPs of the step / (step seconds x workers x peak FLOP/s of one worker's device).
The peak is looked up for known CUDA devices (dense bf16/fp16 tensor-core rates; fp32 runs use
TF32), measured with a large matmul on CPU, and trainer.peak_tflops overrides both.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

# Dense (no sparsity) peak TFLOP/s of one device, by a substring of torch.cuda.get_device_name(),
# most specific first: (bf16/fp16, tf32).
CUDA_PEAK_TFLOPS = [
    ("H200", (989.0, 494.0)),
    ("H100 PCIe", (756.0, 378.0)),
    ("H100", (989.0, 494.0)),  # SXM and NVL
    ("H800", (989.0, 494.0)),
    ("GH200", (989.0, 494.0)),
    ("B200", (2250.0, 1100.0)),
    ("A100", (312.0, 156.0)),
    ("A800", (312.0, 156.0)),
    ("L40S", (362.0, 183.0)),
    ("L40", (181.0, 90.5)),
    ("L4", (121.0, 60.0)),
    ("A10G", (70.0, 35.0)),
    ("A10", (125.0, 62.5)),
    ("RTX 4090", (165.2, 82.6)),
    ("RTX 3090", (71.0, 35.6)),
    ("V100", (125.0, 15.7)),
    ("T4", (65.0, 8.1)),
]


def cuda_peak_flops(name: str, dtype: str) -> float | None:
    for key, (half, tf32) in CUDA_PEAK_TFLOPS:
        if key in name:
            return 1e12 * (tf32 if dtype == "fp32" else half)
    return None


def measured_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.2) -> float:
    """Best rate of a square matmul on this device (CPU: no table can know the cores and their
    vector units); a lower bound of the true peak, so MFU on CPU reads high rather than low."""
    # Its own generator: the training RNG streams (dropout, restored on resume) must not move.
    g = torch.Generator(device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=g)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - t0))
    return best


def peak_flops(device: torch.device, dtype: str, override_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if override_tflops:
        return override_tflops * 1e12, "trainer.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        found = cuda_peak_flops(name, dtype)
        if found is not None:
            return found, f"table ({name})"
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    if device.type == "cpu":
        torch_dtype = torch.float32  # CPU matmuls in bf16 are emulated: fp32 is the machine's peak
    return measured_peak_flops(device, torch_dtype), f"measured matmul ({device.type})"


@dataclass(frozen=True)
class FlopCounter:
    frozen_matmul: int
    """Parameters of frozen linear layers (output head included, embeddings not)."""
    trainable: int
    """Trainable parameters (the adapter)."""
    layers: int
    """Attention layers."""
    attn_dim: int
    """Width of the attention scores' dot products summed over heads (heads x head_dim)."""

    @classmethod
    def of(cls, model: nn.Module, config) -> FlopCounter:  # noqa: ANN001 - a transformers PretrainedConfig
        """Counted on the model before sharding (full shapes), with its adapter attached."""
        # bitsandbytes' Linear4bit is an nn.Linear (PEFT's wrappers are not); its packed weight's
        # numel is not its shape.
        frozen = sum(
            m.in_features * m.out_features
            for m in model.modules()
            if isinstance(m, nn.Linear) and not m.weight.requires_grad
        )
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        heads = getattr(config, "num_attention_heads", 0)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // max(heads, 1)
        return cls(frozen, trainable, config.num_hidden_layers, heads * head_dim)

    def sequence(self, n: int) -> float:
        """Training FLOPs of one sequence of n real tokens."""
        matmul = n * (4 * self.frozen_matmul + 6 * self.trainable)
        attention = 3 * self.layers * 4 * self.attn_dim * n * (n + 1) / 2
        return matmul + attention

    def batch(self, lengths: Iterable[int]) -> float:
        return sum(self.sequence(n) for n in lengths)
