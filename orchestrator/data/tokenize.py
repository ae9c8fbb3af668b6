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


def _encode_alpaca(row: dict, tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart so the mask boundary is exact whatever the BPE merges.
    prompt = tok(alpaca_prompt(row), add_special_tokens=True)["input_ids"]
    answer = tok(row["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def _encode_chat(row: dict, tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    msgs = row["messages"]
    text = tok.apply_chat_template(msgs, tokenize=False)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
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


def encode_rows(
    rows: list[dict], fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """Tokenize and truncate every row. Rows whose response is cut away entirely are kept
    (they carry no loss) so that every worker sees the same number of rows."""
    encode = ENCODERS[fmt]
    out = []
    for row in rows:
        ids, labels = encode(row, tokenizer)
        out.append((ids[:max_seq_len], labels[:max_seq_len]))
    return out


def target_tokens(examples: list[tuple[list[int], list[int]]], indices: Iterable[int]) -> int:
    """Loss tokens of these examples. The model shifts labels by one: position 0 is never a target."""
    return sum(sum(1 for t in examples[i][1][1:] if t != IGNORE_INDEX) for i in indices)


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
