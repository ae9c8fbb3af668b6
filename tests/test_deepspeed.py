"""DeepSpeed ZeRO strategies trained for real (2 CPU workers, gloo) against the same references
as FSDP: one override switches the strategy and the training stays the same."""

from __future__ import annotations

import pytest
from conftest import read_metrics, train_losses
from test_train import plain_peft_eval_loss

pytestmark = pytest.mark.slow

# The shared equivalence runs (conftest) use the 32-bit paged optimizer: ZeRO hands the optimizer
# flat partitions, and bitsandbytes' 8-bit state is blockwise over whatever tensor it gets, so
# 8-bit state would differ by layout alone. param_persistence_threshold=0 makes ZeRO-3 partition
# even this tiny model's small tensors. Observed: fp32 agrees to ~2e-7 for every strategy; bf16 to
# ~7e-4 (batch shapes round differently, and DeepSpeed runs the adapter in bf16 with fp32 masters
# in the optimizer). FSDP against the same references: test_train.py.
TOLERANCE = {"bf16": 2e-3, "fp32-nf4": 1e-6}


# NF4 under both stages (the 4-bit trap: packed weights cast or flattened), the bf16 base under
# ZeRO-3 (parameters partitioned, adapter in bf16 with fp32 masters). ZeRO-2 computes the bf16 case
# the same way ZeRO-3 does, with the parameters whole.
@pytest.mark.parametrize("case,strategy", [("fp32-nf4", "zero2"), ("fp32-nf4", "zero3"), ("bf16", "zero3")])
def test_loss_curves_agree_with_single_process(equivalence_run, case, strategy):
    ref, out = equivalence_run(case, "single"), equivalence_run(case, strategy)
    assert train_losses(out) == pytest.approx(train_losses(ref), rel=TOLERANCE[case]), (
        train_losses(ref),
        train_losses(out),
    )
    base_single = read_metrics(ref)[0]["param_bytes_per_worker"]
    base_here = read_metrics(out)[0]["param_bytes_per_worker"]
    if strategy == "zero3":
        assert base_here <= 0.6 * base_single, f"{strategy} does not shard the base: {base_here} vs {base_single} bytes"
    else:  # ZeRO-2 partitions gradients and optimizer state, not parameters
        assert base_here == base_single
    optim_single = read_metrics(ref)[0]["optimizer_bytes_per_worker"]
    optim_here = read_metrics(out)[0]["optimizer_bytes_per_worker"]
    assert 0 < optim_here <= 0.6 * optim_single, f"{strategy}: optimizer state {optim_here} vs {optim_single} bytes"


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_zero_adapters_load_in_plain_peft(equivalence_run, strategy):
    out = equivalence_run("fp32-nf4", strategy)
    final_eval = [m for m in read_metrics(out) if "eval_loss" in m][-1]["eval_loss"]
    assert plain_peft_eval_loss(out, "nf4") == pytest.approx(final_eval, rel=1e-4)


def test_zero3_offload_trains_on_cpu(train_run):
    out = train_run(
        "strategy=zero3_offload",
        "quant=none",
        "trainer.max_steps=6",
        "trainer.save_every=0",
        "optim=paged_adamw_32bit",
        name="offload",
    )
    losses = train_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
