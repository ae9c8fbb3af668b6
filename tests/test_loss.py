"""The chunked loss (orchestrator/loss.py) computes transformers' loss and gradients without the
full-vocabulary logits."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoTokenizer

from orchestrator.adapters import attach_adapter
from orchestrator.config.schema import AdapterConfig, ModelConfig, QuantConfig
from orchestrator.data import collate, encode_rows, read_rows
from orchestrator.demo import DEMO_DATA
from orchestrator.loss import LossHead, build_loss, full_loss
from orchestrator.model import load_base


def _model_and_batch(demo_root, quant: str):
    path = demo_root / "tiny-llama"
    model = attach_adapter(
        load_base(ModelConfig(path=str(path), dtype="fp32"), QuantConfig(kind=quant)), AdapterConfig(r=4, dropout=0.0)
    )
    tok = AutoTokenizer.from_pretrained(path)
    rows = encode_rows(read_rows(DEMO_DATA, "alpaca")[:6], "alpaca", tok, 96)
    return model, collate(rows, tok.pad_token_id), sum(sum(t != -100 for t in lab[1:]) for _, lab in rows)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_chunked_loss_and_adapter_gradients_equal_transformers(demo_root, quant):
    model, batch, n = _model_and_batch(demo_root, quant)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fn):
        model.zero_grad(set_to_none=True)
        loss = fn(model, batch, n)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    want, want_grads = loss_and_grads(full_loss)
    for chunk in (1, 7, 4096):
        head = model.get_output_embeddings()
        head.__class__ = torch.nn.Linear  # build_loss again with another chunk size
        fn = build_loss(model, chunk)
        assert type(model.get_output_embeddings()) is LossHead
        got, grads = loss_and_grads(fn)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert model(**{k: v for k, v in batch.items() if k != "labels"}).logits.shape[-1] == model.config.vocab_size


def test_heads_that_are_not_a_plain_frozen_linear_keep_transformers_loss(demo_root):
    model, _, _ = _model_and_batch(demo_root, "none")
    assert build_loss(model, 0) is full_loss
    model.config.final_logit_softcapping = 30.0  # Gemma's: the logits change after the head
    assert build_loss(model, 1024) is full_loss
    assert type(model.get_output_embeddings()) is torch.nn.Linear


PEAK = textwrap.dedent("""
    import json, resource, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from orchestrator.loss import build_loss
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # something to train
    ids = torch.randint(0, cfg.vocab_size, (2, 512))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    fn = build_loss(model, int(sys.argv[1]))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn(model, batch, ids.numel()).backward()
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
""")


@pytest.mark.slow
def test_a_128k_vocabulary_step_peaks_far_lower_without_full_logits():
    """1,024 tokens x 128,256 vocabulary: the fp32 logits alone are 0.5 GiB, and transformers
    holds them, their log-softmax and their gradient at once."""
    peak = {
        chunk: json.loads(
            subprocess.run([sys.executable, "-c", PEAK, str(chunk)], capture_output=True, text=True, check=True).stdout
        )
        for chunk in (0, 64)
    }
    logits = 1024 * 128256 * 4
    print({k: f"{v / 2**20:.0f} MiB" for k, v in peak.items()})
    assert peak[0] > 1.5 * logits  # the full path really holds the logits more than once
    # Chunks of 64 positions: 1/16 of the logits at a time (twice, with log-sum-exp's scratch), none kept.
    assert peak[64] < 0.3 * logits
