"""The memory planner: its arithmetic against hand-computed figures, its activation coefficients
against the tensors autograd really keeps, the CLI (table, JSON, --device-memory advice), and
`orchestrator train` refusing a run that cannot fit. Nothing here reads weights: the model
directories hold config.json only."""

from __future__ import annotations

import json
import math

import pytest
from conftest import cli

from orchestrator import plan as P

# A Llama small enough to count by hand: hidden 64, MLP 128, 4 heads of 16 (2 for k/v), 2 layers,
# vocabulary 100, untied head.
TINY = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)
# q, o: 64x64; k, v: 64x32; gate, up, down: 64x128; two RMSNorms of 64
LINEAR = 2 * 4096 + 2 * 2048 + 3 * 8192  # 36864 per layer
LAYER = LINEAR + 2 * 64
BASE = 100 * 64 + 2 * LAYER + 64 + 100 * 64  # embeddings, layers, final norm, head
# LoRA r=8: r * (in + out) per adapted linear
ADAPTER_PER_LAYER = 8 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
ADAPTER = 2 * ADAPTER_PER_LAYER


@pytest.fixture
def config_only(tmp_path):
    """A model directory with config.json and nothing else: no weights, no tokenizer."""
    d = tmp_path / "config-only"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(TINY))
    return d


def run_for(model_dir, *overrides):
    from orchestrator.config import compose

    return compose(
        [
            "experiment=demo",
            f"model.path={model_dir}",
            "output_dir=unused",
            "adapter.r=8",
            "adapter.dropout=0",
            "data.max_seq_len=32",
            "trainer.micro_batch_size=2",
            *overrides,
        ]
    )


def item(plan, strategy, phase, name):
    return sum(i.bytes for i in getattr(plan.plans[strategy], phase) if i.name == name)


def test_counts_and_bytes_match_hand_arithmetic(config_only):
    run = run_for(config_only, "model.dtype=fp32", "quant=none", "optim=adamw", "cluster.num_workers=2")
    plan = P.make_plan(run, device_memory=2**40)
    s = plan.shape
    assert (s.base_params, s.adapter_params, s.layers, s.adapted_per_layer) == (BASE, ADAPTER, 2, 7)
    assert item(plan, "ddp", "steady", "base weights held") == 4 * BASE
    # FSDP2 shards every parameter on dim 0 (all dims here are even): half of it
    assert item(plan, "fsdp", "steady", "base weights held") == 4 * BASE // 2
    assert item(plan, "fsdp", "steady", "adapter parameters (fp32)") == 4 * ADAPTER
    assert item(plan, "fsdp", "steady", "adapter gradients (fp32)") == 4 * ADAPTER
    # each of 2 workers steps half of the adapter (strategy.shard_optimizer, whole tensors balanced)
    assert item(plan, "ddp", "steady", "optimizer state (adamw)") == 8 * ADAPTER // 2
    replicated = P.make_plan(
        run_for(
            config_only, "model.dtype=fp32", "optim=adamw", "cluster.num_workers=2", "strategy.shard_optimizer=false"
        ),
        2**40,
    )
    assert item(replicated, "ddp", "steady", "optimizer state (adamw)") == 8 * ADAPTER
    # ZeRO-3 partitions what is at least strategy.param_persistence_threshold (100k) elements and
    # keeps smaller tensors whole next to their partition: every tensor here is smaller.
    assert item(plan, "zero3", "steady", "base weights held") == 4 * BASE + 4 * sum(
        math.ceil(p.numel / 2) for p in s.base
    )
    # activations: 2 layers x 64 tokens x (24 h + 16 i + 8 kv + 4 heads + 4 r x 7 modules) in fp32
    tokens = 2 * 32
    per_token = 24 * 64 + 16 * 128 + 8 * 32 + 4 * 4 + 4 * 8 * 7
    assert item(plan, "single", "steady", "activations: saved by every layer") == 2 * tokens * per_token
    # the chunked loss (trainer.loss_chunk_tokens=256 > 64 tokens): one chunk's logits, fp32 and
    # softmax, plus the target rows' hidden states and their gradient
    assert item(plan, "single", "steady", "activations: loss chunk (logits of one chunk)") == tokens * 100 * (4 + 8)
    unchunked = P.make_plan(run_for(config_only, "model.dtype=fp32", "trainer.loss_chunk_tokens=0"), 2**40)
    assert item(unchunked, "single", "steady", "activations: logits and loss") == tokens * 100 * (4 + 12)
    # every figure is a sum of its items, and the peak the larger phase
    for p in plan.plans.values():
        assert p.peak_bytes == max(sum(i.bytes for i in p.load), sum(i.bytes for i in p.steady))


def test_nf4_bytes_and_constants(config_only):
    run = run_for(config_only, "model.dtype=bf16", "quant=nf4", "cluster.num_workers=2")
    plan = P.make_plan(run, device_memory=2**40)
    # linear weights packed 2 per byte, embeddings, norms and head stay bf16
    whole = 2 * LINEAR // 2 + 2 * (100 * 64 + 2 * 2 * 64 + 64 + 100 * 64)
    assert item(plan, "ddp", "steady", "base weights held") == whole
    # double quantization: 1 byte per block of 64, an fp32 absmax per 256 blocks, two codes
    per_weight = {
        n: math.ceil(n / 64) + 4 * math.ceil(math.ceil(n / 64) / 256) + 256 * 4 + 16 * 4 for n in (4096, 2048, 8192)
    }
    constants = 2 * (2 * per_weight[4096] + 2 * per_weight[2048] + 3 * per_weight[8192])
    assert item(plan, "fsdp", "steady", "NF4 constants") == constants
    assert item(plan, "zero3", "load", "NF4 constants") == constants  # replicated under every strategy


def test_nf4_constants_match_bitsandbytes():
    """The formula against the QuantState bitsandbytes really builds, with and without double
    quantization."""
    import torch
    from bitsandbytes.functional import quantize_4bit

    w = torch.randn(256, 320)
    for dq in (False, True):
        packed, state = quantize_4bit(w, quant_type="nf4", compress_statistics=dq, quant_storage=torch.float32)
        tensors = [state.absmax, state.code]
        if dq:
            tensors += [state.state2.absmax, state.state2.code]
        assert sum(t.numel() * t.element_size() for t in tensors) == P.nf4_constants_bytes(w.numel(), dq)
        assert packed.numel() * packed.element_size() == P.nf4_packed_bytes(w.numel(), 4)


def test_optimizer_state_follows_bitsandbytes_8bit_threshold():
    # under 4096 elements bitsandbytes keeps 32-bit state; at or above, a byte per moment
    assert P.optimizer_state_bytes([4095], "paged_adamw_8bit") == 8 * 4095
    assert P.optimizer_state_bytes([4096], "paged_adamw_8bit") == 2 * 4096 + 2 * 4 * 16
    assert P.optimizer_state_bytes([4096], "adamw") == P.optimizer_state_bytes([4096], "paged_adamw_32bit") == 8 * 4096


@pytest.mark.parametrize(
    "dtype,dropout,checkpointing", [("fp32", 0.0, False), ("bf16", 0.1, False), ("fp32", 0.05, True)]
)
def test_activation_formula_matches_saved_tensors(config_only, dtype, dropout, checkpointing):
    """What autograd keeps for one micro-batch of a real (random) model of this shape with this
    adapter, measured with saved_tensors_hooks, against the planner's layer term."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from orchestrator.adapters import peft_config

    run = run_for(
        config_only,
        f"model.dtype={dtype}",
        f"adapter.dropout={dropout}",
        f"model.gradient_checkpointing={checkpointing}",
    )
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_only), dtype=torch_dtype)
    model.requires_grad_(False)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, peft_config(run.adapter), autocast_adapter_dtype=True).train()
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            saved[s.data_ptr()] = max(saved.get(s.data_ptr(), 0), s.nbytes())
        return t

    b, s = run.trainer.micro_batch_size, run.data.max_seq_len
    ids = torch.randint(0, 100, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    predicted = P.activation_bytes(P.model_shape(run), run, b * s, "cuda")  # no CPU allocator slack
    layers = predicted.get("saved by every layer", 0) + predicted.get("layer inputs (checkpointed)", 0)
    # not per layer: the final norm (and without checkpointing the last layer's output) and the log-softmax
    outside = b * s * ((1 if checkpointing else 2) * 64 * 4 + 100 * 4)
    assert sum(saved.values()) == pytest.approx(layers + outside, rel=0.1)


def plan_cli(capsys, *args):
    """`orchestrator plan ARGS` in this process (what the command runs, without a new interpreter):
    (exit code, stdout, stderr)."""
    from orchestrator.cli import main

    code = 0
    try:
        main(["plan", *args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_reads_config_json_only(config_only, capsys):
    code, stdout, stderr = plan_cli(capsys, f"model.path={config_only}", "cluster.num_workers=2", "--json")
    assert code == 0, stderr[-3000:]
    out = json.loads(stdout)
    assert set(out["strategies"]) == set(P.STRATEGIES)
    chosen = out["strategies"][out["run"]["strategy"]]
    assert out["peak_bytes_per_worker"] == chosen["peak_bytes"] == max(chosen["load_bytes"], chosen["steady_bytes"])
    assert out["model"]["base_params"] == BASE and out["model"]["model_type"] == "llama"
    for s in out["strategies"].values():
        assert s["load_bytes"] == sum(i["bytes"] for i in s["load"])
        assert s["steady_bytes"] == sum(i["bytes"] for i in s["steady"])


def test_cli_table_and_device_memory_advice(config_only, capsys):
    code, stdout, stderr = plan_cli(
        capsys, f"model.path={config_only}", "cluster.num_workers=2", "--device-memory", "64GiB"
    )
    assert code == 0, stderr[-3000:]
    assert "fsdp (chosen)" in stdout and "zero3_offload" in stdout
    assert "steady state" in stdout and "fits: fsdp needs" in stdout

    run = run_for(config_only, "cluster.num_workers=2", "trainer.micro_batch_size=8", "data.max_seq_len=256")
    full = P.make_plan(run, device_memory=2**40)
    small_batch = P.make_plan(P._variant(run, "fsdp", 1, False), device_memory=2**40).chosen.peak_bytes
    # room for micro-batch 1 but not 8: the advice names a smaller micro-batch, same global batch
    between = (small_batch + full.chosen.peak_bytes) // 2
    advice = P.make_plan(run, device_memory=between).advice
    assert advice.startswith("does not fit") and "trainer.micro_batch_size=" in advice
    assert "trainer.micro_batch_size=8 " not in advice
    micro = int(advice.split("trainer.micro_batch_size=")[1].split()[0])
    accum = int(advice.split("trainer.grad_accum=")[1].split()[0])
    assert micro * accum == 8

    code, stdout, _ = plan_cli(capsys, f"model.path={config_only}", "--device-memory", "100MB")
    assert code == 0 and "nothing fits 95.37 MiB per worker" in stdout


def test_cli_rejects_bad_sizes_and_models(tmp_path, config_only, capsys):
    code, _, stderr = plan_cli(capsys, f"model.path={config_only}", "--device-memory", "lots")
    assert code == 2 and "--device-memory" in stderr and "24GiB" in stderr
    code, _, stderr = plan_cli(capsys, f"model.path={tmp_path}")
    assert code == 2 and "config.json" in stderr
    assert P.parse_bytes("24GiB") == 24 * 2**30 and P.parse_bytes("80GB") == 80 * 10**9
    assert P.parse_bytes("1.5 TiB") == int(1.5 * 2**40)
    for bad in ("0GiB", "9" * 400, "-1GB", "24 GiBs"):
        with pytest.raises(ValueError):
            P.parse_bytes(bad)


def test_train_refuses_a_run_that_cannot_fit(demo_model, tmp_path):
    out = tmp_path / "refused"
    r = cli(
        "train",
        "experiment=demo",
        "tracking=none",
        f"output_dir={out}",
        "trainer.device_memory=300MiB",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "does not fit in memory" in r.stderr and "trainer.check_memory=false" in r.stderr
    assert "fsdp (chosen)" in r.stderr and "peak per worker" in r.stderr  # the table
    assert not out.exists()
    bad = cli("train", "experiment=demo", f"output_dir={out}", "trainer.device_memory=huge", cwd=tmp_path)
    assert bad.returncode == 2 and "trainer.device_memory: 'huge' is not a memory size" in bad.stderr


@pytest.mark.slow
def test_probe_trains_two_steps_and_refits_the_overhead(demo_model, capsys):
    code, stdout, stderr = plan_cli(
        capsys,
        "experiment=demo",
        "strategy=single",
        "cluster.num_workers=1",
        "trainer.micro_batch_size=8",
        "--probe",
        "--json",
    )
    assert code == 0, stderr[-3000:]
    out = json.loads(stdout)
    measured = out["measured"]
    assert 0 < measured["start"] <= measured["steady_peak"]
    # after the refit the chosen strategy's steady figure is the measured one (the overhead moved)
    assert out["after"]["steady_bytes_per_worker"] == pytest.approx(measured["steady_peak"], abs=16)
    assert out["refitted"]["cpu_worker_bytes"] != P.CALIBRATION["cpu_worker_bytes"]  # restored after
    assert out["before"]["strategies"]["fsdp"]["steady_bytes"] != out["after"]["strategies"]["fsdp"]["steady_bytes"]


def test_the_load_unit_of_llama3_8b_is_its_embeddings_not_the_whole_root(tmp_path):
    """At a 128k vocabulary the embeddings and the untied head are each larger than a decoder
    layer; the loader fills them one at a time, and the plan's load peak holds one of them."""
    from orchestrator import demo

    run = run_for(demo.write_llama3_config(tmp_path / "8b", "8b"), "quant=none", "model.dtype=bf16")
    shape = P.model_shape(run)
    embeddings = 128256 * 4096 * 2
    layer = sum(p.numel for p in shape.base if p.layer == 0) * 2
    assert layer < embeddings
    assert P._source_layer_bytes(shape, run, 2) == embeddings  # not 2x: embeddings and head apart
    (filled,) = [i for i in P.load_items(shape, run, "fsdp", 8, "cuda") if i.name == "layer being filled"]
    assert filled.bytes == embeddings
