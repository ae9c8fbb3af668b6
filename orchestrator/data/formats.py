"""Reading and checking JSONL rows, with file:line for every bad row.

A row is read as bytes, at most `max_row_bytes` of them: a line longer than that is skipped to its
end in chunks (never held whole) and reported with the field it overflows, so one runaway row
costs no memory; each line is then decoded as UTF-8, with the byte of an undecodable one named.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

MAX_REPORTED = 20
ROLES = ("system", "user", "assistant", "tool")
# The row cap: 64 bytes of JSON per token of data.max_seq_len (real text averages about 4, and a
# JSON escape of one character at most 12), and at least 1 MiB. A longer row is almost all cut
# away by truncation, so it is far more likely a broken export than data (and tokenizing it whole
# costs gigabytes).
ROW_BYTES_PER_TOKEN = 64
MIN_ROW_CAP = 1 << 20
_CHUNK = 1 << 20


def row_byte_cap(max_seq_len: int) -> int:
    """The longest JSONL line accepted as a row for sequences of `max_seq_len` tokens."""
    return max(MIN_ROW_CAP, ROW_BYTES_PER_TOKEN * max_seq_len)


class DataError(ValueError):
    """Bad rows in a data file, each with file:line and the reason."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        self.total = total
        more = f"\n  ... and {total - len(problems)} more" if total and total > len(problems) else ""
        super().__init__("invalid data:\n" + "\n".join(f"  - {p}" for p in problems) + more)


def _human(n: float) -> str:
    if n < 1024:
        return f"{int(n)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def _bad_unicode(value: str, field: str) -> str | None:
    """A JSON \\ud800-style escape decodes to half a surrogate pair: valid JSON, but not text any
    tokenizer can encode."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        return (
            f"field '{field}' holds an unpaired surrogate \\u{ord(value[e.start]):04x} at character {e.start}, "
            "which is not valid Unicode"
        )
    return None


def _check_alpaca(row: dict) -> str | None:
    for key in ("instruction", "output"):
        if key not in row:
            return f"missing field '{key}' (data.format=alpaca rows need instruction, output and optionally input)"
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            return f"field '{key}' must be a string, got {type(row[key]).__name__}"
        if key in row and (bad := _bad_unicode(row[key], key)):
            return bad
    if not row["instruction"].strip():
        return "empty 'instruction'"
    if not row["output"].strip():
        return "empty 'output' (the response is what the model learns)"
    return None


def _check_chat(row: dict) -> str | None:
    msgs = row.get("messages")
    if msgs is None:
        return "missing field 'messages' (data.format=chat rows need a list of {role, content})"
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if not isinstance(m["role"], str) or m["role"] not in ROLES:
            return f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
        if bad := _bad_unicode(m["content"], f"messages[{i}].content"):
            return bad
    answers = [m for m in msgs if m["role"] == "assistant"]
    if not answers:
        return "no assistant message (nothing to learn from this row)"
    if any(not m["content"].strip() for m in answers):
        return "empty assistant message"
    return None


CHECKS = {"alpaca": _check_alpaca, "chat": _check_chat}


# JSON tokens enough to follow nesting: a whole string, a lone quote (a string cut off), punctuation.
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|"|[{}\[\]:,]')


def field_at_end(prefix: str) -> str:
    """The JSON path (`output`, `messages[2].content`) of the value that `prefix`, the start of a
    JSON text, ends inside; "" at the top level."""
    stack: list[list] = []  # ["{", key, expecting a key] or ["[", index]
    for m in _JSON_TOKEN.finditer(prefix):
        t = m.group()
        if t == "{":
            stack.append(["{", None, True])
        elif t == "[":
            stack.append(["[", 0])
        elif t in "}]":
            if stack:
                stack.pop()
        elif t == ",":
            if stack and stack[-1][0] == "[":
                stack[-1][1] += 1
            elif stack:
                stack[-1][1:] = [None, True]
        elif t == ":":
            if stack and stack[-1][0] == "{":
                stack[-1][2] = False
        elif t == '"':
            break  # a string that runs past the end: the value we are inside
        elif stack and stack[-1][0] == "{" and stack[-1][2]:
            stack[-1][1] = t[1:-1]
    path = ""
    for frame in stack:
        if frame[0] == "[":
            path += f"[{frame[1]}]"
        elif frame[1] is not None:
            path += ("." if path else "") + frame[1]
    return path


def _in_field(prefix: bytes) -> str:
    field = field_at_end(prefix.decode("utf-8", errors="replace"))
    return f" in field '{field}'" if field else ""


def _lines(f: BinaryIO, cap: int | None) -> Iterator[tuple[int, int, bytes, int]]:
    """(line number, file offset, bytes, full length) of each line; a line over `cap` bytes comes
    as its first cap + 2 bytes (room for a CRLF), the rest read in chunks and dropped."""
    lineno = offset = 0
    while True:
        line = f.readline() if cap is None else f.readline(cap + 2)
        if not line:
            return
        lineno += 1
        length = len(line)
        if cap is not None and len(line.rstrip(b"\r\n")) > cap:
            while not line.endswith(b"\n"):
                chunk = f.readline(_CHUNK)
                if not chunk:
                    break
                length += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        yield lineno, offset, line, length
        offset += length


def _parse(
    lineno: int, offset: int, line: bytes, length: int, cap: int | None, check: Callable[[dict], str | None]
) -> tuple[dict | None, str | None]:
    """(row, None) or (None, why the line is not a row)."""
    if cap is not None and len(line.rstrip(b"\r\n")) > cap:
        return None, (
            f"row of {_human(length)} is over the cap of {_human(cap)}{_in_field(line[:cap])} "
            f"({ROW_BYTES_PER_TOKEN} bytes per token of data.max_seq_len, at least {_human(MIN_ROW_CAP)}): "
            "truncation would drop nearly all of it; split or shorten the row, or raise data.max_seq_len"
        )
    bom = 3 if lineno == 1 and line.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark is fine
    try:
        text = line[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        start = bom + e.start
        return None, (
            f"not valid UTF-8: byte 0x{line[start]:02x} at column {start + 1} (file offset {offset + start})"
            f"{_in_field(line[bom:start])}; save the file as UTF-8"
        )
    if not text.strip():
        return None, None
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    except ValueError as e:  # a number too long to convert
        return None, f"not valid JSON ({e})"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    return row, check(row)


def iter_rows(path: str | Path, fmt: str, max_row_bytes: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every good row in one pass over the file; once it is read, DataError
    naming every bad line (up to MAX_REPORTED), or that it holds no rows. Lines over
    `max_row_bytes` bytes are bad rows, never read whole."""
    path = Path(path)
    if path.is_dir():
        jsonl = sorted(p.name for p in path.glob("*.jsonl"))
        hint = (
            (
                f"; it holds {len(jsonl)} .jsonl file(s) ({', '.join(jsonl[:3])}{', ...' if len(jsonl) > 3 else ''}): "
                "concatenate them into one file, or name one"
            )
            if jsonl
            else ""
        )
        raise DataError(
            [f"{path}: is a directory; expected one JSONL file of {fmt} rows (one JSON object per line){hint}"]
        )
    if not path.exists():
        raise DataError([f"{path}: no such file"])
    if not path.is_file():
        raise DataError([f"{path}: is not a regular file; expected one JSONL file of {fmt} rows"])
    check = CHECKS[fmt]
    problems, bad, n = [], 0, 0
    try:
        with path.open("rb") as f:
            for lineno, offset, line, length in _lines(f, max_row_bytes):
                row, reason = _parse(lineno, offset, line, length, max_row_bytes, check)
                if reason:
                    bad += 1
                    if len(problems) < MAX_REPORTED:
                        problems.append(f"{path}:{lineno}: {reason}")
                elif row is not None:
                    n += 1
                    yield lineno, row
    except OSError as e:
        raise DataError([f"{path}: cannot be read ({e.strerror or e})"]) from None
    if problems:
        raise DataError(problems, total=bad)
    if not n:
        raise DataError([f"{path}: contains no rows"])


def read_rows(path: str | Path, fmt: str, max_row_bytes: int | None = None) -> list[dict]:
    """All rows of a JSONL file, or DataError naming every bad line (up to MAX_REPORTED)."""
    return [row for _, row in iter_rows(path, fmt, max_row_bytes)]


def split_rows(
    path: str | Path, fmt: str, eval_path: str | Path | None, eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Train and eval rows. Without an eval file, the eval split is a seeded random subset of the
    rows, the same on every worker."""
    import torch

    rows = read_rows(path, fmt)
    if eval_path:
        return rows, read_rows(eval_path, fmt)
    n_eval = int(len(rows) * eval_fraction)
    if n_eval == 0:
        return rows, []
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    eval_idx = set(perm[:n_eval])
    return [r for i, r in enumerate(rows) if i not in eval_idx], [rows[i] for i in sorted(eval_idx)]
