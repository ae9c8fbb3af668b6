"""Reading JSONL lines and checking rows of each data.format, with file:line for every bad row.

A row is read as bytes, at most `max_row_bytes` of them: a line longer than that is skipped to its
end in chunks (never held whole) and reported with the field it overflows, so one runaway row
costs no memory; each line is then decoded as UTF-8, with the byte of an undecodable one named.
A row of any source (sources.py) is then checked against its format and brought to the format's
canonical fields (`canonical`), naming the dataset's own column when data.columns maps one.
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


# The fields each format reads, by their canonical names: what data.columns may map to a
# dataset's own column names (sharegpt's from/value are keys inside each turn).
FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "chat": ("messages", "tools"),
    "sharegpt": ("conversations", "tools", "from", "value"),
    "completion": ("prompt", "completion"),
    "text": ("text",),
}
# ShareGPT speaker tags and the chat role each stands for.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "observation": "tool",
    "function_response": "tool",
}


class Columns:
    """data.columns: canonical field -> the dataset's column (or message key) name."""

    def __init__(self, mapping: dict[str, str] | None):
        self.mapping = dict(mapping or {})

    def __call__(self, field: str) -> str:
        return self.mapping.get(field, field)

    def named(self, field: str) -> str:
        """How a problem names a field: the dataset's name, and the canonical one if mapped."""
        col = self(field)
        return f"'{col}'" if col == field else f"'{col}' (data.columns maps {field} to it)"


def _string(row: dict, field: str, cols: Columns, required: bool = True) -> tuple[str | None, str | None]:
    """(the value of a string field, None) or (None, why not)."""
    key = cols(field)
    if key not in row or row[key] is None:
        return None, (f"missing field {cols.named(field)}" if required else None)
    value = row[key]
    if not isinstance(value, str):
        return None, f"field {cols.named(field)} must be a string, got {type(value).__name__}"
    if bad := _bad_unicode(value, key):
        return None, bad
    return value, None


def _canon_alpaca(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    out = {}
    for key in ("instruction", "output"):
        if row.get(cols(key)) is None:
            return None, (
                f"missing field {cols.named(key)} (data.format=alpaca rows need instruction, output and optionally input)"
            )
    for key, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        value, why = _string(row, key, cols, required)
        if why:
            return None, why
        if value is not None:
            out[key] = value
    if not out["instruction"].strip():
        return None, f"empty {cols.named('instruction')}"
    if not out["output"].strip():
        return None, f"empty {cols.named('output')} (the response is what the model learns)"
    return out, None


def _check_messages(msgs: list, where: str) -> str | None:
    """Why a canonical message list cannot be trained on, or None."""
    for i, m in enumerate(msgs):
        if m["role"] not in ROLES:
            return f"{where}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        content, calls = m.get("content"), m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                return f"{where}[{i}].tool_calls: only assistant messages call tools, this one is {m['role']!r}"
            if not isinstance(calls, list) or not all(
                isinstance(c, dict) and isinstance(c.get("function", c), dict) and "name" in c.get("function", c)
                for c in calls
            ):
                return f"{where}[{i}].tool_calls must be a list of {{function: {{name, arguments}}}} objects"
        if content is None and calls is None:
            return f"{where}[{i}] must have 'content' (or, for an assistant, 'tool_calls')"
        if content is not None and not isinstance(content, str):
            return f"{where}[{i}].content must be a string, got {type(content).__name__}"
        if content is not None and (bad := _bad_unicode(content, f"{where}[{i}].content")):
            return bad
    answers = [m for m in msgs if m["role"] == "assistant"]
    if not answers:
        return "no assistant message (nothing to learn from this row)"
    if any(not (m.get("content") or "").strip() and not m.get("tool_calls") for m in answers):
        return "empty assistant message"
    return None


def _json_list(value: object) -> object:
    """A list stored as a JSON string (CSV cells, some Parquet exports) as the list; else as is."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


_MESSAGE_KEYS = ("role", "content", "tool_calls", "name", "tool_call_id", "reasoning_content")


def _canon_chat(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    key = cols("messages")
    msgs = _json_list(row.get(key))
    if msgs is None:
        return None, f"missing field {cols.named('messages')} (data.format=chat rows need a list of {{role, content}})"
    if not isinstance(msgs, list) or not msgs:
        return None, f"'{key}' must be a non-empty list"
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or ("content" not in m and "tool_calls" not in m):
            return None, f"{key}[{i}] must be an object with 'role' and 'content'"
        if not isinstance(m["role"], str):
            return None, f"{key}[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        # Columnar sources give every struct field to every message, absent ones as None.
        out.append({k: m[k] for k in _MESSAGE_KEYS if m.get(k) is not None})
    if why := _check_messages(out, key):
        return None, why
    return _with_tools({"messages": out}, row, cols)


def _with_tools(canon: dict, row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    tools = row.get(cols("tools"))
    if tools is not None:
        if isinstance(tools, str):  # often stored as a JSON string (Parquet has no free-form type)
            try:
                tools = json.loads(tools)
            except ValueError:
                return None, f"field {cols.named('tools')} is a string but not JSON"
        if not isinstance(tools, list):
            return None, f"field {cols.named('tools')} must be a list of tool (function) schemas"
        canon["tools"] = tools
    return canon, None


def _canon_sharegpt(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    key, who, what = cols("conversations"), cols("from"), cols("value")
    turns = _json_list(row.get(key))
    if turns is None:
        return None, (
            f"missing field {cols.named('conversations')} (data.format=sharegpt rows need a list of {{from, value}})"
        )
    if not isinstance(turns, list) or not turns:
        return None, f"'{key}' must be a non-empty list"
    msgs = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or who not in t or what not in t:
            return None, f"{key}[{i}] must be an object with '{who}' and '{what}'"
        role = SHAREGPT_ROLES.get(t[who]) if isinstance(t[who], str) else None
        if role is None:
            return None, f"{key}[{i}].{who} {t[who]!r} is not one of {', '.join(SHAREGPT_ROLES)}"
        if not isinstance(t[what], str):
            return None, f"{key}[{i}].{what} must be a string, got {type(t[what]).__name__}"
        msgs.append({"role": role, "content": t[what]})
    if why := _check_messages(msgs, key):
        return None, why
    return _with_tools({"messages": msgs}, row, cols)


def _canon_completion(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    out = {}
    for key in ("prompt", "completion"):
        value, why = _string(row, key, cols)
        if why:
            return None, why + (
                " (data.format=completion rows need prompt and completion strings)" if "missing" in why else ""
            )
        out[key] = value
    if not out["completion"].strip():
        return None, f"empty {cols.named('completion')} (the completion is what the model learns)"
    return out, None


def _canon_text(row: dict, cols: Columns) -> tuple[dict | None, str | None]:
    value, why = _string(row, "text", cols)
    if why:
        return None, why + (" (data.format=text rows need a text field)" if "missing" in why else "")
    if not value.strip():
        return None, f"empty {cols.named('text')}"
    return {"text": value}, None


CANONICAL = {
    "alpaca": _canon_alpaca,
    "chat": _canon_chat,
    "sharegpt": _canon_sharegpt,
    "completion": _canon_completion,
    "text": _canon_text,
}
# The format the encoder sees once a row is canonical: ShareGPT turns are chat messages.
ENCODED_AS = {"sharegpt": "chat"}


def canonical(row: dict, fmt: str, columns: dict[str, str] | None = None) -> tuple[dict | None, str | None]:
    """(the row in the canonical fields of its format, None) or (None, why it is not a row of it)."""
    return CANONICAL[fmt](row, Columns(columns))


def _check_alpaca(row: dict) -> str | None:
    return canonical(row, "alpaca")[1]


def _check_chat(row: dict) -> str | None:
    return canonical(row, "chat")[1]


CHECKS = {fmt: (lambda row, fmt=fmt: canonical(row, fmt)[1]) for fmt in CANONICAL}


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


def _parse(lineno: int, offset: int, line: bytes, length: int, cap: int | None) -> tuple[dict | None, str | None]:
    """(row, None), (None, why the line is not a row), or (None, None) for a blank line."""
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
    return parse_json_row(text)


def parse_json_row(text: str) -> tuple[dict | None, str | None]:
    """(row, None) or (None, why `text` is not one JSON object)."""
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
    return row, None


def jsonl_rows(
    f: BinaryIO, cap: int | None, progress: Callable[[int], None] | None = None
) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, row, None) or (line number, None, why not) of every non-blank line; lines over
    `cap` bytes are never read whole. progress(n) hears of every n bytes read."""
    for lineno, offset, line, length in _lines(f, cap):
        row, reason = _parse(lineno, offset, line, length, cap)
        if progress is not None:
            progress(length)
        if row is not None or reason is not None:
            yield lineno, row, reason


def iter_rows(path: str | Path, fmt: str, max_row_bytes: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line or row number, canonical row) of every row of a data source (see sources.py), in one
    pass; once read, DataError naming every bad row (up to MAX_REPORTED), or that it holds none."""
    from orchestrator.data.sources import SourceSpec, read_source

    for where, row in read_source(SourceSpec(str(path), fmt), max_row_bytes):
        yield where.line, row


def read_rows(path: str | Path, fmt: str, max_row_bytes: int | None = None) -> list[dict]:
    """All rows of a data source, or DataError naming every bad row (up to MAX_REPORTED)."""
    return [row for _, row in iter_rows(path, fmt, max_row_bytes)]


def split_rows(
    path: str | Path, fmt: str, eval_path: str | Path | None, eval_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Train and eval rows. Without an eval file, the eval split is a seeded random subset of the
    rows (eval_split_indices), the same on every worker."""
    rows = read_rows(path, fmt)
    if eval_path:
        return rows, read_rows(eval_path, fmt)
    train_idx, eval_idx = split_indices(len(rows), eval_fraction, seed)
    return [rows[i] for i in train_idx], [rows[i] for i in eval_idx]


def split_indices(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) row indices, each ascending: eval is int(n * eval_fraction) rows drawn with
    the seed, the same on every worker."""
    import torch

    n_eval = int(n * eval_fraction)
    if n_eval == 0:
        return list(range(n)), []
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(perm[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)
