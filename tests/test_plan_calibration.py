"""The planner's predictions against the peaks the workers measured (item 5 of issue 13), on the
runs the equivalence tests train anyway: no training of its own. Each worker logs the memory it
held when setup began, its peak while loading and its peak over the steps (VmHWM on CPU, reset
between the phases). The single-process references train inside the test process, whose memory is
the whole test session's, so they are not compared here; bench/plan_calibration.py compares every
strategy, single and ddp and zero3_offload included, each in a worker process of its own, on the
tiny and on a mid-size model.

Two terms belong to the machine, not to the planner, and are taken from it: the worker's own
baseline, which each run logs as start_memory_bytes (it moves with what Ray ran in that process
before), and what the steps hold beyond their counted tensors on this CPU (oneDNN and OpenMP
scratch, glibc's retention). The second is the gap between predicted and measured steady state of
the same case under fsdp, as `plan --probe` refits an overhead term from a real run. On the CPU
the defaults were calibrated on, that gap is ~10 MiB; on CI's CPU a bf16 NF4 run measured ~135 MiB
more (beyond 15% of a ~900 MiB peak). Every load figure, and every steady figure of another strategy
than the reference, is then a prediction the test holds to 15%; the reference's own gap to 256 MiB."""

from __future__ import annotations

import platform

import pytest
import torch
from conftest import predicted_and_measured

pytestmark = pytest.mark.slow

# Every (case, strategy) the equivalence tests train on 2 workers.
TRAINED = [
    ("fp32", "fsdp"),
    ("bf16", "fsdp"),
    ("fp32-nf4", "fsdp"),
    ("bf16-nf4", "fsdp"),
    ("fp32-nf4", "zero2"),
    ("fp32-nf4", "zero3"),
    ("bf16", "zero3"),
]
REFERENCE = "fsdp"
MAX_MACHINE_GAP = 256 * 2**20


@pytest.mark.parametrize("case,strategy", TRAINED)
def test_prediction_within_15_percent_of_measured_peak(equivalence_run, monkeypatch, case, strategy):
    ref_predicted, ref_measured, _ = predicted_and_measured(equivalence_run(case, REFERENCE), monkeypatch)
    machine_gap = ref_measured["steady"] - ref_predicted["steady"]
    predicted, measured, p = predicted_and_measured(equivalence_run(case, strategy), monkeypatch)
    predicted["steady"] += machine_gap
    where = (
        f"{platform.processor() or platform.machine()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    )
    detail = (predicted, measured, f"{REFERENCE} gap {machine_gap / 2**20:.0f} MiB", where, p.steady)
    assert abs(machine_gap) <= MAX_MACHINE_GAP, detail
    assert predicted["load"] == pytest.approx(measured["load"], rel=0.15), detail
    assert predicted["steady"] == pytest.approx(measured["steady"], rel=0.15), detail
