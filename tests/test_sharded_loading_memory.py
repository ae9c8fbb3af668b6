"""No worker holds the whole base (issue 13, item 2): a 1.6 GB fp32 base loads and trains one step
on two workers, under fsdp and zero3, each with the fp32 base and with it in NF4, while this
process samples each worker's private memory (USS) from outside. Above the same run on the tiny
demo model, a worker's peak while loading must stay under 0.65x the base's bytes: its half of the
base plus about one layer (7% here), where loading the whole base first cost 1.24x (fsdp) and
2.17x (zero3).

Loading ends where rank 0 writes summary.json (after every worker has loaded: it follows a
collective), and the sampler stops counting there. The steps' own peak (each worker's VmHWM over
the steps, in metrics.jsonl) must then be the planner's steady-state prediction within 15%: the
shard, the gathered layers and the step's tensors. ZeRO-3 trains two steps: its first traces the
module order and releases every layer after use; from the second on it prefetches up to
strategy.max_live_parameters elements (DeepSpeed's 1e9, more than this whole base), its steady
state (README)."""

from __future__ import annotations

import threading

import psutil
import pytest
from conftest import predicted_and_measured, train

pytestmark = pytest.mark.slow

LIMIT = 0.65
# One short sequence per worker a step (two steps under zero3, one otherwise), no eval, nothing
# saved but the final adapter: the memory of interest is loading and the steady state, and
# everything else only costs suite time.
CHEAP = [
    "cluster.num_workers=2",
    "trainer.micro_batch_size=1",
    "trainer.grad_accum=1",
    "trainer.save_every=0",
    "data.eval_fraction=0",
    "data.max_seq_len=64",
    "model.dtype=fp32",
]


class WorkerPeaks(threading.Thread):
    """Peak USS of every Ray Train worker process under this one (the session's Ray), every 20 ms,
    until `until` exists."""

    def __init__(self, until):
        super().__init__(daemon=True)
        self.until = until
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()
        self.ended = False

    def run(self) -> None:
        me = psutil.Process()
        while not self.done.wait(0.02):
            if self.until.exists():
                self.ended = True
                return
            for p in me.children(recursive=True):
                try:
                    if "RayTrainWorker" in " ".join(p.cmdline()):
                        self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.memory_full_info().uss)
                except psutil.Error:  # exited between listing and reading
                    pass

    def __enter__(self) -> WorkerPeaks:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def peak_uss(out, model, *overrides: str) -> int:
    """The largest of the two workers' peak private memory while they load."""
    with WorkerPeaks(until=out / "summary.json") as w:
        train(out, f"model.path={model}", *CHEAP, *overrides)
    assert w.ended, "summary.json never appeared: the load phase had no end the sampler could see"
    assert len(w.peaks) == 2, f"expected 2 Ray Train workers, sampled {sorted(w.peaks)}"
    return max(w.peaks.values())


@pytest.fixture(scope="module")
def big_base(demo_model, tmp_path_factory):
    """A random fp32 Llama of 1.6 GB on disk in 14 layers of 113 MB (7% of it each), with the demo
    tokenizer."""
    from orchestrator import demo

    path = demo.build_tiny_model(
        tmp_path_factory.mktemp("big") / "llama",
        tokenizer_dir=demo_model,
        hidden_size=1536,
        intermediate_size=4096,
        num_layers=14,
        num_heads=12,
        num_kv_heads=12,
    )
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert size >= 1.5e9
    return path, size


@pytest.fixture(scope="module")
def tiny_peak(demo_model, ray_local, tmp_path_factory) -> int:
    """The same run on the tiny demo model under fsdp: what a worker costs besides the base. One
    baseline for all four runs (a tiny run costs half a minute of the suite): zero3's own is
    larger (DeepSpeed's imports and engine), so against this one the zero3 runs are held to a
    stricter bound than their own baseline would give."""
    return peak_uss(
        tmp_path_factory.mktemp("tiny-peak") / "fsdp", demo_model, "strategy=fsdp", "quant=none", "trainer.max_steps=1"
    )


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_worker_never_holds_the_whole_base(big_base, tiny_peak, ray_local, tmp_path, monkeypatch, strategy, quant):
    path, size = big_base
    steps = 2 if strategy == "zero3" else 1
    above = peak_uss(tmp_path / "big", path, f"strategy={strategy}", f"quant={quant}", f"trainer.max_steps={steps}")
    above -= tiny_peak
    print(f"{strategy} {quant}: worker peak {above / 2**20:.0f} MiB above the tiny run = {above / size:.2f}x the base")
    assert above <= LIMIT * size, f"{strategy} {quant}: {above / size:.2f}x the base's {size} bytes"
    # The steps hold what the planner predicts (issue 13, item 5): ZeRO-3 once kept every layer's
    # gathered weights until backward (1.6x the prediction), and its second step was 1.15-1.2x
    # until the planner counted a prefetch bucket landing and workers returned freed heap pages;
    # under NF4 it was 1.16-1.18x until workers mapped blocks of 128 KiB and more (not 1 MiB).
    predicted, measured, _ = predicted_and_measured(tmp_path / "big", monkeypatch)
    print(
        f"{strategy} {quant}: steps' peak {measured['steady'] / 2**20:.0f} MiB, predicted {predicted['steady'] / 2**20:.0f}"
    )
    assert predicted["steady"] == pytest.approx(measured["steady"], rel=0.15), (predicted, measured)
