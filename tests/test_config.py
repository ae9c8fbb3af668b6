"""The real conf/ tree composes, validates, and reports every problem at once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import fields
from typing import get_type_hints

import pytest
from conftest import cli

from orchestrator.config import CONF_DIR, ConfigError, RunConfig, TrainerConfig, as_dict, compose, validate
from orchestrator.config.compose import check_group_overrides, group_options
from orchestrator.config.schema import flatten
from orchestrator.train_loop import TrainingDiverged, check_step

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Llama-3-8B's architecture, enough for the model-aware checks (they never read weights).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name, tmp_path, demo_root):
    run = compose([f"experiment={name}", f"output_dir={tmp_path}"])
    validate(run, environment=False)


def test_demo_validates_against_its_model_and_data(tmp_path, demo_root):
    validate(compose(["experiment=demo", f"output_dir={tmp_path}"]))


def test_realistic_8b_experiment_fails_only_on_missing_gpus(tmp_path, demo_model):
    import torch
    from safetensors.torch import save_file

    from orchestrator import demo

    model = tmp_path / "Meta-Llama-3-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    # Weights are checked from their headers only, so a small well-formed file stands in for 16 GB.
    save_file({"lm_head.weight": torch.zeros(2, 2)}, model / "model.safetensors")
    for f in [*demo_model.glob("tokenizer*"), demo_model / "chat_template.jinja"]:
        shutil.copy(f, model)
    data = tmp_path / "chat.jsonl"
    data.write_text(demo.DEMO_CHAT_DATA.read_text() * 4)  # 256 rows: two global batches of 128
    run = compose(
        ["experiment=llama3_8b_qlora", f"output_dir={tmp_path / 'out'}", f"model.path={model}", f"data.path={data}"]
    )
    assert run.global_batch() == 2 * 8 * 8 and run.model.gradient_checkpointing
    with pytest.raises(ConfigError) as e:
        validate(run)
    assert len(e.value.problems) == 1 and "use_gpu=true" in e.value.problems[0], e.value.problems


def test_all_problems_in_one_error(tmp_path, demo_model):
    with pytest.raises(ConfigError) as e:
        compose(["experiment=demo", f"output_dir={tmp_path}", "quant=nf5", "adapter.rank=8", "trainer.lr=fast"])
    msg = str(e.value)
    assert "quant=nf5: no such option; valid: nf4, none" in msg
    assert "adapter.rank: unknown field" in msg and "trainer.lr: expected a number, got 'fast'" in msg

    run = compose(
        [
            "experiment=demo",
            f"output_dir={tmp_path}",
            "adapter.r=0",
            "data.path=/nonexistent.jsonl",
            "cluster.num_workers=64",
            "data.max_seq_len=100000",
            "adapter.target_modules=[q_proj,qkv_proj]",
            "strategy=single",
        ]
    )
    with pytest.raises(ConfigError) as e:
        validate(run)
    problems = "\n".join(e.value.problems)
    for expected in (
        "adapter.r: must be a positive integer, got 0",
        "data.path: /nonexistent.jsonl: no such file",
        "cluster.num_workers=64",
        "data.max_seq_len: 100000 exceeds the model's context",
        "adapter.target_modules: qkv_proj match no module of llama",
        "strategy=single runs one process but cluster.num_workers=64",
    ):
        assert expected in problems, problems


# The groups whose options fill one section of RunConfig (experiment and sweep are global).
SECTIONS = {g: opts for g, opts in group_options().items() if g in {f.name for f in fields(RunConfig)}}


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in sorted(SECTIONS.items()) for o in opts])
def test_options_hold_only_what_they_change(group, option, tmp_path):
    """Defaults live in the schema dataclasses: an option YAML sets only schema fields, each to a
    value other than its default (but the field that names the option, e.g. kind: lora), and
    composing it leaves every field it does not set at the dataclass default."""
    from omegaconf import OmegaConf

    from orchestrator.config.compose import _field_type

    section = get_type_hints(RunConfig)[group]
    default = flatten(as_dict(section()))
    text = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml")) or {}
    sets = flatten(text)
    for key, value in sets.items():
        assert _field_type(f"{group}.{key}")[1] is None, f"{group}/{option}: {key} is no field of the schema"
        assert value != default.get(key) or value == option, f"{group}/{option}: {key}: {value!r} is the default"
    required = [k for k, v in flatten(as_dict(RunConfig())).items() if v == "???" and k != "output_dir"]
    run = compose([f"{group}={option}", f"output_dir={tmp_path}", *(f"{k}=/given" for k in required)])
    composed = flatten(as_dict(getattr(run, group)))
    left = [k for k in default if k not in sets and f"{group}.{k}" not in required + RESOLVED]
    assert {k: composed[k] for k in left} == {k: default[k] for k in left}


# None in the schema, a value once composed (compose.resolve): what the run will really use.
RESOLVED = ["cluster.cpus_per_worker", "data.cache_dir"]


def test_cpus_per_worker_defaults_to_the_machines_cores_on_a_local_run(tmp_path):
    cores = len(os.sched_getaffinity(0))
    one = compose(["experiment=demo", f"output_dir={tmp_path}", "cluster.num_workers=1", "strategy=single"])
    assert one.cluster.cpus_per_worker == cores
    assert compose(["experiment=demo", f"output_dir={tmp_path}"]).cluster.cpus_per_worker == max(cores // 2, 1)
    given = compose(["experiment=demo", f"output_dir={tmp_path}", "cluster.cpus_per_worker=0.5"])
    assert given.cluster.cpus_per_worker == 0.5
    remote = compose(["experiment=demo", f"output_dir={tmp_path}", "cluster.address=ray://head:10001"])
    assert remote.cluster.cpus_per_worker == 1.0  # another machine's cores are not ours to count


def test_structured_config_keeps_every_field_and_default():
    from omegaconf import OmegaConf

    from orchestrator.config.structured import structured

    assert OmegaConf.to_container(OmegaConf.structured(structured(RunConfig))) == as_dict(RunConfig())
    cfg = OmegaConf.structured(structured(RunConfig))
    cfg.strategy.name = "anything"  # Literal -> str: the valid names are to_typed's to check
    cfg.adapter.target_modules = ["q_proj"]  # Union[str, list[str]] -> Any
    cfg.quant.storage_dtype = None  # Optional stays Optional
    with pytest.raises(Exception, match="could not be converted"):
        cfg.trainer.lr = "fast"


def test_override_values_are_checked_before_composition():
    usable, problems = check_group_overrides(
        [
            "trainer.lr=fast",
            "trainer.lr=${optim.eps}",
            "adapter.r=4,8",
            "adapter.r=choice(4, x)",
            "trainer.lr=tag(log, interval(1e-4, 1e-2))",
            "quant.storage_dtype=null",
            "trainer.max_steps=null",
            "adapter.target_modules=[q_proj,v_proj]",
            "optim.betas=[0.9,fast]",
            "cluster.env.OMP_NUM_THREADS=4",
            "cluster.resources_per_worker={a: 1}",
            "model.dtype=fp8",
            "name=2024",
            "~trainer.lr",
            "cluster.env.FOO.BAR=1",
        ]
    )
    assert usable == [
        "trainer.lr=${optim.eps}",
        "adapter.r=4,8",
        "trainer.lr=tag(log, interval(1e-4, 1e-2))",
        "quant.storage_dtype=null",
        "adapter.target_modules=[q_proj,v_proj]",
        "++cluster.env.OMP_NUM_THREADS=4",
        "++cluster.resources_per_worker={a: 1}",
        "name=2024",
    ]
    assert problems == [
        "trainer.lr: expected a number, got 'fast'",
        "adapter.r: expected an integer, got 'x'",
        "trainer.max_steps: expected an integer, got None",
        "optim.betas[1]: expected a number, got 'fast'",
        "model.dtype: 'fp8' is not valid; expected one of 'bf16', 'fp16', 'fp32'",
        "~trainer.lr: a field of the schema cannot be removed; set trainer.lr=<value> instead",
        "cluster.env.FOO.BAR: unknown field; cluster.env.FOO is a value, not a mapping",
    ]
    run = compose(["experiment=demo", "output_dir=/tmp/x", "trainer.lr=${optim.eps}", "cluster.env.OMP_NUM_THREADS=4"])
    assert run.trainer.lr == 1e-8 and run.cluster.env == {"OMP_NUM_THREADS": "4"}


def test_user_config_dir_adds_options(tmp_path, demo_root):
    mine = tmp_path / "my-conf"
    (mine / "experiment").mkdir(parents=True)
    (mine / "experiment" / "mine.yaml").write_text(
        "# @package _global_\n"
        "# A user's own experiment, next to the shipped ones.\n"
        "defaults:\n"
        "  - override /strategy: zero2\n"
        "  - override /adapter: dora\n"
        "  - override /tracking: none\n"
        "name: mine\n"
        "trainer:\n"
        "  max_steps: 5\n"
        "  lr: 1.0e-3\n"
    )
    (mine / "data").mkdir()
    (mine / "data" / "mydata.yaml").write_text("path: /data/mine.jsonl\nformat: chat\n")
    assert "mine" in group_options([mine])["experiment"] and "mine" not in group_options()["experiment"]
    _, problems = check_group_overrides(["experiment=mine"])
    assert problems == ["experiment=mine: no such option; valid: " + ", ".join(group_options()["experiment"])]
    assert check_group_overrides(["experiment=mine", "data=mydata"], config_dirs=[mine]) == (
        ["experiment=mine", "data=mydata"],
        [],
    )

    run = compose(
        ["experiment=mine", "data=mydata", f"output_dir={tmp_path / 'out'}", "adapter.r=8"], config_dirs=[mine]
    )
    assert run.name == "mine" and run.strategy.name == "zero2" and run.adapter.kind == "dora" and run.adapter.r == 8
    assert run.trainer.max_steps == 5 and run.trainer.lr == 1e-3 and run.tracking.backend == "none"
    assert run.data.path == "/data/mine.jsonl" and run.data.format == "chat"
    assert (
        run.model.dtype == "fp32" and run.trainer.micro_batch_size == TrainerConfig().micro_batch_size
    )  # the rest: defaults
    validate(run, environment=False)

    with pytest.raises(ConfigError) as e:
        compose(["experiment=mine", f"output_dir={tmp_path}"], config_dirs=[mine, tmp_path / "nope"])
    assert e.value.problems == [f"config dir {tmp_path / 'nope'}: not a directory"]
    # A mistake inside a user's YAML is named with its key and file.
    (mine / "experiment" / "typo.yaml").write_text("# @package _global_\nadapter:\n  rank: 4\n")
    with pytest.raises(ConfigError, match=r"adapter.rank: Key 'rank' not in 'AdapterConfig' \(In 'experiment/typo'"):
        compose(["experiment=typo", f"output_dir={tmp_path}"], config_dirs=[mine])

    # The same directory through the CLI, as the README shows it.
    r = cli("train", "--config-dir", str(mine), "experiment=mine", "data=mydata", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "name: mine" in r.stdout and "path: /data/mine.jsonl" in r.stdout and "kind: dora" in r.stdout


def test_check_step_stops_silent_failures():
    check_step(1, 2.5, 0.3)
    for loss, norm, words in (
        (0.0, 1.0, "exactly 0"),
        (float("nan"), 1.0, "loss is nan"),
        (1.0, float("inf"), "grad norm is inf"),
    ):
        with pytest.raises(TrainingDiverged, match=words):
            check_step(7, loss, norm)


def test_partial_adapter_is_refused():
    import torch

    from orchestrator.adapters import AdapterIntegrityError, check_adapter

    expected = {"a.lora_A.weight": (8, 64), "a.lora_B.weight": (64, 8)}
    check_adapter({"a.lora_A.weight": torch.ones(8, 64), "a.lora_B.weight": torch.zeros(64, 8)}, expected)
    for bad, words in (
        ({"a.lora_A.weight": torch.ones(4, 64), "a.lora_B.weight": torch.zeros(64, 8)}, "shard"),
        ({"a.lora_A.weight": torch.ones(8, 64)}, "missing"),
        ({"a.lora_A.weight": torch.full((8, 64), float("nan")), "a.lora_B.weight": torch.zeros(64, 8)}, "NaN"),
    ):
        with pytest.raises(AdapterIntegrityError, match=words):
            check_adapter(bad, expected)


def test_cli_reports_all_problems_before_any_worker_starts(tmp_path, demo_root):
    out = tmp_path / "out"
    r = cli("train", "experiment=demo", f"output_dir={out}", "quant=nf5", "adapter.r=-1", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "quant=nf5: no such option" in r.stderr and "adapter.r: must be a positive integer, got -1" in r.stderr
    assert "Traceback" not in r.stderr
    # Nothing is written or started for an invalid config, not even Hydra's outputs/<date>/<time>.
    assert list(tmp_path.iterdir()) == [], list(tmp_path.rglob("*"))

    r = cli("train", "experiment=demo", f"output_dir={out}", "adapter.r=-1", "trainer.micro_batch_size=0", cwd=tmp_path)
    assert r.returncode == 2 and "adapter.r: must be a positive integer, got -1" in r.stderr
    assert "trainer.micro_batch_size: must be >= 1" in r.stderr and list(tmp_path.iterdir()) == []


def test_cli_names_bad_data_rows(tmp_path, demo_root):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n')
    r = cli("train", "experiment=demo", f"data.path={bad}", f"output_dir={tmp_path / 'out'}", cwd=tmp_path)
    assert r.returncode == 2 and f"{bad}:2: empty 'output'" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_cli_prints_composed_config(tmp_path, demo_root):
    r = cli("train", "experiment=demo", "adapter.r=4", "--cfg", "job", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "r: 4" in r.stdout and "kind: nf4" in r.stdout and "name: fsdp" in r.stdout


@pytest.fixture
def tiny_disk(tmp_path):
    """A 512 KiB filesystem, to run out of space for real."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_too_little_disk_for_the_checkpoints_is_refused(tiny_disk, demo_root):
    run = compose(["experiment=demo", f"output_dir={tiny_disk / 'run'}"])  # 3 step checkpoints + the adapter
    with pytest.raises(ConfigError) as e:
        validate(run)
    assert len(e.value.problems) == 1 and "KiB free but the run's checkpoints need about" in e.value.problems[0]
    validate(compose(["experiment=demo", f"output_dir={tiny_disk / 'run'}", "trainer.save_every=0", "adapter.r=2"]))


def test_a_run_saved_before_a_field_existed_still_resumes():
    """A saved config.yaml without a field added later: at its default it is no difference, set
    to anything else it is one; fields of how the run executes may change either way."""
    from orchestrator.driver import config_differences

    run = RunConfig()
    saved = as_dict(run)
    del saved["trainer"]["compile"], saved["trainer"]["loss_chunk_tokens"]
    assert config_differences(saved, run) == []
    run.trainer.loss_chunk_tokens = 0
    assert config_differences(saved, run) == ["trainer.loss_chunk_tokens: None -> 0"]
    run.trainer.loss_chunk_tokens, run.trainer.compile, run.trainer.sync_every_s = 256, True, 0.0
    assert config_differences(saved, run) == []


def test_compile_wraps_every_decoder_layer_and_is_refused_under_deepspeed(tmp_path, demo_model):
    from orchestrator.config import ModelConfig
    from orchestrator.model import load_base
    from orchestrator.strategies.fsdp import decoder_layers
    from orchestrator.train_loop import compile_layers

    model = load_base(ModelConfig(path=str(demo_model)), RunConfig().quant, "cpu")
    compile_layers(model)  # compiles lazily, at the first forward
    layers = decoder_layers(model)
    assert layers and all(layer._compiled_call_impl is not None for layer in layers)
    assert model.lm_head._compiled_call_impl is None  # the loss chunks the head itself

    run = compose(["experiment=demo", f"output_dir={tmp_path}", "strategy=zero3", "trainer.compile=true"])
    with pytest.raises(ConfigError, match="trainer.compile: not supported with strategy=zero3"):
        validate(run)
    validate(compose(["experiment=demo", f"output_dir={tmp_path}", "trainer.compile=true", "trainer.sync_every_s=0"]))
    with pytest.raises(ConfigError, match="trainer.sync_every_s: must be >= 0 seconds"):
        validate(compose(["experiment=demo", f"output_dir={tmp_path}", "trainer.sync_every_s=-1"]))
