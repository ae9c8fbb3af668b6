"""DeepSpeed strategies without Ray or processes: config generation, user-JSON conflicts and
the static validation refusals."""

from __future__ import annotations

import json
from typing import get_args, get_type_hints

import pytest
import torch

from orchestrator.config.schema import ZERO_STAGES, RunConfig, StrategyConfig
from orchestrator.config.validate import _deepspeed_json, static_problems
from orchestrator.strategies.deepspeed import DeepSpeedConfigConflict, build_ds_config


def ds(name="zero2", **kw):
    args = dict(micro_batch_size=4, grad_accum=2, max_grad_norm=1.0, dtype="bf16", world_size=2)
    args.update(kw.pop("args", {}))
    return build_ds_config(StrategyConfig(name=name, **kw), **args)


def run_with(name: str, **strategy) -> RunConfig:
    r = RunConfig()
    r.model.path = "/nonexistent"
    r.data.path = "/nonexistent.jsonl"
    r.strategy = StrategyConfig(name=name, **strategy)
    return r


def test_zero2_config_from_the_run():
    c = ds("zero2", reduce_bucket_size=123, allgather_bucket_size=456)
    assert c["train_micro_batch_size_per_gpu"] == 4
    assert c["gradient_accumulation_steps"] == 2
    assert c["train_batch_size"] == 16
    assert c["gradient_clipping"] == 1.0
    assert c["bf16"] == {"enabled": True} and "fp16" not in c
    z = c["zero_optimization"]
    assert z["stage"] == 2 and z["reduce_bucket_size"] == 123 and z["allgather_bucket_size"] == 456
    assert "offload_optimizer" not in z and "offload_param" not in z
    assert c["zero_allow_untested_optimizer"] is True  # our bitsandbytes optimizer is a client optimizer


def test_fp32_sets_no_precision_section():
    c = ds("zero3", args={"dtype": "fp32"})
    assert "bf16" not in c and "fp16" not in c


def test_zero3_and_offload_sections():
    z3 = ds("zero3", prefetch_bucket_size=7, param_persistence_threshold=0)["zero_optimization"]
    assert z3["stage"] == 3 and z3["stage3_prefetch_bucket_size"] == 7 and z3["stage3_param_persistence_threshold"] == 0
    assert "offload_param" not in z3 and "allgather_bucket_size" not in z3
    off = ds("zero3_offload", offload=True)["zero_optimization"]
    assert (
        off["stage"] == 3
        and off["offload_optimizer"] == {"device": "cpu"}
        and off["offload_param"] == {"device": "cpu"}
    )
    z2off = ds("zero2", offload=True)["zero_optimization"]
    assert z2off["offload_optimizer"] == {"device": "cpu"} and "offload_param" not in z2off


def test_not_a_deepspeed_strategy():
    with pytest.raises(ValueError, match="not a DeepSpeed strategy"):
        ds("fsdp")


def test_user_json_merges_where_it_does_not_conflict(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "zero_optimization": {"overlap_comm": True, "stage": 2},  # same stage: fine
                "gradient_clipping": 1,  # 1 == 1.0
                "communication_data_type": "fp32",
                "bf16": {"enabled": True},
            }
        )
    )
    c = ds("zero2", ds_config=str(user))
    assert c["zero_optimization"]["overlap_comm"] is True
    assert c["zero_optimization"]["stage"] == 2
    assert c["communication_data_type"] == "fp32"
    assert c["zero_optimization"]["reduce_bucket_size"] == StrategyConfig().reduce_bucket_size


def test_user_json_conflicts_name_every_key_and_both_values(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 8,
                "gradient_clipping": 0.5,
                "zero_optimization": {"stage": 3},
            }
        )
    )
    with pytest.raises(DeepSpeedConfigConflict) as e:
        ds("zero2", ds_config=str(user))
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu: run sets 4, strategy.ds_config" in msg and "sets 8" in msg
    assert "gradient_clipping: run sets 1.0" in msg and "sets 0.5" in msg
    assert "zero_optimization.stage: run sets 2" in msg and "sets 3" in msg
    assert str(user) in msg


def test_user_json_cannot_turn_on_a_precision_the_run_does_not_use(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"fp16": {"enabled": True}}))
    with pytest.raises(DeepSpeedConfigConflict, match="fp16.enabled"):
        ds("zero2", ds_config=str(user), args={"dtype": "fp32"})


def test_user_json_unreadable(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read DeepSpeed JSON"):
        ds("zero2", ds_config=str(bad))


def test_validation_reports_ds_json_conflicts_and_missing_file(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"gradient_accumulation_steps": 4}))
    r = run_with("zero3", ds_config=str(user))
    (problem,) = _deepspeed_json(r)
    assert "gradient_accumulation_steps: run sets 1" in problem and "sets 4" in problem
    assert _deepspeed_json(run_with("zero3", ds_config=str(tmp_path / "nope.json"))) == [
        f"strategy.ds_config: {tmp_path / 'nope.json'} does not exist"
    ]


@pytest.mark.parametrize(
    "name, strategy, fragment",
    [
        ("fsdp", {"offload": True}, "strategy.offload=true with strategy=fsdp"),
        ("ddp", {"ds_config": "x.json"}, "strategy.ds_config=x.json with strategy=ddp"),
        ("zero3_offload", {"offload": False}, "use strategy=zero3 for no offload"),
        ("zero2", {"reduce_bucket_size": 0}, "strategy.reduce_bucket_size: must be >= 1"),
        ("zero3", {"param_persistence_threshold": -1}, "strategy.param_persistence_threshold: must be >= 0"),
        ("zero2", {"shard_optimizer": False}, "strategy.shard_optimizer=false with strategy=zero2"),
    ],
)
def test_static_refusals(name, strategy, fragment):
    problems = static_problems(run_with(name, **strategy))
    assert any(fragment in p for p in problems), problems


def test_static_refuses_nf4_storage_mismatch_and_fp16_under_zero():
    r = run_with("zero3")
    r.quant.kind, r.quant.storage_dtype, r.model.dtype = "nf4", "fp32", "bf16"
    assert any("quant.storage_dtype=fp32 with model.dtype=bf16 under strategy=zero3" in p for p in static_problems(r))
    r = run_with("zero2")
    r.model.dtype, r.cluster.use_gpu = "fp16", True
    assert any("model.dtype=fp16 under strategy=zero2" in p and "bf16" in p for p in static_problems(r))


def test_static_accepts_plain_zero_configs():
    for name, kw in (("zero2", {}), ("zero3", {}), ("zero3_offload", {"offload": True}), ("zero2", {"offload": True})):
        r = run_with(name, **kw)
        r.quant.kind = "nf4"
        assert static_problems(r) == [], (name, static_problems(r))


def test_build_strategy_wires_the_names():
    from orchestrator.strategies import build_strategy

    r = run_with("zero3_offload", offload=True)
    r.trainer.micro_batch_size, r.trainer.grad_accum = 3, 5
    s = build_strategy(r)
    assert s.name == "zero3_offload" and s.stage == 3
    c = s.ds_config(world_size=2)
    assert c["train_batch_size"] == 30 and c["zero_optimization"]["offload_param"] == {"device": "cpu"}


def test_zero_table_names_documented_strategies_with_an_option_each():
    from orchestrator.config.compose import group_options

    names = get_args(get_type_hints(StrategyConfig)["name"])
    assert set(ZERO_STAGES) <= set(names) and set(ZERO_STAGES.values()) <= {1, 2, 3}
    assert group_options()["strategy"] == sorted(names)  # one conf/strategy/<name>.yaml per name


@pytest.mark.parametrize("name", sorted(get_args(get_type_hints(StrategyConfig)["name"])))
def test_strategy_yamls_set_only_what_they_change(name, tmp_path):
    """Defaults live in StrategyConfig: an option names itself and sets only the fields it must
    change; composing it gives the dataclass default for every other field."""
    from dataclasses import fields

    from omegaconf import OmegaConf

    from orchestrator.config import CONF_DIR, compose

    y = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "strategy" / f"{name}.yaml"))
    assert y["name"] == name
    default = StrategyConfig()
    assert all(hasattr(default, k) and getattr(default, k) != v for k, v in y.items() if k != "name"), y
    run = compose(["experiment=demo", f"output_dir={tmp_path}", f"strategy={name}"])
    for f in fields(StrategyConfig):
        assert getattr(run.strategy, f.name) == y.get(f.name, getattr(default, f.name)), f.name


@pytest.mark.parametrize("name", sorted(ZERO_STAGES))
def test_compose_selects_the_zero_strategies(name, tmp_path):
    from orchestrator.config import compose

    run = compose(["experiment=demo", f"output_dir={tmp_path}", f"strategy={name}"])
    assert run.strategy.name == name
    assert run.strategy.offload is (name == "zero3_offload")
    assert static_problems(run) == []


def test_zero3_4bit_matmul_reads_the_weight_zero_gathers_not_a_view_kept_from_forward(monkeypatch):
    """ZeRO-3 releases a layer's gathered weight after its forward and gathers it again for its
    backward. bitsandbytes' own 4-bit matmul keeps a view of the forward's storage for backward,
    which kept every layer's gathered 4-bit weight resident until backward; ours must read the
    parameter as it is at backward (here: released, then gathered again with other bytes, so a kept
    view would give the old gradient), and otherwise compute exactly what bitsandbytes does."""
    import bitsandbytes as bnb
    from deepspeed.runtime.zero import ZeroParamStatus

    from orchestrator.strategies.deepspeed import _release_4bit_weights_after_forward

    monkeypatch.setattr(bnb, "matmul_4bit", bnb.matmul_4bit)  # the patch is process-wide: undone after
    torch.manual_seed(0)

    def layer(weight: torch.Tensor) -> bnb.nn.Linear4bit:
        m = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_storage=torch.float32)
        q = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=torch.float32)
        m.weight = q.to("cpu")  # quantized here
        return m

    w, other = torch.randn(32, 64), torch.randn(32, 64)
    x = torch.randn(3, 5, 64)
    plain, zero = layer(w), layer(w)
    regathered = layer(other).weight.data
    xp, xz = x.clone().requires_grad_(), x.clone().requires_grad_()
    yp = plain(xp)
    yp.sum().backward()

    _release_4bit_weights_after_forward()
    zero.weight.ds_id, zero.weight.ds_status = 0, ZeroParamStatus.AVAILABLE
    yz = zero(xz)
    zero.weight.data = torch.empty(0)  # released, as ZeRO does after the layer's forward
    zero.weight.data = regathered  # gathered again before its backward
    yz.sum().backward()

    assert torch.equal(yz, yp)
    expected = torch.ones_like(yz) @ bnb.functional.dequantize_4bit(regathered.view(-1, 1), zero.weight.quant_state)
    assert torch.equal(xz.grad, expected)
    assert not torch.equal(xz.grad, xp.grad)
