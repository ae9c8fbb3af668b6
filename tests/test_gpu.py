"""The same training path on CUDA (nccl). Skipped where no GPU is available."""

from __future__ import annotations

import pytest
import torch
from conftest import read_metrics, train_losses

pytestmark = pytest.mark.gpu

GPU = ["cluster.use_gpu=true", "model.dtype=bf16", "trainer.save_every=0"]


@pytest.mark.parametrize("strategy", ["single", "fsdp", "zero2", "zero3"])
def test_qlora_trains_on_cuda(train_run, strategy):
    out = train_run(
        *GPU,
        "trainer.max_steps=20",
        f"strategy={strategy}",
        "cluster.num_workers=1",
        "trainer.micro_batch_size=8",
        name=strategy,
    )
    losses = train_losses(out)
    assert len(losses) == 20 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    peak = read_metrics(out)[0]["peak_memory_bytes"]
    assert 0 < peak < torch.cuda.get_device_properties(0).total_memory  # CUDA allocator figures, not host RSS


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fsdp_two_gpus_match_one(train_run):
    common = [*GPU, "trainer.max_steps=10", "adapter.dropout=0", "data.eval_fraction=0"]
    one = train_run(*common, "strategy=single", "cluster.num_workers=1", "trainer.micro_batch_size=8", name="one")
    two = train_run(*common, "strategy=fsdp", "cluster.num_workers=2", "trainer.micro_batch_size=4", name="two")
    assert train_losses(two) == pytest.approx(train_losses(one), rel=5e-3)
    assert read_metrics(two)[0]["param_bytes_per_worker"] <= 0.6 * read_metrics(one)[0]["param_bytes_per_worker"]
