"""Sample packing (orchestrator/data/packing.py): several examples per row, each attending only to
itself, with the same per-example losses as unpacked rows."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.data import GlobalBatchSampler, collate, encode_rows, read_rows, target_tokens
from orchestrator.data.packing import PackedRows, collate_packed, enabled, pack, supported
from orchestrator.demo import DEMO_DATA
from orchestrator.loss import build_loss, full_loss


def test_next_fit_fills_rows_in_a_seeded_order_and_keeps_every_example_once():
    lengths = np.array([5, 9, 3, 7, 2, 8, 10, 1, 6, 4])
    members, starts = pack(lengths, 12, seed=3)
    assert sorted(members.tolist()) == list(range(10))
    rows = [members[a:b] for a, b in zip(starts[:-1], starts[1:])]
    assert all(lengths[r].sum() <= 12 for r in rows)
    # next-fit: a row closes only when the next example does not fit in it
    assert all(lengths[r].sum() + lengths[nxt[0]] > 12 for r, nxt in zip(rows, rows[1:]))
    again = pack(lengths, 12, seed=3)
    assert np.array_equal(again[0], members) and np.array_equal(again[1], starts)
    assert not np.array_equal(pack(lengths, 12, seed=4)[0], members)
    assert pack(np.array([], np.int64), 12, 0)[1].tolist() == [0]


@pytest.fixture(scope="module")
def tiny(demo_model):
    tok = AutoTokenizer.from_pretrained(demo_model)
    rows = encode_rows(read_rows(DEMO_DATA, "alpaca")[:12], "alpaca", tok, 96)
    return tok, rows


def _token_losses(model, batch) -> torch.Tensor:
    """Each position's cross-entropy for the next token (0 where it is no target)."""
    # No KV cache: with one, transformers would not read packed rows from the position ids.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none") * (
        labels != -100
    )
    return loss


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_per_example_losses_of_a_packed_row_equal_the_unpacked_ones(demo_model, tiny, attn):
    tok, rows = tiny
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32, attn_implementation=attn).eval()
    examples = rows[:5]
    packed = collate_packed([examples[:3], examples[3:]], tok.pad_token_id)  # two rows, the second padded
    assert "attention_mask" not in packed
    with torch.no_grad():
        got = _token_losses(model, packed)
        for r, row in enumerate([examples[:3], examples[3:]]):
            at = 0
            for ids, lab in row:
                alone = _token_losses(model, collate([(ids, lab)], tok.pad_token_id))[0]
                n = len(ids)
                torch.testing.assert_close(got[r, at : at + n - 1], alone, rtol=0, atol=1e-5)
                at += n
                # The last position of an example would predict the next one's first token: no target.
                assert got[r, at - 1 :].abs().sum() == 0 or at < packed["input_ids"].shape[1]
            assert got[r, at - 1 :].abs().sum() == 0  # nor are the padding's positions


def test_packed_loss_and_its_target_count_equal_the_unpacked_batch(demo_model, tiny):
    """Through the training loop's loss (the chunked head and transformers' own), normalised by target tokens."""
    tok, rows = tiny
    model = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()
    packed_rows = PackedRows(rows, 200, seed=0)
    assert len(packed_rows) < len(rows) and 0.5 < packed_rows.fill() <= 1
    everything = list(range(len(packed_rows)))
    n = target_tokens(packed_rows, everything)
    assert n == target_tokens(rows, range(len(rows)))
    assert sum(packed_rows.length(b) for b in everything) == sum(len(ids) for ids, _ in rows)
    packed = collate_packed([packed_rows[b] for b in everything], tok.pad_token_id)
    assert packed["input_ids"].shape[1] <= 200
    with torch.no_grad():
        want = full_loss(model, collate(rows, tok.pad_token_id), n)
        torch.testing.assert_close(full_loss(model, packed, n), want, rtol=0, atol=1e-5)
        chunked = build_loss(model, 64)
        torch.testing.assert_close(chunked(model, packed, n), want, rtol=0, atol=1e-5)


def test_one_worker_sees_the_packed_rows_of_n():
    lengths = np.random.default_rng(0).integers(5, 60, size=400)
    rows = [([1] * int(n), [1] * int(n)) for n in lengths]
    packed = PackedRows(rows, 128, seed=7)
    one = GlobalBatchSampler(len(packed), 8, 2, 1, 0, seed=7)
    two = [GlobalBatchSampler(len(packed), 4, 2, 2, r, seed=7) for r in range(2)]
    for step in (0, 5, one.steps_per_epoch + 1):
        mine = sorted(i for m in one.step_indices(step) for i in m)
        theirs = sorted(i for s in two for m in s.step_indices(step) for i in m)
        assert mine == theirs


@pytest.mark.parametrize(
    "model_type, packs",
    [("llama", True), ("qwen2", True), ("mistral", True), ("bloom", False), ("jamba", False), ("no_such", False)],
)
def test_packing_is_on_where_transformers_keeps_packed_examples_apart(tmp_path, model_type, packs):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    assert supported(tmp_path) is packs
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": {"AutoModel": "x.Y"}}))
    assert not supported(tmp_path)  # remote code: unknown


def test_length_grouping_cuts_padding_and_keeps_the_rows_of_each_step():
    lengths = np.random.default_rng(1).integers(4, 200, size=2000)
    plain = GlobalBatchSampler(2000, 4, 2, 2, 0, seed=3)
    grouped = [GlobalBatchSampler(2000, 4, 2, 2, r, seed=3, lengths=lengths) for r in range(2)]
    one = GlobalBatchSampler(2000, 16, 1, 1, 0, seed=3, lengths=lengths)

    def padding(micros):
        return sum(len(m) * lengths[m].max() - lengths[m].sum() for m in micros)

    steps = range(plain.steps_per_epoch + 3)  # into the second epoch
    seen = [i for s in range(plain.steps_per_epoch) for i in grouped[0].all_step_indices(s)]
    assert sorted(seen) == sorted(plain.permutation(0)[: len(seen)])  # an epoch is still the same rows once
    for s in steps:
        assert sorted(one.all_step_indices(s)) == sorted(i for g in grouped for m in g.step_indices(s) for i in m)
    cut = sum(padding(g.step_indices(s)) for g in grouped for s in steps)
    full = sum(padding(GlobalBatchSampler(2000, 4, 2, 2, r, seed=3).step_indices(s)) for r in range(2) for s in steps)
    assert cut < 0.2 * full


def test_packing_asked_of_a_model_that_cannot_pack_is_refused_before_launch(demo_model, tmp_path):
    from orchestrator.config import ConfigError, compose, validate

    model = tmp_path / "bloomish"
    shutil.copytree(demo_model, model)
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(
        json.dumps({**cfg, "model_type": "bloom", "architectures": ["BloomForCausalLM"]})
    )
    overrides = ["experiment=demo", "tracking=none", f"output_dir={tmp_path / 'out'}", f"model.path={model}"]
    with pytest.raises(ConfigError) as e:
        validate(compose([*overrides, "data.packing=true"]))
    assert any(
        p.startswith("data.packing: true, but transformers' bloom does not read packed rows from position ids")
        for p in e.value.problems
    ), e.value.problems
    run = compose(overrides)
    assert run.data.packing is None and not enabled(run)  # by default: off for it, on for the Llama
    assert enabled(compose([*overrides[:-1], f"model.path={demo_model}"]))
