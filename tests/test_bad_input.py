"""No bad input reaches a worker: each kind is one clear message before anything starts, naming
the file, the line and the field (ConfigError from validate(), exit code 2 from the CLI)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import cli

from orchestrator.config import ConfigError, ModelConfig, compose, validate
from orchestrator.data.formats import MIN_ROW_CAP, DataError, iter_rows, read_rows, row_byte_cap


def _run(tmp_path: Path, *overrides: str):
    return compose(["experiment=demo", "tracking=none", f"output_dir={tmp_path / 'out'}", *overrides])


def _problems(run) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(run)
    return e.value.problems


def _demo_lines() -> list[bytes]:
    from orchestrator import demo

    return demo.DEMO_DATA.read_bytes().splitlines()


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def model_copy(demo_model, tmp_path):
    """A private copy of the demo model to break."""
    return Path(shutil.copytree(demo_model, tmp_path / "model"))


# --- 1. bytes that are not UTF-8 --------------------------------------------------------------------


def test_non_utf8_byte_is_named_with_line_column_offset_and_field(demo_root, tmp_path):
    lines = _demo_lines()
    bad = lines[3].replace(b'"output": "', b'"output": "caf\xe9 ')
    f = _write(tmp_path / "latin1.jsonl", [*lines[:3], bad, *lines[4:]])
    column = bad.index(b"\xe9") + 1
    offset = sum(len(x) + 1 for x in lines[:3]) + column - 1
    (problem,) = _problems(_run(tmp_path, f"data.path={f}"))
    assert problem == (
        f"data.path: {f}:4: not valid UTF-8: byte 0xe9 at column {column} (file offset {offset}) "
        "in field 'output'; save the file as UTF-8"
    )
    assert f.read_bytes()[offset] == 0xE9


def test_byte_order_mark_is_fine(demo_root, tmp_path):
    lines = _demo_lines()
    f = _write(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + lines[0], *lines[1:]])
    assert len(read_rows(f, "alpaca")) == len(lines)


# --- 2. oversized rows --------------------------------------------------------------------------------


def test_oversized_row_is_named_with_line_field_and_cap(demo_root, tmp_path):
    lines = _demo_lines()
    huge = json.dumps({"instruction": "Summarise.", "input": "x " * (MIN_ROW_CAP // 2 + 100), "output": "ok"}).encode()
    f = _write(tmp_path / "huge.jsonl", [*lines[:5], huge, *lines[6:]])
    (problem,) = _problems(_run(tmp_path, f"data.path={f}"))
    assert problem.startswith(
        f"data.path: {f}:6: row of 1.0 MiB is over the cap of 1.0 MiB in field 'input' "
        "(64 bytes per token of data.max_seq_len"
    ), problem
    # The cap follows max_seq_len and is generous: a row of max_seq_len tokens of real text fits many times over.
    assert row_byte_cap(128) == MIN_ROW_CAP and row_byte_cap(65536) == 64 * 65536
    long_doc = {"instruction": "Summarise.", "output": "word " * 100_000}  # 500 KB, ~100k tokens
    ok = _write(tmp_path / "long.jsonl", [*lines[:5], json.dumps(long_doc).encode(), *lines[6:]])
    validate(_run(tmp_path, f"data.path={ok}"))


def test_chat_field_of_an_oversized_row_is_its_path(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "y" * 3000}]
    f = _write(tmp_path / "c.jsonl", [json.dumps({"messages": msgs}).encode()])
    with pytest.raises(
        DataError, match=r"c.jsonl:1: row of 3.0 KiB is over the cap of 1.0 KiB in field 'messages\[1\].content'"
    ):
        read_rows(f, "chat", max_row_bytes=1024)


def test_reading_a_runaway_line_holds_no_more_than_the_cap(tmp_path):
    f = tmp_path / "runaway.jsonl"
    with f.open("wb") as out:  # 48 MiB on one line, no newline at all
        out.write(b'{"instruction": "x", "output": "')
        for _ in range(48):
            out.write(b"y" * (1 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(
            DataError, match=r"runaway.jsonl:1: row of 48.0 MiB is over the cap of 1.0 MiB in field 'output'"
        ):
            list(iter_rows(f, "alpaca", MIN_ROW_CAP))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIN_ROW_CAP, peak  # a few copies of the cap, not the 48 MiB line


@pytest.mark.parametrize("fmt", ["alpaca", "chat"])
def test_tokenizing_is_bounded_and_exact(demo_model, fmt):
    """Text is cut before tokenizing: a long row costs what max_seq_len tokens cost, and its first
    max_seq_len tokens and labels are what tokenizing it whole gives."""
    from orchestrator.data.tokenize import encode_row
    from orchestrator.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(demo_model)))
    text = " ".join(f"token{i % 97} of a long document" for i in range(20_000))  # ~600 KB
    row = (
        {"instruction": "Repeat.", "output": text}
        if fmt == "alpaca"
        else {"messages": [{"role": "user", "content": "Repeat."}, {"role": "assistant", "content": text}]}
    )
    whole = encode_row(row, fmt, tok, 10**9)
    t0 = time.perf_counter()
    for max_len in (8, 64, 512):
        assert encode_row(row, fmt, tok, max_len) == (whole[0][:max_len], whole[1][:max_len])
    assert time.perf_counter() - t0 < 2.0


# --- 3. a directory as data.path ----------------------------------------------------------------------


def test_data_path_directory_is_read_whole_or_says_what_it_lacks(demo_root, tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    for name in ("part-0.jsonl", "part-1.jsonl"):
        _write(d / name, _demo_lines()[:6])
    assert len(read_rows(d, "alpaca")) == 12  # every shard, in name order
    (d / "notes.txt").write_text("x")
    for f in ("part-0.jsonl", "part-1.jsonl"):
        (d / f).unlink()
    (problem,) = _problems(_run(tmp_path, f"data.path={d}"))
    assert problem == (
        f"data.path: {d}: is a directory that holds no data files (.jsonl, .ndjson, .json, .csv, .parquet, .arrow)"
    )
    (problem,) = _problems(_run(tmp_path, f"data.eval_path={d}"))
    assert problem.startswith(f"data.eval_path: {d}: is a directory")


# --- 4. weights cut short, garbled, or missing from a sharded checkpoint -------------------------------


def _safetensors(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "damage, words",
    [
        ("half", "truncated: {size} bytes on disk, but its header describes"),
        ("tiny", "truncated: 5 bytes, shorter than the 8-byte header length"),
        ("length", "truncated or garbled: its first 8 bytes give a header of"),
        ("json", "garbled header: its 16 header bytes are not JSON"),
        ("trailing", "corrupt: 7 bytes after the last tensor its header describes"),
        ("offsets", "garbled header: tensor 'w' (F32 [2, 2]) needs 16 bytes but its data_offsets span 8"),
    ],
)
def test_damaged_safetensors_is_named(model_copy, tmp_path, damage, words):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    if damage == "half":
        f.write_bytes(data[: len(data) // 2])
    elif damage == "tiny":
        f.write_bytes(data[:5])
    elif damage == "length":
        f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    elif damage == "json":
        f.write_bytes(struct.pack("<Q", 16) + b"{not json at all" + data[24:])
    elif damage == "trailing":
        f.write_bytes(data + b"garbage")
    else:
        _safetensors(f, {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8)
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problem.startswith(f"model.path: {f}: " + words.format(size=len(data) // 2)), problem


def test_sharded_checkpoint_with_missing_or_inconsistent_shards(model_copy, tmp_path):
    from orchestrator.weights import safetensors_header

    shard = (model_copy / "model.safetensors").rename(model_copy / "model-00001-of-00002.safetensors")
    weight_map = {n: shard.name for n in safetensors_header(shard) if n != "__metadata__"}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    weight_map["model.extra.weight"] = "model-00001-of-00002.safetensors"
    index = model_copy / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    problems = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problems == [
        f"model.path: {index} names 1 of its 2 shard file(s) that are missing from {model_copy}: "
        "model-00002-of-00002.safetensors (an interrupted download?)",
        f"model.path: {index} places 1 tensor(s) in model-00001-of-00002.safetensors whose header lacks them: "
        "model.extra.weight",
    ]
    index.write_text('{"weight_map": {"a": ')
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problem.startswith(f"model.path: {index}: garbled: not JSON")


def test_model_without_weights(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problem.startswith(f"model.path: {model_copy} holds no weights: none of model.safetensors")


# --- 5. the tokenizer -----------------------------------------------------------------------------------


def test_missing_or_garbled_tokenizer_is_named(model_copy, tmp_path):
    tok = model_copy / "tokenizer.json"
    text = tok.read_text()
    tok.write_text(text[: len(text) // 2])
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problem.startswith(f"model.path: {tok} is garbled or truncated (not JSON: "), problem
    tok.unlink()
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}"))
    assert problem.startswith(f"model.path: the tokenizer in {model_copy} cannot be loaded; {tok} is missing ("), (
        problem
    )


def test_chat_data_needs_a_chat_template(model_copy, tmp_path):
    (model_copy / "chat_template.jinja").unlink()
    cfg = json.loads((model_copy / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model_copy / "tokenizer_config.json").write_text(json.dumps(cfg))
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}", "data=demo_chat"))
    assert problem.startswith(f"data.format=chat: the tokenizer in model.path={model_copy} has no chat template")


def test_a_chat_template_that_fails_on_every_row_is_one_problem(model_copy, tmp_path):
    from orchestrator import demo

    (model_copy / "chat_template.jinja").write_text("{{ raise_exception('system messages are not supported') }}")
    (problem,) = _problems(_run(tmp_path, f"model.path={model_copy}", "data=demo_chat"))
    assert problem.startswith(
        f"data.path: {demo.DEMO_CHAT_DATA}:1: cannot be tokenized with the tokenizer in model.path={model_copy} (its "
        "chat template): TemplateError: system messages are not supported (the same for 63 more rows: "
    ), problem


# --- 6. output_dir -------------------------------------------------------------------------------------


def test_output_dir_that_is_or_sits_under_a_file(demo_root, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert _problems(_run(tmp_path, f"output_dir={f}")) == [
        f"output_dir: {f} is a file, not a directory; choose a directory for the run"
    ]
    assert _problems(_run(tmp_path, f"output_dir={f / 'sub' / 'run'}")) == [
        f"output_dir: {f / 'sub' / 'run'} cannot be created: {f} is a file, not a directory"
    ]


def test_paths_no_file_can_have(demo_root, tmp_path):
    problems = _problems(
        _run(tmp_path, f"output_dir={tmp_path / ('x' * 300)}", "data.path=''", "model.path='/tmp/a\x01b'")
    )
    assert sorted(p.split(":")[0] for p in problems) == ["data.path", "model.path", "output_dir"], problems
    assert any("too long to name a file" in p for p in problems) and any("is empty" in p for p in problems)


# --- 7. a corrupt adapter given to merge ----------------------------------------------------------------


@pytest.fixture
def fake_adapter(demo_model, tmp_path):
    """What merge reads of an adapter: a manifest naming the demo base, PEFT's config, the weights."""
    import torch
    from safetensors.torch import save_file

    from orchestrator.config import QuantConfig
    from orchestrator.model import fingerprint

    a = tmp_path / "adapter"
    a.mkdir()
    fp = fingerprint(ModelConfig(path=str(demo_model)), QuantConfig(kind="none"))
    (a / "manifest.json").write_text(json.dumps({"base_model_path": str(demo_model), "base_fingerprint": fp}))
    (a / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"]}))
    save_file(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)},
        a / "adapter_model.safetensors",
    )
    return a


def test_check_adapter_names_what_is_damaged(fake_adapter, tmp_path):
    from orchestrator.merge import BadInput, check_adapter

    check_adapter(fake_adapter)
    weights, manifest, config = (
        fake_adapter / n for n in ("adapter_model.safetensors", "manifest.json", "adapter_config.json")
    )
    good = {p: p.read_bytes() for p in (weights, manifest, config)}
    for path, data, words in [
        (weights, good[weights][:-10], f"{weights}: truncated"),
        (manifest, b'{"base_model_path": ', f"{manifest}: garbled or truncated, not JSON"),
        (manifest, b'{"base_model_path": "/x"}', f"{manifest}: garbled: expected base_model_path and base_fingerprint"),
        (config, b"[1]", f"{config}: garbled: expected a JSON object, got list"),
        (config, None, f"{config} is missing"),
    ]:
        path.write_bytes(data) if data is not None else path.unlink()
        with pytest.raises(BadInput, match="^" + re.escape(words)):
            check_adapter(fake_adapter)
        path.write_bytes(good[path])
    with pytest.raises(BadInput, match="does not exist"):
        check_adapter(tmp_path / "nope")


def test_merge_cli_on_a_truncated_adapter_exits_2_without_traceback(fake_adapter, tmp_path):
    weights = fake_adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    r = cli("merge", str(fake_adapter), str(tmp_path / "merged"), cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: merge: {weights}: truncated") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "merged").exists()


# --- 8. max_seq_len that leaves rows without a target ------------------------------------------------------


def test_max_seq_len_leaving_every_row_without_target_is_an_error(demo_root, tmp_path):
    from orchestrator import demo

    (problem,) = _problems(_run(tmp_path, "data.max_seq_len=8"))
    assert problem == (
        f"data.max_seq_len=8 leaves all 320 rows of data.path ({demo.DEMO_DATA}) without a target "
        "token: the prompt fills the first 8 tokens of every row, so truncation cuts every response "
        f"away (e.g. {demo.DEMO_DATA}:1); raise data.max_seq_len or shorten the prompts"
    )


def test_max_seq_len_leaving_some_rows_without_target_is_a_warning(demo_root, tmp_path, caplog):
    from orchestrator import demo

    validate(_run(tmp_path, "data.max_seq_len=24"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        f"data.max_seq_len=24 leaves 272 of 320 rows of data.path ({demo.DEMO_DATA}) without "
        f"a target token: their responses are cut away and they carry no loss ({demo.DEMO_DATA}:3, "
    )
    caplog.clear()
    validate(_run(tmp_path))
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_zero_loss_from_a_step_without_targets_says_so():
    from orchestrator.train_loop import TrainingDiverged, check_step

    with pytest.raises(
        TrainingDiverged, match="step 3: loss is 0 because the step's global batch holds no target token"
    ):
        check_step(3, 0.0, 0.0, n_target=0)
    with pytest.raises(TrainingDiverged, match="not gathered or dequantized"):
        check_step(3, 0.0, 0.0, n_target=17)


# --- 9. jobs with an id nobody knows -------------------------------------------------------------------------


def test_unknown_job_id_is_an_error_at_once(tmp_path):
    env = {"ORCHESTRATOR_HOME": str(tmp_path / "home"), "PATH": os.path.dirname(sys.executable)}  # no scontrol
    t0 = time.monotonic()
    r = cli("jobs", "status", "12345", env=env, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == (
        f"error: jobs status: no job '12345' in the job index {tmp_path / 'home' / 'jobs'}, where the "
        "jobs submitted from here are recorded; scontrol is not on PATH to ask Slurm about it\n"
    )
    assert time.monotonic() - t0 < 15  # a Python start-up, not a Slurm time-out


def _fake_scontrol(bin_dir: Path, body: str) -> dict:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}/bin{os.pathsep}/usr/bin"}


def test_unknown_job_id_asks_slurm_briefly(tmp_path, monkeypatch):
    from orchestrator import launch

    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "home"))
    with pytest.raises(launch.UnknownJob, match="for a Ray job submitted from elsewhere, give --address"):
        launch.load_job("raysubmit_abc")
    assert launch.load_job("raysubmit_abc", address="http://head:8265")["kind"] == "ray"

    monkeypatch.setenv(
        "PATH",
        _fake_scontrol(tmp_path / "bin", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')["PATH"],
    )
    with pytest.raises(
        launch.UnknownJob, match=r"Slurm does not know it either \(slurm_load_jobs error: Invalid job id"
    ):
        launch.load_job("12345")
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path / "bin", "echo JobId=12345 JobState=RUNNING")["PATH"])
    assert launch.load_job("12345") == {"id": "12345", "kind": "slurm"}
    monkeypatch.setenv("PATH", _fake_scontrol(tmp_path / "bin", "exec sleep 30")["PATH"])
    t0 = time.monotonic()
    with pytest.raises(launch.UnknownJob, match="Slurm did not answer `scontrol show job 12345` within 2 s"):
        launch.load_job("12345")
    assert time.monotonic() - t0 < 5

    launch.record_job("777", "slurm", run_dir="/x")
    assert launch.load_job("777")["run_dir"] == "/x"
    (launch.jobs_dir() / "778.json").write_text("{garbled")
    with pytest.raises(launch.UnknownJob, match=r"778.json cannot be read"):
        launch.load_job("778")


def test_run_on_a_garbled_config_exits_2_without_traceback(tmp_path):
    (tmp_path / "run.yaml").write_text("model: {path: [\n")
    r = cli("run", "run.yaml", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(
        "error: run: run.yaml is not a composed config (from `train --cfg job`): while parsing"
    ), r.stderr
