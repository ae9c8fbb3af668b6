"""The layer-by-layer loader (orchestrator/loading.py) against transformers' from_pretrained: the
same base bit for bit, the same adapter init, the same logits, and clear errors for bad files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from orchestrator.adapters import attach_adapter
from orchestrator.config.schema import AdapterConfig, ModelConfig, QuantConfig
from orchestrator.loading import LoadError
from orchestrator.model import bnb_config, load_base, load_model


def from_pretrained(path, dtype: str, quant: str, adapter: AdapterConfig):
    """Today's path before this loader: transformers loads the whole base, PEFT attaches."""
    from transformers import AutoModelForCausalLM

    cfg = ModelConfig(path=str(path), dtype=dtype)
    kwargs = {"dtype": {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype], "device_map": {"": "cpu"}}
    if quant == "nf4":
        kwargs["quantization_config"] = bnb_config(cfg, QuantConfig(kind="nf4"))
    base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    for m in base.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    base.requires_grad_(False)
    base.config.use_cache = False
    return attach_adapter(base, adapter)


def bits(t: torch.Tensor) -> torch.Tensor:
    # Packed 4-bit storage read as floats holds NaN patterns, which torch.equal never calls equal.
    return t.detach().contiguous().view(torch.uint8)


def assert_same_model(ref, new) -> None:
    rs, ns = ref.state_dict(), new.state_dict()
    assert rs.keys() == ns.keys()
    for k in rs:
        assert type(rs[k]) is type(ns[k]) and rs[k].dtype == ns[k].dtype, k
        assert torch.equal(bits(rs[k]), bits(ns[k])), k
    for (kr, br), (kn, bn) in zip(ref.named_buffers(), new.named_buffers()):
        assert kr == kn and br.dtype == bn.dtype and torch.equal(br, bn), kr
    for name, m in new.named_modules():
        state = getattr(getattr(m, "weight", None), "quant_state", None)
        if state is not None:  # the absmax that dequantizes the packed weight
            assert torch.equal(state.absmax, ref.get_submodule(name).weight.quant_state.absmax), name
    assert [m.training for m in ref.modules()] == [m.training for m in new.modules()]
    ref.eval(), new.eval()  # LoRA dropout draws from the RNG; DoRA's output depends on it
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ref(input_ids=ids).logits, new(input_ids=ids).logits)


@pytest.mark.parametrize(
    "dtype,quant,kind",
    [("fp32", "none", "lora"), ("bf16", "none", "rslora"), ("fp32", "nf4", "lora"), ("bf16", "nf4", "dora")],
)
def test_layer_by_layer_load_equals_from_pretrained(demo_model, dtype, quant, kind):
    adapter = AdapterConfig(kind=kind, r=4, alpha=8)
    ref = from_pretrained(demo_model, dtype, quant, adapter)
    new, counts = load_model(ModelConfig(path=str(demo_model), dtype=dtype), QuantConfig(kind=quant), adapter, "cpu")
    assert_same_model(ref, new)
    assert counts == ref.get_nb_trainable_parameters()
    assert [n for n, p in new.named_parameters() if p.requires_grad] == [
        n for n, p in ref.named_parameters() if p.requires_grad
    ]


@pytest.fixture(scope="module")
def tied_sharded_model(tmp_path_factory):
    """A tiny Llama with tied embeddings saved as a sharded checkpoint (index + several files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tied")
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(out, max_shard_size="20KB")
    assert (out / "model.safetensors.index.json").is_file()
    return out


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_tied_embeddings_and_sharded_checkpoint(tied_sharded_model, quant):
    adapter = AdapterConfig(r=4, alpha=8)
    ref = from_pretrained(tied_sharded_model, "fp32", quant, adapter)
    new, _ = load_model(
        ModelConfig(path=str(tied_sharded_model), dtype="fp32"), QuantConfig(kind=quant), adapter, "cpu"
    )
    assert_same_model(ref, new)
    base = new.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight


def test_each_layer_is_handed_over_before_the_next_is_read(demo_model):
    """The strategy's hook sees every decoder layer complete while the later ones are still meta,
    then the embeddings while the output head is still meta, then the head, and the root last:
    what bounds a sharding worker to its shard plus about one unit."""
    from orchestrator.strategies.fsdp import decoder_layers

    seen = []

    def shard(module):
        base = model.get_base_model()
        units = [*decoder_layers(base), base.get_input_embeddings(), base.get_output_embeddings()]
        real = [any(not p.is_meta for p in unit.parameters() if not p.requires_grad) for unit in units]
        meta_params = [n for n, p in module.named_parameters() if p.is_meta]
        seen.append((module, real, meta_params))

    from orchestrator import loading

    cfg = ModelConfig(path=str(demo_model), dtype="fp32")
    model = loading.skeleton(cfg, QuantConfig(kind="nf4"), AdapterConfig(r=4))
    loading.fill(model, cfg, "cpu", shard)
    base = model.get_base_model()
    units = [*decoder_layers(base), base.get_input_embeddings(), base.get_output_embeddings()]
    assert base.get_output_embeddings().weight is not base.get_input_embeddings().weight  # the demo's are untied
    assert [m for m, _, _ in seen] == [*units, model]
    for i, (_, real, meta_params) in enumerate(seen[:-1]):
        assert real == [j <= i for j in range(len(units))] and not meta_params
    assert not seen[-1][2]


def rewrite(src, dst, change) -> None:
    """A copy of the model directory src whose model.safetensors went through change(tensors)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    save_file(change(load_file(src / "model.safetensors")), dst / "model.safetensors")


def test_missing_or_misshapen_tensor_is_named_with_its_file(demo_model, tmp_path):
    missing, misshapen = tmp_path / "missing", tmp_path / "misshapen"
    key = "model.layers.1.mlp.up_proj.weight"
    rewrite(demo_model, missing, lambda t: {k: v for k, v in t.items() if k != key})
    rewrite(demo_model, misshapen, lambda t: {**t, key: t[key][:-1].clone()})
    with pytest.raises(LoadError, match=rf"no tensor '{key}' in .*{missing / 'model.safetensors'}"):
        load_base(ModelConfig(path=str(missing), dtype="fp32"), QuantConfig())
    shape = list(load_file(demo_model / "model.safetensors")[key].shape)
    with pytest.raises(
        LoadError, match=rf"{misshapen / 'model.safetensors'}: tensor '{key}' has shape \[{shape[0] - 1}, {shape[1]}\]"
    ):
        load_base(ModelConfig(path=str(misshapen), dtype="fp32"), QuantConfig(kind="nf4"))


def test_truncated_file_is_refused_from_its_header(demo_model, tmp_path):
    cut = tmp_path / "cut"
    rewrite(demo_model, cut, lambda t: t)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(LoadError, match="truncated"):
        load_base(ModelConfig(path=str(cut), dtype="fp32"), QuantConfig())
