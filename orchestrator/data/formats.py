"""Reading and checking JSONL rows, with file:line for every bad row."""

from __future__ import annotations

import json
from pathlib import Path

MAX_REPORTED = 20
ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """Bad rows in a data file, each with file:line and the reason."""

    def __init__(self, problems: list[str], total: int | None = None):
        self.problems = problems
        more = f"\n  ... and {total - len(problems)} more" if total and total > len(problems) else ""
        super().__init__("invalid data:\n" + "\n".join(f"  - {p}" for p in problems) + more)


def _check_alpaca(row: dict) -> str | None:
    for key in ("instruction", "output"):
        if key not in row:
            return f"missing field '{key}' (alpaca rows need instruction, output and optionally input)"
    for key in ("instruction", "input", "output"):
        if key in row and not isinstance(row[key], str):
            return f"field '{key}' must be a string, got {type(row[key]).__name__}"
    if not row["instruction"].strip():
        return "empty 'instruction'"
    if not row["output"].strip():
        return "empty 'output' (the response is what the model learns)"
    return None


def _check_chat(row: dict) -> str | None:
    msgs = row.get("messages")
    if msgs is None:
        return "missing field 'messages' (chat rows need a list of {role, content})"
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"messages[{i}] must be an object with 'role' and 'content'"
        if m["role"] not in ROLES:
            return f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"messages[{i}].content must be a string, got {type(m['content']).__name__}"
    answers = [m for m in msgs if m["role"] == "assistant"]
    if not answers:
        return "no assistant message (nothing to learn from this row)"
    if any(not m["content"].strip() for m in answers):
        return "empty assistant message"
    return None


CHECKS = {"alpaca": _check_alpaca, "chat": _check_chat}


def read_rows(path: str | Path, fmt: str) -> list[dict]:
    """All rows of a JSONL file, or DataError naming every bad line (up to MAX_REPORTED)."""
    path = Path(path)
    if not path.is_file():
        raise DataError([f"{path}: no such file"])
    check = CHECKS[fmt]
    rows, problems, bad = [], [], 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                reason = f"not valid JSON ({e.msg} at column {e.colno})"
            else:
                reason = "expected a JSON object" if not isinstance(row, dict) else check(row)
            if reason:
                bad += 1
                if len(problems) < MAX_REPORTED:
                    problems.append(f"{path}:{lineno}: {reason}")
                continue
            rows.append(row)
    if problems:
        raise DataError(problems, total=bad)
    if not rows:
        raise DataError([f"{path}: contains no rows"])
    return rows


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
