"""Turning rows into (input_ids, labels) with everything but the responses masked out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ALPACA_RESPONSE = "### Response:\n"


def alpaca_prompt(row: dict) -> str:
    text = ALPACA_PROMPT.format(instruction=row["instruction"])
    if row.get("input"):
        text += ALPACA_INPUT.format(input=row["input"])
    return text + ALPACA_RESPONSE


# Text is cut before it is tokenized, so that a row far longer than max_seq_len costs no more than
# one of max_seq_len tokens (tokenizing 50 MB whole takes gigabytes). The cut keeps CHARS_PER_TOKEN
# characters per token needed, plus a margin; should that yield too few tokens (text of very long
# tokens), four times as much is tried, up to the whole text. Tokens before the cut's last words are
# what the whole text gives, so the first max_len tokens are unchanged.
CHARS_PER_TOKEN = 8
MARGIN_TOKENS = 32


def _tokenize(tok: PreTrainedTokenizerBase, text: str, max_len: int, **kwargs) -> dict:
    """tok(text, **kwargs), of which at least the first `max_len` tokens are exact."""
    limit = CHARS_PER_TOKEN * (max(max_len, 0) + MARGIN_TOKENS)
    while len(text) > limit:
        enc = tok(text[:limit], **kwargs)
        if len(enc["input_ids"]) >= max_len + MARGIN_TOKENS:
            return enc
        limit *= 4
    return tok(text, **kwargs)


def _encode_alpaca(row: dict, tok: PreTrainedTokenizerBase, max_len: int) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart so the mask boundary is exact whatever the BPE merges.
    prompt = _tokenize(tok, alpaca_prompt(row), max_len, add_special_tokens=True)["input_ids"]
    answer = _tokenize(tok, row["output"], max_len - len(prompt), add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _encode_chat(row: dict, tok: PreTrainedTokenizerBase, max_len: int) -> tuple[list[int], list[int]]:
    msgs = row["messages"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = _tokenize(tok, text, max_len, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start = len(tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)) if i else 0
        end_text = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not text.startswith(end_text) or start > len(end_text):
            raise ValueError(
                "the tokenizer's chat template is not prefix-consistent (rendering the first turns is not a "
                "prefix of rendering the whole conversation), so assistant turns cannot be located"
            )
        for t, (a, _) in enumerate(offsets):
            if start <= a < len(end_text):
                labels[t] = ids[t]
    return ids, labels


ENCODERS = {"alpaca": _encode_alpaca, "chat": _encode_chat}


def encode_row(
    row: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row, truncated to max_seq_len tokens."""
    ids, labels = ENCODERS[fmt](row, tokenizer, max_seq_len)
    return ids[:max_seq_len], labels[:max_seq_len]


def encode_rows(
    rows: list[dict], fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """Tokenize and truncate every row. Rows whose response is cut away entirely are kept
    (they carry no loss) so that every worker sees the same number of rows."""
    return [encode_row(row, fmt, tokenizer, max_seq_len) for row in rows]


def row_targets(labels: list[int]) -> int:
    """Loss tokens of one encoded row (position 0 is never a target: the model shifts labels)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def target_tokens(examples: list[tuple[list[int], list[int]]], indices: Iterable[int]) -> int:
    """Loss tokens of these examples. The model shifts labels by one: position 0 is never a target."""
    return sum(row_targets(examples[i][1]) for i in indices)


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding is masked in attention and loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        attention[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
