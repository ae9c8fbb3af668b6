"""The locally built demo assets: loadable, built once (even under a race), and fit for training."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from orchestrator import demo

ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}"
MAX_LEN = 128


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return demo.ensure_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tok(built):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(built)


def _forward(path: Path, tok) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([tok("Add the two numbers.")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_ensure_builds_a_loadable_model_and_tokenizer(built, tok):
    from transformers import AutoConfig

    assert built.name == "tiny-llama" and (built / demo.MARKER).is_file()
    assert (built / "model.safetensors").is_file()
    cfg = AutoConfig.from_pretrained(built)
    assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the alpaca encoder relies on BOS being added
    logits = _forward(built, tok)
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_second_call_does_not_rebuild(built):
    before = (built / demo.MARKER).stat().st_mtime_ns
    assert demo.ensure_demo_assets(built.parent) == built
    assert (built / demo.MARKER).stat().st_mtime_ns == before
    assert [p.name for p in built.parent.iterdir()] == ["tiny-llama"]  # no temp dirs left behind


def test_concurrent_builders_agree_on_one_copy(tmp_path, monkeypatch):
    # The barrier holds both builders until each has a complete copy, so both reach the rename.
    barrier = threading.Barrier(2, timeout=60)
    build = demo.build_tiny_model

    def build_then_wait(*args, **kwargs):
        out = build(*args, **kwargs)
        barrier.wait()
        return out

    monkeypatch.setattr(demo, "build_tiny_model", build_then_wait)
    results: list[Path] = []
    errors: list[BaseException] = []

    def call():
        try:
            results.append(demo.ensure_demo_assets(tmp_path))
        except BaseException as e:  # noqa: BLE001 - re-raised by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [tmp_path / "tiny-llama"] * 2
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]
    assert (tmp_path / "tiny-llama" / demo.MARKER).is_file()


def test_incomplete_directory_is_replaced(tmp_path):
    stale = tmp_path / "tiny-llama"
    stale.mkdir()
    (stale / "config.json").write_text("{")  # e.g. a build that died half way under older code
    out = demo.ensure_demo_assets(tmp_path)
    assert (out / demo.MARKER).is_file() and json.loads((out / "config.json").read_text())


def test_chat_template_is_prefix_consistent_at_token_level(tok):
    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    n_turns = 0
    for row in _rows(demo.DEMO_CHAT_DATA):
        msgs = row["messages"]
        whole = tok.apply_chat_template(msgs, tokenize=False)
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            prompt = tok.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True)
            upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
            assert upto.startswith(prompt) and whole.startswith(upto)
            assert upto.endswith(tok.eos_token)
            p, u = ids(prompt), ids(upto)
            assert u[: len(p)] == p, (prompt, upto)
            assert tok.decode(u[len(p) :], skip_special_tokens=True).strip() == m["content"]
            n_turns += 1
    assert n_turns > len(_rows(demo.DEMO_CHAT_DATA))  # some rows have two assistant turns


def test_demo_rows_fit_in_128_tokens(tok):
    alpaca = _rows(demo.DEMO_DATA)
    assert len(alpaca) == 320 and any(not r["input"] for r in alpaca)
    lengths = [len(tok(ALPACA.format(**r))["input_ids"]) + 1 for r in alpaca]  # +1: EOS
    chat = _rows(demo.DEMO_CHAT_DATA)
    assert len(chat) == 64 and any(r["messages"][0]["role"] == "system" for r in chat)
    lengths += [
        len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
        for r in chat
    ]
    assert max(lengths) <= MAX_LEN, max(lengths)


def test_generators_are_deterministic(tmp_path):
    demo.generate_demo_data(tmp_path / "a.jsonl")
    demo.generate_chat_data(tmp_path / "c.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == demo.DEMO_DATA.read_bytes()
    assert (tmp_path / "c.jsonl").read_bytes() == demo.DEMO_CHAT_DATA.read_bytes()


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_architectures_build_and_run(arch, built, tok, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    path = demo.build_tiny_model(tmp_path / arch, tokenizer_dir=built, arch=arch)
    assert AutoConfig.from_pretrained(path).model_type == arch
    assert AutoTokenizer.from_pretrained(path).chat_template == tok.chat_template
    logits = _forward(path, tok)
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_unknown_arch_is_rejected(built, tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        demo.build_tiny_model(tmp_path / "x", tokenizer_dir=built, arch="gpt9")
