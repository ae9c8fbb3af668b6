"""Seeded fuzzing of what a user hands the orchestrator: config overrides and data rows.

Every case must end in clean success or in one ConfigError whose every problem names its culprit
(the override's key, or the file:line of a mutated row): never another exception, never a hang,
and memory stays bounded whatever the row. FUZZ_SEED=<n> explores other cases; a failure prints
the case, which reproduces with the same seed.
"""

from __future__ import annotations

import json
import os
import random
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import cli

from orchestrator.config import ConfigError, as_dict, compose, validate
from orchestrator.config.compose import group_options
from orchestrator.config.schema import flatten
from orchestrator.data.formats import MIN_ROW_CAP

SEED = int(os.environ.get("FUZZ_SEED", "20261123"))
N_CONFIG, N_DATA = 160, 300
# Each data case validates the demo config against a file of this many mutated demo rows.
N_ROWS = 24
BASE = ["experiment=demo", "tracking=none", "trainer.micro_batch_size=2"]
CASE_S = 5  # no single case may take longer: that is a hang, or a look-up over the network

pytestmark = pytest.mark.timeout(300)


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- (a) config overrides -------------------------------------------------------------------------

JUNK = [
    # wrong types
    "abc",
    "[1,2]",
    "{a: 1}",
    "true",
    "null",
    "'3'",
    "[]",
    "{}",
    "'(('",
    # huge, negative, zero, non-finite
    "1" + "0" * 30,
    "-1",
    "0",
    "-1e308",
    "1e308",
    "nan",
    "inf",
    "-inf",
    "1e-320",
    "9223372036854775808",
    # empty strings, control characters, long strings
    "''",
    "",
    "' '",
    "'a\nb'",
    "'\x1b[31mred'",
    "'\t'",
    "'" + "x" * 300 + "'",
    "'/" + "a" * 300 + "'",
    # interpolation junk
    "${nope}",
    "${",
    "'${'",
    "${demo:nope}",
    "${mul:a,b}",
    "${oc.env:FUZZ_NOT_SET}",
    "${data.max_seq_len}",
    "${adapter}",
    "${now:}",
    "'${'x'}'",
    # paths that are not what they should be
    "/dev/null",
    "/dev/zero",
    "/proc",
    "/",
    "/etc/hostname",
    "relative/dir",
]
UNKNOWN = [
    "adapter.rank=8",
    "fuzz=1",
    "trainer.lr.x=1",
    "+fuzz=1",
    "++adapter.nope=1",
    "~adapter.r",
    "~trainer",
    "cluster.env.1BAD=1",
    "=",
    "adapter.r",
    "a b=c",
    "adapter.r==3",
    "adapter.r=[",
    "adapter.r=1)",
    "trainer=",
    "model.path.x=1",
    "+adapter.r=3",
]


def _config_cases(
    rng: random.Random, keys: list[str], groups: dict[str, list[str]]
) -> list[tuple[list[str], set[str]]]:
    """(overrides, culprits): one or two mutations of the demo config, each with the key it names."""
    cases = []
    for _ in range(N_CONFIG):
        overrides, culprits = [], set()
        for _ in range(rng.choice((1, 1, 1, 2))):
            kind = rng.random()
            if kind < 0.65:
                key = rng.choice(keys)
                overrides.append(f"{key}={rng.choice(JUNK)}")
                culprits.add(key)
            elif kind < 0.8:
                text = rng.choice(UNKNOWN)
                overrides.append(text)
                key = text.split("=", 1)[0].lstrip("+~")
                culprits.add(key if key and "=" in text and " " not in key else text)
            else:
                group = rng.choice(sorted(groups))
                value = rng.choice(["nope", "", "null", "${x}", "'a\nb'", rng.choice(groups[group]).upper(), "[a,b]"])
                overrides.append(f"{group}={value}")
                culprits.add(group)
        cases.append((overrides, culprits))
    return cases


def _names_culprit(problem: str, culprits: set[str]) -> bool:
    return any(c in problem or repr(c)[1:-1] in problem for c in culprits)


def test_fuzz_config_overrides(demo_root, tmp_path):
    rng = random.Random(SEED)
    out = tmp_path / "out"
    base = [*BASE, f"output_dir={out}"]
    validate(compose(base))  # the unmutated config is fine
    keys = sorted(k for k in flatten(as_dict(compose(base))) if k != "output_dir") + ["output_dir"]
    groups = {g: opts for g, opts in group_options().items() if g not in ("sweep",)}
    outcomes: dict[str, int] = {}
    rss0, t0 = _maxrss_mb(), time.monotonic()
    for i, (overrides, culprits) in enumerate(_config_cases(rng, keys, groups)):
        case = f"case {i} (FUZZ_SEED={SEED}): {overrides}"
        started = time.monotonic()
        try:
            validate(compose([*base, *overrides]))
            outcomes["success"] = outcomes.get("success", 0) + 1
        except ConfigError as e:
            outcomes["ConfigError"] = outcomes.get("ConfigError", 0) + 1
            stray = [p for p in e.problems if not _names_culprit(p, culprits)]
            assert not stray, f"{case}: problems that name none of {culprits}: {stray}"
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{case}: {type(e).__name__}: {e}")
        assert not out.exists() or out.is_dir(), case
        assert time.monotonic() - started < CASE_S, (
            f"{case}: took {time.monotonic() - started:.0f} s (a network look-up?)"
        )
    print(f"config fuzz, FUZZ_SEED={SEED}: {N_CONFIG} cases, {outcomes}")
    assert outcomes.get("ConfigError", 0) > N_CONFIG // 2, outcomes
    assert _maxrss_mb() - rss0 < 500 and time.monotonic() - t0 < 240


# --- (b) data rows --------------------------------------------------------------------------------


def _mutate_row(rng: random.Random, line: bytes, fmt: str) -> bytes:
    try:
        row = json.loads(line)
        assert isinstance(row, dict) and (
            fmt == "alpaca"
            or isinstance(row.get("messages"), list)
            and row["messages"]
            and all(isinstance(m, dict) for m in row["messages"])
        )
    except (ValueError, RecursionError, AssertionError):  # mutated already: only bytes are left to mutate
        row = None
    field = rng.choice(["instruction", "input", "output"] if fmt == "alpaca" else ["messages"])
    kind = rng.randrange(17) if row is not None else rng.choice([0, 1, 16])
    if kind == 0 and line:  # a byte flipped anywhere
        i = rng.randrange(len(line))
        return line[:i] + bytes([rng.randrange(256)]) + line[i + 1 :]
    if kind == 1 or not line:  # cut short
        return line[: rng.randrange(0, max(len(line), 1))]
    if kind == 2:  # a field removed
        row.pop(field, None)
    elif kind == 3:  # a field of the wrong type
        row[field] = rng.choice([3, None, [], {}, True, 1.5, ["a"]])
    elif kind == 4:  # a huge value: over the row cap, or under it but far over max_seq_len
        size = rng.choice([MIN_ROW_CAP + rng.randrange(1, 4096), rng.randrange(20_000, 400_000)])
        if fmt == "alpaca":
            row[field] = "long " * (size // 5)
        else:
            row["messages"][-1]["content"] = "long " * (size // 5)
    elif kind == 5:  # invalid UTF-8 inside a string
        bad = rng.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xe2\x82", b"\x80\x80"])
        i = line.rfind(b'"', 0, len(line) - 2)
        return line[:i] + bad + line[i:]
    elif kind == 6:  # JSON that is no object
        return rng.choice([b"[1, 2]", b'"a string"', b"3", b"null", b"true", b"[]"])
    elif kind == 7:  # a lone surrogate escape
        i = line.rfind(b'"', 0, len(line) - 2)
        return line[:i] + rng.choice([b"\\ud800", b"\\udfff", b"\\ud83d"]) + line[i:]
    elif kind == 8:  # nesting or numbers the parser chokes on
        return rng.choice([b"[" * 100_000, b'{"a": ' + b"1" * 5000 + b"}", b'{"a": 1e999999}', b"{" * 3000])
    elif kind == 9:  # raw control characters and NULs
        i = line.rfind(b'"', 0, len(line) - 2)
        return line[:i] + rng.choice([b"\x00", b"\x01", b"\x1b", b"\t\r"]) + line[i:]
    elif kind == 10:  # blank, whitespace
        return rng.choice([b"", b"   ", b"\t"])
    elif kind == 11:  # empty strings
        if fmt == "alpaca":
            row[field] = rng.choice(["", "  ", "\n"])
        else:
            row["messages"][-1]["content"] = ""
    elif kind == 12 and fmt == "chat":  # roles and messages out of shape
        m = row["messages"]
        choice = rng.randrange(5)
        if choice == 0:
            m[0]["role"] = rng.choice(["robot", "", None, ["user"], {"a": 1}, 3])
        elif choice == 1:
            row["messages"] = rng.choice([[], {}, "hi", [None], [[]]])
        elif choice == 2:
            row["messages"] = [x for x in m if x.get("role") != "assistant"]
        elif choice == 3:
            m[0]["content"] = rng.choice([3, None, ["a"], {"t": "x"}])
        else:
            del m[0]["content"]
    elif kind == 13:  # extra keys and unicode that is fine
        row[rng.choice(["extra", "💥", ""])] = rng.choice(["é", "中文", "\u0000", "\U0001f600" * 50])
    elif kind == 14:  # a duplicate key, the last one winning
        return line[:-1] + b', "' + field.encode() + b'": 5}'
    elif kind == 15:  # a JSON number where text goes
        return line.replace(b'"', b"", 2)
    else:  # many bytes flipped
        b = bytearray(line or b" ")
        for _ in range(rng.randrange(2, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    return json.dumps(row, ensure_ascii=rng.random() < 0.5).encode()


def _data_cases(rng: random.Random, rows: dict[str, list[bytes]]) -> list[tuple[str, list[bytes], set[int]]]:
    """(format, lines, mutated line numbers)."""
    cases = []
    for _ in range(N_DATA):
        fmt = rng.choice(["alpaca", "alpaca", "chat"])
        lines = list(rng.sample(rows[fmt], N_ROWS))
        mutated = set()
        for _ in range(rng.choice((1, 1, 2, 3))):
            i = rng.randrange(N_ROWS)
            lines[i] = _mutate_row(rng, lines[i], fmt).replace(b"\n", b"\\n")  # one line stays one line
            mutated.add(i + 1)
        if rng.random() < 0.05:  # a byte order mark and Windows line ends
            lines = [b"\xef\xbb\xbf" + lines[0], *lines[1:]]
            lines = [x + b"\r" for x in lines]
        cases.append((fmt, lines, mutated))
    return cases


def _names_line(problem: str, path: Path, mutated: set[int]) -> bool:
    """A problem names a mutated line, or is about the file as a whole (never an intact line)."""
    import re

    lines = {int(n) for n in re.findall(re.escape(str(path)) + r":(\d+)", problem)}
    if lines:
        return bool(lines & mutated)
    return (
        problem.startswith(("data.path:", "data.max_seq_len="))
        and str(path) in problem
        or problem.startswith("data.path: ")
        and "training rows are fewer than one global batch" in problem
    )


def test_fuzz_data_rows(demo_root, tmp_path):
    from orchestrator import demo

    rng = random.Random(SEED + 1)
    rows = {"alpaca": demo.DEMO_DATA.read_bytes().splitlines(), "chat": demo.DEMO_CHAT_DATA.read_bytes().splitlines()}
    runs = {
        fmt: compose([*BASE, f"output_dir={tmp_path / 'out'}", f"data={'demo' if fmt == 'alpaca' else 'demo_chat'}"])
        for fmt in rows
    }
    outcomes: dict[str, int] = {}
    rss0, t0 = _maxrss_mb(), time.monotonic()
    for i, (fmt, lines, mutated) in enumerate(_data_cases(rng, rows)):
        path = tmp_path / f"case-{i}.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        case = f"case {i} (FUZZ_SEED={SEED}, {fmt}): lines {sorted(mutated)} of {path}"
        run = runs[fmt]
        started = time.monotonic()
        try:
            validate(replace(run, data=replace(run.data, path=str(path))))
            outcomes["success"] = outcomes.get("success", 0) + 1
        except ConfigError as e:
            outcomes["ConfigError"] = outcomes.get("ConfigError", 0) + 1
            stray = [p for p in e.problems if not _names_line(p, path, mutated)]
            assert not stray, f"{case}: problems that name no mutated line: {stray}"
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"{case}: {type(e).__name__}: {e}")
        assert time.monotonic() - started < CASE_S, f"{case}: took {time.monotonic() - started:.0f} s"
        path.unlink()
    print(f"data fuzz, FUZZ_SEED={SEED}: {N_DATA} cases, {outcomes}")
    assert outcomes.get("ConfigError", 0) > N_DATA // 3, outcomes
    assert _maxrss_mb() - rss0 < 500, "memory grew with the rows"
    assert time.monotonic() - t0 < 240


# --- through the real CLI -------------------------------------------------------------------------


def test_bad_input_through_the_cli(demo_model, tmp_path):
    """The same kinds of input through `orchestrator train`: exit code 2, the culprit on stderr, no
    traceback, and no output directory made. (Hydra's own run directory goes to hydra.run.dir.)"""
    import shutil

    from orchestrator import demo

    rows = demo.DEMO_DATA.read_bytes().splitlines()
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(
        b"\n".join([*rows[:3], rows[3].replace(b'"output": "', b'"output": "caf\xe9 '), *rows[4:]]) + b"\n"
    )
    cut = tmp_path / "cut-model"
    shutil.copytree(demo_model, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory\n")
    cases = [
        ([f"data.path={not_utf8}"], f"{not_utf8}:4: not valid UTF-8"),
        ([f"model.path={cut}"], f"{weights}: truncated"),
        (["adapter.r=${"], "'adapter.r=${'"),
        (["data.max_seq_len=8"], "data.max_seq_len=8 leaves all"),
        ([f"output_dir={a_file / 'sub'}"], f"{a_file} is a file"),
    ]

    def train(i: int):
        overrides = cases[i][0]
        out = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), str(tmp_path / f"out-{i}"))
        return Path(out), cli(
            "train",
            "experiment=demo",
            "tracking=none",
            f"output_dir={out}",
            f"hydra.run.dir={tmp_path / 'h'}",
            *overrides,
            cwd=tmp_path,
            timeout=120,
        )

    with ThreadPoolExecutor(2) as pool:  # each is mostly a Python start-up
        results = list(pool.map(train, range(len(cases))))
    for (overrides, culprit), (out, r) in zip(cases, results):
        assert r.returncode == 2, (overrides, r.returncode, r.stderr[-2000:])
        assert culprit in r.stderr, (overrides, r.stderr[-2000:])
        assert "Traceback" not in r.stderr + r.stdout, (overrides, r.stderr[-3000:])
        assert not out.exists(), overrides
    assert a_file.read_text() == "not a directory\n"
