"""The real conf/ tree composes, validates, and reports every problem at once."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from conftest import cli
from orchestrator.config import CONF_DIR, ConfigError, compose, validate
from orchestrator.train_loop import check_step, TrainingDiverged

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))

# Llama-3-8B's architecture, enough for the model-aware checks (they never read weights).
LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name, tmp_path, demo_root):
    run = compose([f"experiment={name}", f"output_dir={tmp_path}"])
    validate(run, environment=False)


def test_demo_validates_against_its_model_and_data(tmp_path, demo_root):
    validate(compose(["experiment=demo", f"output_dir={tmp_path}"]))


def test_realistic_8b_experiment_fails_only_on_missing_gpus(tmp_path, demo_model):
    from orchestrator import demo

    model = tmp_path / "Meta-Llama-3-8B"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA3_8B))
    for f in [*demo_model.glob("tokenizer*"), demo_model / "chat_template.jinja"]:
        shutil.copy(f, model)
    data = tmp_path / "chat.jsonl"
    data.write_text(demo.DEMO_CHAT_DATA.read_text() * 4)  # 256 rows: two global batches of 128
    run = compose(["experiment=llama3_8b_qlora", f"output_dir={tmp_path / 'out'}", f"model.path={model}",
                   f"data.path={data}"])
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

    run = compose(["experiment=demo", f"output_dir={tmp_path}", "adapter.r=0", "data.path=/nonexistent.jsonl",
                   "cluster.num_workers=64", "data.max_seq_len=100000", "adapter.target_modules=[q_proj,qkv_proj]",
                   "strategy=single"])
    with pytest.raises(ConfigError) as e:
        validate(run)
    problems = "\n".join(e.value.problems)
    for expected in ("adapter.r: must be a positive integer, got 0",
                     "data.path: /nonexistent.jsonl: no such file",
                     "cluster.num_workers=64",
                     "data.max_seq_len: 100000 exceeds the model's context",
                     "adapter.target_modules: qkv_proj match no module of llama",
                     "strategy=single runs one process but cluster.num_workers=64"):
        assert expected in problems, problems


def test_check_step_stops_silent_failures():
    check_step(1, 2.5, 0.3)
    for loss, norm, words in ((0.0, 1.0, "exactly 0"), (float("nan"), 1.0, "loss is nan"), (1.0, float("inf"), "grad norm is inf")):
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
    assert not out.exists(), "nothing may be written or started for an invalid config"

    r = cli("train", "experiment=demo", f"output_dir={out}", "adapter.r=-1", "trainer.micro_batch_size=0", cwd=tmp_path)
    assert r.returncode == 2 and "adapter.r: must be a positive integer, got -1" in r.stderr
    assert "trainer.micro_batch_size: must be >= 1" in r.stderr and not out.exists()


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
