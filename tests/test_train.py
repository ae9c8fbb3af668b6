"""End-to-end training on the shared local Ray instance (2 CPU workers, gloo)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ONE_PROCESS, read_metrics, train_losses
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def plain_peft_eval_loss(out, quant: str) -> float:
    """Eval loss of the saved adapter loaded with nothing but transformers + PEFT on an unsharded
    base, over the same held-out rows the run evaluated."""
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestrator.config.schema import RunConfig
    from orchestrator.config.typed import to_typed
    from orchestrator.data import collate, encode_rows, split_rows, target_tokens
    from orchestrator.model import bnb_config

    run = to_typed(yaml.safe_load((out / "config.yaml").read_text()), RunConfig)
    kwargs = {"dtype": getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[run.model.dtype])}
    if quant == "nf4":
        kwargs["quantization_config"] = bnb_config(run.model, run.quant)
    base = AutoModelForCausalLM.from_pretrained(run.model.path, **kwargs)
    model = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    # CPU only: in eval mode bitsandbytes repacks 4-bit weights for a separate AVX512-BF16
    # inference kernel, whose rounding differs from the training kernel (~3e-4 in loss) and whose
    # layout PEFT's DoRA misreads for its weight norm (~1%, an upstream bug). Keep the kernel the
    # run trained and evaluated with, as load_base does; nothing else about loading changes.
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    tok = AutoTokenizer.from_pretrained(run.model.path)
    d = run.data
    _, eval_rows = split_rows(d.path, d.format, d.eval_path, d.eval_fraction, run.trainer.seed)
    examples = encode_rows(eval_rows, run.data.format, tok, run.data.max_seq_len)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            chunk = examples[i : i + 4]
            k = target_tokens(chunk, range(len(chunk)))
            total += model(**collate(chunk, tok.pad_token_id), num_items_in_batch=k).loss.item() * k
            n += k
    return total / n


def test_demo_qlora_fsdp_end_to_end(demo_run):
    out = demo_run  # the demo experiment as shipped
    metrics = read_metrics(out)
    losses = train_losses(out)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, f"loss did not fall clearly: {losses}"
    for m in metrics:
        if "loss" in m:
            assert {"lr", "grad_norm", "tokens_per_s", "mfu", "peak_memory_bytes"} <= set(m)
            assert m["tokens_per_s"] > 0 and math.isfinite(m["grad_norm"])
            assert 0 < m["mfu"] < 1  # against a measured matmul peak on CPU

    adapter = out / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {p.name for p in adapter.iterdir()}
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors), "adapter file must hold adapter tensors only"
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k), "adapter did not train"
    manifest = json.loads((adapter / "manifest.json").read_text())
    assert manifest["step"] == 30 and len(manifest["base_fingerprint"]["sha256"]) == 64
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["versions"])
    for step in (10, 20, 30):
        assert (out / "checkpoints" / f"step-{step}" / "adapter" / "adapter_model.safetensors").is_file()
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb")), "W&B offline run missing"

    # The adapter, loaded in plain PEFT on an unsharded NF4 base, is the model that was trained.
    final_eval = [m for m in metrics if "eval_loss" in m][-1]["eval_loss"]
    assert plain_peft_eval_loss(out, "nf4") == pytest.approx(final_eval, rel=1e-4)


def test_a_local_ray_starts_no_actor_that_has_nothing_to_do(demo_run):
    """On a Ray this process started, Ray Train starts only its controller, the workers and their
    barrier: not the dataset manager (no Ray datasets), the placement-group cleaner, the preemption
    watcher or the autoscaling coordinator, each a process of its own whose start-up delayed the
    first step. Ray names every actor's process in its session logs."""
    from orchestrator import ray_logs

    started = set()
    for f in ray_logs._ray_logs_dir().glob("worker-*.out"):
        started |= {line.split(":actor_name:", 1)[1].strip() for line in f.open() if ":actor_name:" in line}
    assert "TrainController" in started and "RayTrainWorker" in started, started  # the logs name actors
    idle = {"DatasetManager", "PlacementGroupCleaner", "PreemptionWatcher", "_AutoscalingCoordinatorActor"}
    assert not started & idle, started


# Observed: fp32 agrees to ~2e-7, bf16 to ~7e-4 (different batch shapes round differently).
TOLERANCE = {"fp32": 1e-6, "bf16": 2e-3, "fp32-nf4": 1e-6, "bf16-nf4": 2e-3}


@pytest.mark.parametrize("case", list(TOLERANCE))
def test_fsdp_two_workers_match_single_process(equivalence_run, case):
    """Same seed and global batch: FSDP2 across 2 workers follows the single-process loss curve,
    and each FSDP worker holds about half of the base and of the optimizer state (the latter
    sharded by default, bit-identical to keeping it whole: test_optimizer_shard.py)."""
    single, fsdp = equivalence_run(case, "single"), equivalence_run(case, "fsdp")
    ls, lf = train_losses(single), train_losses(fsdp)
    assert len(ls) == len(lf) == 10
    assert lf == pytest.approx(ls, rel=TOLERANCE[case]), f"single {ls}\nfsdp   {lf}"
    assert ls[-1] < ls[0]
    bytes_single = read_metrics(single)[0]["param_bytes_per_worker"]
    bytes_fsdp = read_metrics(fsdp)[0]["param_bytes_per_worker"]
    assert bytes_fsdp <= 0.6 * bytes_single, f"base not sharded: {bytes_fsdp} vs {bytes_single} bytes"
    optim_single = read_metrics(single)[0]["optimizer_bytes_per_worker"]
    optim_fsdp = read_metrics(fsdp)[0]["optimizer_bytes_per_worker"]
    assert 0 < optim_fsdp <= 0.6 * optim_single, f"optimizer state not sharded: {optim_fsdp} vs {optim_single} bytes"


# DoRA's magnitude vectors need the whole base weight, so DoRA trains under FSDP; rsLoRA only
# rescales, and trains in one process.
@pytest.mark.parametrize("kind,shape", [("dora", []), ("rslora", ONE_PROCESS)])
def test_dora_and_rslora_train_and_load_in_peft(train_run, kind, shape):
    out = train_run(f"adapter={kind}", "trainer.max_steps=4", "trainer.save_every=0", *shape, name=kind)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is (kind == "dora") and cfg["use_rslora"] is (kind == "rslora")
    if kind == "dora":
        assert any("lora_magnitude_vector" in k for k in load_file(out / "adapter" / "adapter_model.safetensors"))
    final_eval = [m for m in read_metrics(out) if "eval_loss" in m][-1]["eval_loss"]
    assert plain_peft_eval_loss(out, "nf4") == pytest.approx(final_eval, rel=1e-4)


# Qwen2 under FSDP (its decoder layers found and sharded), Mistral in one process.
@pytest.mark.parametrize("arch,shape", [("qwen2", []), ("mistral", ONE_PROCESS)])
def test_other_architectures_train_through_model_path(train_run, demo_model, tmp_path, arch, shape):
    from orchestrator import demo

    path = demo.build_tiny_model(tmp_path / arch, tokenizer_dir=demo_model, arch=arch)
    out = train_run(f"model.path={path}", "trainer.max_steps=3", "trainer.save_every=0", *shape, name=arch)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    adapted = {name.rsplit(".", 1)[-1] for name in cfg["target_modules"]}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(train_losses(out)) == 3


def test_keep_last_and_keep_best_prune_step_checkpoints(train_run):
    from orchestrator import checkpoint

    out = train_run(
        "trainer.max_steps=8",
        "trainer.save_every=2",
        "trainer.eval_every=2",
        "trainer.keep_last=1",
        "trainer.keep_best=true",
        *ONE_PROCESS,
        name="prune",
    )
    evals = {m["step"]: m["eval_loss"] for m in read_metrics(out) if "eval_loss" in m and m["step"] < 8}
    best = min(evals, key=evals.get)
    kept = [n for n, _ in checkpoint.step_checkpoints(out / "checkpoints")]
    assert kept == sorted({best, 8}), (kept, evals)
    assert checkpoint.eval_loss(out / "checkpoints" / f"step-{best}") == evals[best]


def test_steps_sync_in_windows_that_end_at_every_save_and_change_no_number(train_run, monkeypatch):
    """The host waits for the device, the workers agree on the losses and look for a stop
    request once per window of steps (trainer.sync_every_s), not after each: fewer syncs than
    steps, every save and the last step ending a window, and the same losses and adapter as
    syncing after every step."""
    from conftest import assert_same_adapter

    from orchestrator import train_loop

    windows: list[list[int]] = []
    real_sync = train_loop.sync

    def recording_sync(job, pending, window_start):
        windows.append([p.step for p in pending])
        return real_sync(job, pending, window_start)

    monkeypatch.setattr(train_loop, "sync", recording_sync)
    common = ["trainer.max_steps=12", "trainer.save_every=5", *ONE_PROCESS]
    windowed = train_run(*common, "trainer.sync_every_s=60", name="windowed")
    assert [s for w in windows for s in w] == list(range(1, 13))
    assert len(windows) < 12 and all(s in (w[-1] for w in windows) for s in (5, 10, 12)), windows
    windows.clear()
    every = train_run(*common, "trainer.sync_every_s=0", name="every-step")
    assert windows == [[s] for s in range(1, 13)]

    assert [m["step"] for m in read_metrics(windowed) if "loss" in m] == list(range(1, 13))
    assert train_losses(windowed) == train_losses(every)
    assert_same_adapter(windowed, every)
