import json

import pytest

from orchestrator.data import IGNORE_INDEX, DataError, GlobalBatchSampler, collate, encode_rows, read_rows
from orchestrator.data.tokenize import alpaca_prompt


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_bad_rows_are_reported_with_file_and_line(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"instruction": "a", "output": "b"}),
            "{not json",
            json.dumps({"instruction": "a"}),
            json.dumps({"instruction": "a", "output": 3}),
            json.dumps({"instruction": "a", "output": "  "}),
            json.dumps(["a list"]),
        ],
    )
    with pytest.raises(DataError) as e:
        read_rows(f, "alpaca")
    msg = str(e.value)
    assert f"{f}:2: not valid JSON" in msg
    assert f"{f}:3: missing field 'output'" in msg
    assert f"{f}:4: field 'output' must be a string" in msg
    assert f"{f}:5: empty 'output'" in msg
    assert f"{f}:6: expected a JSON object" in msg
    assert f"{f}:1:" not in msg


def test_bad_chat_rows(tmp_path):
    f = _write(
        tmp_path / "c.jsonl",
        [
            json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
            json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}),
            json.dumps({"text": "x"}),
        ],
    )
    with pytest.raises(DataError) as e:
        read_rows(f, "chat")
    msg = str(e.value)
    assert (
        ":1: no assistant message" in msg
        and ":2: messages[0].role 'robot'" in msg
        and ":3: missing field 'messages'" in msg
    )


def test_alpaca_masks_the_prompt(demo_model):
    from orchestrator.config import ModelConfig
    from orchestrator.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(demo_model)))
    row = {"instruction": "Reverse the words.", "input": "a b c", "output": "c b a"}
    [(ids, labels)] = encode_rows([row], "alpaca", tok, 512)
    n_prompt = len(tok(alpaca_prompt(row))["input_ids"])
    assert all(t == IGNORE_INDEX for t in labels[:n_prompt])
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids[n_prompt:], skip_special_tokens=True).strip() == "c b a"
    assert ids[-1] == tok.eos_token_id
    [(short, short_labels)] = encode_rows([row], "alpaca", tok, 8)
    assert len(short) == 8 and short == ids[:8]


def test_chat_labels_only_assistant_turns(demo_model):
    from orchestrator.config import ModelConfig
    from orchestrator.model import load_tokenizer

    tok = load_tokenizer(ModelConfig(path=str(demo_model)))
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ANSWER ONE"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "ANSWER TWO"},
        ]
    }
    [(ids, labels)] = encode_rows([row], "chat", tok, 512)
    learned = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert "ANSWER ONE" in learned and "ANSWER TWO" in learned
    assert "question" not in learned and "Be brief" not in learned


def test_collate_pads_and_masks():
    b = collate([([1, 2, 3], [IGNORE_INDEX, 2, 3]), ([4], [4])], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_sampler_shards_are_disjoint_and_match_one_worker():
    n, micro, accum, world = 103, 2, 3, 2
    shards = [GlobalBatchSampler(n, micro, accum, world, r, seed=7) for r in range(world)]
    single = GlobalBatchSampler(n, micro * world, accum, 1, 0, seed=7)
    assert single.steps_per_epoch == shards[0].steps_per_epoch == n // (micro * accum * world)
    seen = []
    for step in range(shards[0].steps_per_epoch * 2):  # crosses into the second epoch
        per_rank = [s.step_indices(step) for s in shards]
        for m in range(accum):
            union = sorted(i for r in range(world) for i in per_rank[r][m])
            assert union == sorted(single.step_indices(step)[m])
        flat = [i for r in per_rank for mb in r for i in mb]
        assert len(flat) == len(set(flat)) == micro * accum * world
        if step < shards[0].steps_per_epoch:
            seen += flat
    assert len(seen) == len(set(seen))  # no row twice within an epoch
    assert shards[0].permutation(0) != shards[0].permutation(1)  # reshuffled per epoch
    again = GlobalBatchSampler(n, micro, accum, world, 0, seed=7)
    assert again.step_indices(5) == shards[0].step_indices(5)  # deterministic, seekable
    assert GlobalBatchSampler(n, micro, accum, world, 0, seed=8).step_indices(0) != shards[0].step_indices(0)
