"""Data at scale: every source data.path names, every format, the tokenize-once cache and its key,
bad rows by the thousand, and hub names through a Hugging Face cache built here (no network)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, ModelConfig, compose, validate
from orchestrator.data import IGNORE_INDEX
from orchestrator.data.formats import DataError, canonical, read_rows


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def alpaca(demo_root) -> list[dict]:
    from orchestrator import demo

    return _rows(demo.DEMO_DATA)


@pytest.fixture(scope="module")
def tok(demo_model):
    from orchestrator.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(demo_model)))


def _run(tmp_path: Path, *overrides: str, out: str = "out"):
    return compose(["experiment=demo", "tracking=none", f"output_dir={tmp_path / out}", *overrides])


def _problems(run) -> list[str]:
    with pytest.raises(ConfigError) as e:
        validate(run)
    return e.value.problems


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """A data cache of each test's own, so a test sees only the caches it made."""
    monkeypatch.setenv("ORCHESTRATOR_HOME", str(tmp_path / "home"))


def _cache_dirs(tmp_path: Path) -> list[Path]:
    root = tmp_path / "home" / "data"
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


# --- sources ------------------------------------------------------------------------------------


def _write_all_kinds(rows: list[dict], d: Path) -> dict[str, str]:
    """The same rows as every kind of source data.path takes; {kind: data.path}."""
    import datasets
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    d.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    half = len(rows) // 2
    (d / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "array.json").write_text(json.dumps(rows, indent=2))
    (d / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(table, d / "rows.parquet")
    pacsv.write_csv(table, d / "rows.csv")
    with pa.ipc.new_file(d / "file.arrow", table.schema) as w:
        w.write_table(table)
    with pa.ipc.new_stream(d / "stream.arrow", table.schema) as w:
        w.write_table(table)
    shards = d / "shards"
    shards.mkdir()
    pq.write_table(table.slice(0, half), shards / "train-00000-of-00002.parquet")
    pq.write_table(table.slice(half), shards / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(0, 3), shards / "test-00000-of-00001.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(d / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:3])}
    ).save_to_disk(str(d / "saved_dict"))
    return {
        "jsonl": str(d / "rows.jsonl"),
        "json array": str(d / "array.json"),
        "json lines": str(d / "lines.json"),
        "parquet": str(d / "rows.parquet"),
        "csv": str(d / "rows.csv"),
        "arrow file": str(d / "file.arrow"),
        "arrow stream": str(d / "stream.arrow"),
        "directory": str(shards),
        "glob": str(shards / "train-*.parquet"),
        "save_to_disk": str(d / "saved"),
        "save_to_disk dict": str(d / "saved_dict"),
    }


def test_every_source_gives_the_same_rows(alpaca, tmp_path):
    rows = alpaca[:40]
    want = [canonical(r, "alpaca")[0] for r in rows]
    for kind, path in _write_all_kinds(rows, tmp_path).items():
        assert read_rows(path, "alpaca") == want, kind
    from orchestrator.data.sources import SourceSpec, read_source

    test_split = [r for _, r in read_source(SourceSpec(str(tmp_path / "saved_dict"), "alpaca", split="test"))]
    assert test_split == want[:3]
    with pytest.raises(DataError, match=r"has no split 'validation' \(data.split\); its splits: test, train"):
        list(read_source(SourceSpec(str(tmp_path / "shards"), "alpaca", split="validation")))


def test_bad_rows_are_located_in_each_kind(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = {"instruction": "a", "output": "b"}
    rows = [good, {"instruction": "a"}, good, {"instruction": "a", "output": ""}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "r.parquet", "alpaca")
    assert e.value.problems == [
        f"{tmp_path / 'r.parquet'}:row 1: missing field 'output' (data.format=alpaca rows need instruction, output and "
        "optionally input)",
        f"{tmp_path / 'r.parquet'}:row 3: empty 'output' (the response is what the model learns)",
    ]
    # JSON arrays and CSV name the line a row starts on, CSV rows spanning lines included.
    (tmp_path / "a.json").write_text(
        '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": 3,\n "output": "x"}\n]'
    )
    with pytest.raises(DataError, match=r"a.json:3: field 'instruction' must be a string, got int"):
        read_rows(tmp_path / "a.json", "alpaca")
    (tmp_path / "r.csv").write_bytes(b'instruction,output\n"multi\nline",ok\nx,\ncaf\xe9,y\n')
    with pytest.raises(DataError) as e:
        read_rows(tmp_path / "r.csv", "alpaca")
    assert [p.split(": ", 1)[0] for p in e.value.problems] == [f"{tmp_path / 'r.csv'}:4", f"{tmp_path / 'r.csv'}:5"]
    assert "not valid UTF-8: byte 0xe9 at column 4" in e.value.problems[1]


def _hub_cache(root: Path, repo_type: str, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache entry as `hf download` leaves it: refs/main and a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    snap = entry / "snapshots" / commit
    for name, src in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / name)
    return snap


def test_hub_dataset_and_model_names_resolve_through_the_local_cache(alpaca, demo_model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    rows = alpaca[:60]
    paths = _write_all_kinds(rows, tmp_path / "src")
    cache = tmp_path / "hf"
    _hub_cache(cache, "dataset", "acme/instruct", {"data/train-00000-of-00001.parquet": Path(paths["parquet"])})
    snap = _hub_cache(cache, "model", "acme/tiny", {p.name: p for p in demo_model.iterdir() if p.is_file()})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    assert read_rows("acme/instruct", "alpaca") == [canonical(r, "alpaca")[0] for r in rows]
    from orchestrator.config import QuantConfig
    from orchestrator.model import fingerprint, resolve_model_path

    assert resolve_model_path("acme/tiny") == snap
    assert (
        fingerprint(ModelConfig(path="acme/tiny"), QuantConfig())["sha256"]
        == (fingerprint(ModelConfig(path=str(demo_model)), QuantConfig())["sha256"])
    )
    validate(_run(tmp_path, "model.path=acme/tiny", "data.path=acme/instruct"))
    problems = _problems(_run(tmp_path, "model.path=acme/missing", "data.path=acme/nothing"))
    assert problems[0].startswith(
        f"model.path: acme/missing is neither a local directory nor a model in the local Hugging Face cache ({cache}"
    )
    assert problems[1].startswith(
        f"data.path: acme/nothing: no such file or directory, and not a dataset in the local Hugging Face cache "
        f"({cache}) and HF_HUB_OFFLINE=1"
    )


# --- formats ------------------------------------------------------------------------------------


def _learned(tok, ids, labels) -> str:
    return tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])


def test_formats_and_column_mapping(tok):
    from orchestrator.data.tokenize import encode_batch, encode_row

    cases = [
        ("alpaca", {"q": "Say hi.", "a": "HELLO"}, {"instruction": "q", "output": "a"}, "HELLO"),
        ("completion", {"prompt": "2+2=", "completion": "FOUR"}, {}, "FOUR"),
        ("text", {"body": "plain words"}, {"text": "body"}, "plain words"),
        (
            "sharegpt",
            {"conv": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ANSWER"}]},
            {"conversations": "conv"},
            "ANSWER",
        ),
        (
            "chat",
            {"msgs": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ANSWER"}]},
            {"messages": "msgs"},
            "ANSWER",
        ),
    ]
    for fmt, row, columns, learned in cases:
        canon, why = canonical(row, fmt, columns)
        assert why is None, (fmt, why)
        ids, labels = encode_row(canon, fmt, tok, 512)
        assert learned in _learned(tok, ids, labels), fmt
        assert encode_batch([canon], fmt, tok, 512) == [(ids, labels)], fmt
        if fmt != "text":
            assert "hi" not in _learned(tok, ids, labels).replace("HELLO", "") or fmt == "alpaca"
    _, why = canonical({"question": "x"}, "alpaca", {"instruction": "question", "output": "answer"})
    assert why.startswith("missing field 'answer' (data.columns maps output to it)")
    _, why = canonical({"conversations": [{"from": "robot", "value": "x"}]}, "sharegpt")
    assert why.startswith("conversations[0].from 'robot' is not one of system, human")


def test_chat_tools_and_train_on(tok):
    from orchestrator.data.tokenize import encode_row

    msgs = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "CALLING", "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "IT IS SUNNY"},
        {"role": "user", "content": "thanks"},
    ]
    canon, why = canonical({"messages": msgs}, "chat")
    assert why is None
    every = _learned(tok, *encode_row(canon, "chat", tok, 512, "assistant"))
    assert "CALLING" in every and "IT IS SUNNY" in every and "sunny" not in every.replace("SUNNY", "")
    last = _learned(tok, *encode_row(canon, "chat", tok, 512, "last_assistant"))
    assert "IT IS SUNNY" in last and "CALLING" not in last
    ids, labels = encode_row(canon, "chat", tok, 512, "all")
    assert labels == ids
    _, why = canonical(
        {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y", "tool_calls": []}]}, "chat"
    )
    assert why == "messages[1].tool_calls: only assistant messages call tools, this one is 'tool'"


QWEN3_LIKE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m['role'] == 'assistant' and loop.last %}<think></think>{% endif %}{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def test_a_template_that_is_not_prefix_consistent_is_refused_before_launch(demo_model, demo_root, tmp_path):
    from orchestrator import demo

    model = Path(shutil.copytree(demo_model, tmp_path / "model"))
    (model / "chat_template.jinja").write_text(QWEN3_LIKE)
    problems = _problems(_run(tmp_path, f"model.path={model}", "data=demo_chat"))
    (problem,) = problems
    assert problem.startswith(f"data.path: {demo.DEMO_CHAT_DATA}:2: cannot be tokenized with the tokenizer in ")
    assert "is not prefix-consistent" in problem and "set data.train_on=last_assistant" in problem
    assert "the same for 15 more rows" in problem  # every multi-turn row, and only those
    validate(_run(tmp_path, f"model.path={model}", "data=demo_chat", "data.train_on=last_assistant"))


# --- the cache ----------------------------------------------------------------------------------


def test_the_cache_key_follows_every_input_and_a_torn_cache_is_rebuilt(alpaca, demo_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca))
    base = [f"data.path={data}"]
    validate(_run(tmp_path, *base))
    (first,) = _cache_dirs(tmp_path)
    stamp = first.stat().st_mtime_ns
    validate(_run(tmp_path, *base, "trainer.lr=0.1", "data.eval_fraction=0.2"))  # same inputs: reused
    # ... by a run in another of Hydra's dated directories too (tomorrow's run, another sweep)
    validate(_run(tmp_path, *base, out="outputs/2027-01-01/10-00-00"))
    assert _cache_dirs(tmp_path) == [first] and first.stat().st_mtime_ns == stamp
    model = Path(shutil.copytree(demo_model, tmp_path / "model"))
    (model / "chat_template.jinja").write_text((model / "chat_template.jinja").read_text() + " ")
    variants = [
        ["data.max_seq_len=96"],
        ["data.train_on=all"],
        ["data.columns={instruction: instruction}"],
        [f"model.path={model}"],
    ]
    seen = {first}
    for extra in variants:
        validate(_run(tmp_path, *base, *extra))
        new = set(_cache_dirs(tmp_path)) - seen
        assert len(new) == 1, extra
        seen |= new
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca[::-1]))  # same size, other bytes
    validate(_run(tmp_path, *base))
    (fresh,) = set(_cache_dirs(tmp_path)) - seen
    tokens = fresh / "tokens.bin"
    tokens.write_bytes(tokens.read_bytes()[:-4])  # torn
    validate(_run(tmp_path, *base))
    from orchestrator.data.cache import is_whole

    assert is_whole(fresh) and fresh in _cache_dirs(tmp_path)


def test_workers_read_the_split_and_the_mixture_from_the_cache(alpaca, tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.data import encode_rows, split_rows
    from orchestrator.data.dataset import open_data

    a, b = tmp_path / "a.parquet", tmp_path / "b.jsonl"
    pq.write_table(pa.Table.from_pylist(alpaca[:100]), a)
    b.write_text("".join(json.dumps(r) + "\n" for r in alpaca[100:200]))
    # Unpacked, so that a train row is a row of the data (packing is tests/test_packing.py's).
    run = validate(_run(tmp_path, f"data.path={a}", "data.eval_fraction=0.1", "data.packing=false"))
    train, evals = open_data(run, tok)
    rows_train, rows_eval = split_rows(a, "alpaca", None, 0.1, run.trainer.seed)
    assert [train[i] for i in range(len(train))] == encode_rows(rows_train, "alpaca", tok, run.data.max_seq_len)
    assert evals[:] == encode_rows(rows_eval, "alpaca", tok, run.data.max_seq_len)
    mix = validate(
        _run(
            tmp_path,
            "data.path=null",
            f"data.mix=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 0.5}}]",
            "data.eval_fraction=0",
            "data.packing=false",
        )
    )
    train, evals = open_data(mix, tok)
    assert len(train) == 2 * 100 + 50 and len(evals) == 0
    firsts = {train.where(i) for i in range(len(train))}
    assert (
        len([w for w in firsts if w.startswith(str(a))]) == 100
        and len([w for w in firsts if w.startswith(str(b))]) == 50
    )


# --- bad data at scale --------------------------------------------------------------------------


def test_thousands_of_bad_rows_list_twenty_and_count_or_are_skipped(alpaca, tmp_path, caplog):
    rows = [json.dumps(r) for r in alpaca] + ['{"instruction": "x"}'] * 1000 + ["[1]"] * 500
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    problems = _problems(_run(tmp_path, f"data.path={data}"))
    assert len(problems) == 21
    assert problems[0] == (
        f"data.path: {data}:321: missing field 'output' (data.format=alpaca rows need instruction, output and "
        "optionally input)"
    )
    assert problems[-1] == f"data.path: {data}: ... and 1480 more bad rows (1500 in all)"
    assert not _cache_dirs(tmp_path)
    validate(_run(tmp_path, f"data.path={data}", "data.on_bad_row=skip"))
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith(
        f"data.on_bad_row=skip: skipped 1500 of 1820 rows of data.path ({data}) that are not alpaca rows or cannot "
        f"be tokenized; the first: {data}:321: missing field 'output'"
    )
    # Reported again from the cache, without reading the data: in both modes.
    (cache,) = _cache_dirs(tmp_path)
    assert json.loads((cache / "meta.json").read_text())["bad"] == 1500
    assert len(_problems(_run(tmp_path, f"data.path={data}"))) == 21
    only_bad = tmp_path / "only-bad.jsonl"
    only_bad.write_text('{"instruction": "x"}\n' * 30)
    (problem,) = _problems(_run(tmp_path, f"data.path={only_bad}", "data.on_bad_row=skip"))
    assert problem.startswith(f"data.path: {only_bad}: no row is left after data.on_bad_row=skip left out all 30 rows")


def test_too_few_rows_for_a_global_batch_counts_the_mixture(alpaca, tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in alpaca[:5]))
    mix = ["data.path=null", f"data.mix=[{{path: {a}, weight: 1.2}}]", "data.eval_fraction=0"]
    (problem,) = _problems(_run(tmp_path, *mix, "data.packing=false"))
    assert problem.startswith("data.mix: 6 training rows are fewer than one global batch of 8")
    # Packed (the default for a Llama), rows hold several examples: the batch check counts packed rows.
    many = tmp_path / "many.jsonl"
    many.write_text("".join(json.dumps(r) + "\n" for r in alpaca[:40]))
    (problem,) = _problems(_run(tmp_path, f"data.path={many}", "data.eval_fraction=0", "data.max_seq_len=512"))
    assert re.match(r"data.path: [1-7] packed rows are fewer than one global batch of 8", problem), problem
    validate(_run(tmp_path, f"data.path={many}", "data.eval_fraction=0", "data.max_seq_len=512", "data.packing=false"))
    validate(_run(tmp_path, f"data.path={many}", "data.eval_fraction=0", "data.max_seq_len=64"))
    validate(
        _run(
            tmp_path,
            "data.path=null",
            f"data.mix=[{{path: {a}, weight: 2}}]",
            "data.eval_fraction=0",
            "data.packing=false",
        )
    )


def test_data_config_is_checked(tmp_path):
    problems = _problems(
        _run(
            tmp_path,
            "data.columns={prompt: q}",
            "data.mix=[{path: /x.jsonl, weight: 0}]",
            "data.num_proc=0",
        )
    )
    assert problems[:4] == [
        "data.path and data.mix: give one of them (data.mix lists every dataset of a mixture, with its weight)",
        "data.columns: prompt is not a field of data.format=alpaca; it maps instruction, input, output, system to "
        "the dataset's own names",
        "data.mix[0].weight: must be positive (times each row is used per epoch), got 0.0",
        "data.num_proc: must be >= 1, or null for the machine's cores, got 0",
    ], problems


def test_offline_hub_names_through_the_cli_environment(alpaca, demo_model, tmp_path):
    """The same resolution in a fresh process that only has HF_HUB_CACHE and HF_HUB_OFFLINE=1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(alpaca[:40]), tmp_path / "t.parquet")
    cache = tmp_path / "hf"
    _hub_cache(cache, "dataset", "acme/instruct", {"train.parquet": tmp_path / "t.parquet"})
    _hub_cache(cache, "model", "acme/tiny", {p.name: p for p in demo_model.iterdir() if p.is_file()})
    code = (
        "from orchestrator.config import compose, validate\n"
        f"run = validate(compose(['experiment=demo', 'tracking=none', 'output_dir={tmp_path / 'out'}', "
        "'model.path=acme/tiny', 'data.path=acme/instruct', 'data.packing=false']))\n"
        "from orchestrator.data.dataset import open_data\nfrom orchestrator.model import load_tokenizer\n"
        "print(len(open_data(run, load_tokenizer(run.model))[0]))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "38"  # 40 rows less the demo's 5% eval share


# --- tokenize once, fast -------------------------------------------------------------------------


def _long_rows(path: Path, n: int, words: int) -> int:
    """n alpaca rows whose outputs are `words` words long; returns the file's bytes."""
    vocab = "ship leaf door star bird moon tree rock fish lamp road cup king song rain".split()
    with path.open("w") as f:
        for i in range(n):
            out = " ".join(vocab[(i * 7 + k) % len(vocab)] for k in range(words))
            f.write(json.dumps({"instruction": f"Say it ({i}).", "input": "", "output": out}) + "\n")
    return path.stat().st_size


def _bytes_read() -> int:
    """What this process has read through read() calls so far (/proc/self/io's rchar)."""
    return int(next(x for x in Path("/proc/self/io").read_text().splitlines() if x.startswith("rchar:")).split()[1])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs /proc/self/io")
def test_validation_reads_the_data_once_and_a_warm_cache_not_at_all(demo_root, tmp_path):
    data = tmp_path / "long.jsonl"
    size = _long_rows(data, 1500, 2000)  # ~15 MB: far more than anything else validation reads
    run = _run(tmp_path, f"data.path={data}", "data.max_seq_len=64", "data.num_proc=1")
    before = _bytes_read()
    validate(run)
    cold = _bytes_read() - before
    assert size <= cold < 1.4 * size, f"validation read {cold / size:.2f}x the data's {size} bytes"
    before = _bytes_read()
    validate(run)
    warm = _bytes_read() - before
    assert warm < 0.25 * size, f"with the cache built, validation still read {warm / size:.2f}x the data"


def test_the_parallel_pool_builds_the_same_cache_as_one_process(alpaca, tmp_path, monkeypatch):
    from orchestrator.data import cache

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca) + '{"instruction": "no output"}\n')
    spawned = []
    real_pool = cache.multiprocessing.get_context("spawn").Pool

    def counting_pool(*a, **k):
        spawned.append(a[0])
        return real_pool(*a, **k)

    built = {}
    for procs in (1, 2):
        # The pool starts above POOL_MIN_BYTES: lowered to 0 here, so that 2 processes tokenize this file.
        monkeypatch.setattr(cache, "POOL_MIN_BYTES", 0)
        monkeypatch.setattr(
            cache.multiprocessing.context.SpawnContext, "Pool", lambda self, *a, **k: counting_pool(*a, **k)
        )
        run = _run(
            tmp_path,
            f"data.path={data}",
            f"data.num_proc={procs}",
            "data.on_bad_row=skip",
            f"data.cache_dir={tmp_path / str(procs)}",
        )
        validate(run)
        (d,) = [p for p in (tmp_path / str(procs)).iterdir() if not p.name.startswith(".")]
        built[procs] = {f.name: f.read_bytes() for f in d.iterdir() if f.suffix == ".bin"}
        built[procs]["meta"] = {k: v for k, v in json.loads((d / "meta.json").read_text()).items() if k != "source"}
    assert spawned == [2]
    assert built[1] == built[2]
    assert built[2]["meta"]["bad"] == 1 and built[2]["meta"]["rows"] == len(alpaca)


def test_the_rust_backend_shortcut_gives_transformers_ids(tok):
    from orchestrator.data.tokenize import _batch_ids

    texts = ["### Instruction:\nReverse it\n\n", "ship leaf door", "", "  spaces  and\ttabs\n"]
    for special in (True, False):
        assert _batch_ids(tok, texts, special) == tok(texts, add_special_tokens=special)["input_ids"]
    truncating = tok.__class__.from_pretrained(tok.name_or_path)
    truncating.backend_tokenizer.enable_truncation(2)  # a tokenizer.json that truncates: transformers' call then
    assert _batch_ids(truncating, texts, True) == truncating(texts, add_special_tokens=True)["input_ids"]
    assert max(map(len, _batch_ids(truncating, texts, True))) > 2
