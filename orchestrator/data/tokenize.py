"""Turning rows into (input_ids, labels) with everything but the responses masked out."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

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


def _prompt_answer(
    tok: PreTrainedTokenizerBase, prompt: str, answer: str, max_len: int, train_on: str
) -> tuple[list[int], list[int]]:
    # Prompt and response are tokenized apart so the mask boundary is exact whatever the BPE merges.
    p = _tokenize(tok, prompt, max_len, add_special_tokens=True)["input_ids"]
    a = _tokenize(tok, answer, max_len - len(p), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p + a, (p if train_on == "all" else [IGNORE_INDEX] * len(p)) + a


def _encode_alpaca(row: dict, tok: PreTrainedTokenizerBase, max_len: int, train_on: str) -> tuple[list[int], list[int]]:
    return _prompt_answer(tok, alpaca_prompt(row), row["output"], max_len, train_on)


def _encode_completion(
    row: dict, tok: PreTrainedTokenizerBase, max_len: int, train_on: str
) -> tuple[list[int], list[int]]:
    return _prompt_answer(tok, row["prompt"], row["completion"], max_len, train_on)


def _encode_text(row: dict, tok: PreTrainedTokenizerBase, max_len: int, train_on: str) -> tuple[list[int], list[int]]:
    ids = _tokenize(tok, row["text"], max_len, add_special_tokens=True)["input_ids"] + [tok.eos_token_id]
    return ids, list(ids)


NOT_PREFIX_CONSISTENT = (
    "the tokenizer's chat template is not prefix-consistent: rendering the conversation up to an assistant "
    "turn before the last is not the start of rendering it whole (templates such as Qwen3's render reasoning tags on the last "
    "assistant turn only), so the earlier assistant turns cannot be located in it; set data.train_on=last_assistant "
    "to learn the final turn only, or use a template that renders every turn the same way"
)


def chat_spans(row: dict, tok: PreTrainedTokenizerBase, train_on: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, the character spans learned from it). Each assistant turn is
    located by rendering the conversation before it (with the generation prompt) and up to it,
    both of which must be prefixes of the whole: ValueError, with the remedy, where they are not."""
    msgs, tools = row["messages"], row.get("tools")
    if train_on == "last_assistant":
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        msgs = msgs[: last + 1]  # what follows the last answer is never learned, nor needed
    text = tok.apply_chat_template(msgs, tools=tools, tokenize=False)
    if train_on == "all":
        return text, [(0, len(text))]
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        turns = turns[-1:]
    spans = []
    for i in turns:
        start = (
            len(tok.apply_chat_template(msgs[:i], tools=tools, tokenize=False, add_generation_prompt=True)) if i else 0
        )
        end_text = text if i == len(msgs) - 1 else tok.apply_chat_template(msgs[: i + 1], tools=tools, tokenize=False)
        if not text.startswith(end_text) or start > len(end_text):
            raise ValueError(NOT_PREFIX_CONSISTENT)
        spans.append((start, len(end_text)))
    return text, spans


def _span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        for t, (a, _) in enumerate(offsets):
            if start <= a < end:
                labels[t] = ids[t]
    return labels


def _encode_chat(row: dict, tok: PreTrainedTokenizerBase, max_len: int, train_on: str) -> tuple[list[int], list[int]]:
    text, spans = chat_spans(row, tok, train_on)
    enc = _tokenize(tok, text, max_len, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], _span_labels(enc["input_ids"], enc["offset_mapping"], spans)


ENCODERS = {"alpaca": _encode_alpaca, "chat": _encode_chat, "completion": _encode_completion, "text": _encode_text}


def encode_row(
    row: dict, fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, train_on: str = "assistant"
) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one canonical row, truncated to max_seq_len tokens."""
    from orchestrator.data.formats import ENCODED_AS

    ids, labels = ENCODERS[ENCODED_AS.get(fmt, fmt)](row, tokenizer, max_seq_len, train_on)
    return ids[:max_seq_len], labels[:max_seq_len]


def encode_rows(
    rows: list[dict], fmt: str, tokenizer: PreTrainedTokenizerBase, max_seq_len: int, train_on: str = "assistant"
) -> list[tuple[list[int], list[int]]]:
    """Tokenize and truncate every row. Rows whose response is cut away entirely are kept
    (they carry no loss) so that every worker sees the same number of rows."""
    return [encode_row(row, fmt, tokenizer, max_seq_len, train_on) for row in rows]


def _fits(text: str, max_len: int) -> bool:
    """Whether _tokenize would tokenize `text` whole, in one call."""
    return len(text) <= CHARS_PER_TOKEN * (max(max_len, 0) + MARGIN_TOKENS)


def _batch_ids(tok: PreTrainedTokenizerBase, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """tok(texts)["input_ids"]. A fast tokenizer's Rust backend is called directly when nothing in
    it truncates or pads (transformers' own call switches both off): the same ids, without
    transformers building a dict per row (a sixth of the cache build's time)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tok(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]


def encode_batch(
    rows: list[dict], fmt: str, tok: PreTrainedTokenizerBase, max_len: int, train_on: str = "assistant"
) -> list[tuple[list[int], list[int]] | BaseException]:
    """encode_row of every row, with one batched tokenizer call per kind of text (the fast
    tokenizer's Rust loop), the same tokens to the last: texts long enough to be cut first, and
    rows that fail, go through encode_row alone. A row that cannot be encoded comes back as its
    exception."""
    from orchestrator.data.formats import ENCODED_AS

    fmt = ENCODED_AS.get(fmt, fmt)
    out: list = [None] * len(rows)
    if fmt in ("alpaca", "completion"):
        prompts = [alpaca_prompt(r) if fmt == "alpaca" else r["prompt"] for r in rows]
        answers = [r["output" if fmt == "alpaca" else "completion"] for r in rows]
        whole = [i for i, p in enumerate(prompts) if _fits(p, max_len)]
        p_ids = dict(zip(whole, _batch_ids(tok, [prompts[i] for i in whole], True)))
        ready = [i for i in whole if _fits(answers[i], max_len - len(p_ids[i]))]
        a_ids = _batch_ids(tok, [answers[i] for i in ready], False) if ready else []
        for i, a in zip(ready, a_ids):
            p, a = p_ids[i], a + [tok.eos_token_id]
            out[i] = ((p + a)[:max_len], ((p if train_on == "all" else [IGNORE_INDEX] * len(p)) + a)[:max_len])
    elif fmt == "text":
        whole = [i for i, r in enumerate(rows) if _fits(r["text"], max_len)]
        for i, ids in zip(whole, _batch_ids(tok, [rows[i]["text"] for i in whole], True)):
            ids = (ids + [tok.eos_token_id])[:max_len]
            out[i] = (ids, list(ids))
    elif fmt == "chat":
        rendered: dict[int, tuple[str, list]] = {}
        for i, r in enumerate(rows):
            try:
                rendered[i] = chat_spans(r, tok, train_on)
            except Exception as e:  # noqa: BLE001 - this row's own failure, reported with it
                out[i] = e
        whole = [i for i in rendered if _fits(rendered[i][0], max_len)]
        if whole:
            enc = tok([rendered[i][0] for i in whole], add_special_tokens=False, return_offsets_mapping=True)
            for k, i in enumerate(whole):
                ids = enc["input_ids"][k]
                labels = _span_labels(ids, enc["offset_mapping"][k], rendered[i][1])
                out[i] = (ids[:max_len], labels[:max_len])
    for i, r in enumerate(rows):
        if out[i] is None:
            try:
                out[i] = encode_row(r, fmt, tok, max_len, train_on)
            except Exception as e:  # noqa: BLE001 - reported with the row
                out[i] = e
    return out


def row_targets(labels: list[int]) -> int:
    """Loss tokens of one encoded row (position 0 is never a target: the model shifts labels)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


def target_tokens(examples: Any, indices: Iterable[int]) -> int:
    """Loss tokens of these examples (a list of (ids, labels), or rows of the tokenized cache, which
    counts them without reading tokens). The model shifts labels by one: position 0 is never a target."""
    if hasattr(examples, "target_tokens"):
        return examples.target_tokens(indices)
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
