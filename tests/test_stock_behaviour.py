"""kvtune never changes what a model computes with transformers' own caches (issue 12.1), and where nothing is
compressed its own path is bit-identical to stock SDPA."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

import kvtune


def _batch(rows: int):
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, 97, (rows, 24), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, rows):  # left padding of different widths
        mask[row, : 3 * row] = 0
        ids[row, : 3 * row] = 0
    return ids, mask


def _stock_runs(model, ids, mask):
    """Greedy tokens and scores of stock generate with a static and a dynamic cache."""
    runs = {}
    for name, extra in (
        ("static", {"cache_implementation": "static"}),
        ("dynamic", {"cache": DynamicCache(config=model.config)}),
    ):
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_scores=True,
            **extra,
        )
        runs[name] = (out.sequences, torch.stack(out.scores))
    return runs


def _touch(model, how: str, ids, mask):
    with torch.no_grad():
        if how == "compress":
            with kvtune.compress(model, "snapkv", budget=8, window=4):
                model(ids, attention_mask=mask, use_cache=True)
        elif how == "new_cache":
            cache = kvtune.new_cache(model, kvtune.methods.build("h2o", budget=8))
            model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        else:  # kvtune.generate's own loop
            cache = kvtune.new_cache(model, kvtune.methods.build("streaming_llm", budget=8))
            logits, full_mask = kvtune.api.prefill(model, cache, ids, mask)
            kvtune.api.greedy(model, cache, logits, full_mask, 3, None)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("how", ["compress", "new_cache", "generate"])
def test_stock_generate_is_unchanged_after_kvtune(how, rows):
    untouched, model = tiny_llama(), tiny_llama()
    ids, mask = _batch(rows)
    expected = _stock_runs(untouched, ids, mask)
    _touch(model, how, ids, mask)
    assert model.config._attn_implementation == "sdpa"
    got = _stock_runs(model, ids, mask)
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]), name
        assert torch.equal(got[name][1], expected[name][1]), name


def test_compress_refuses_a_static_cache_clearly():
    model = tiny_llama()
    ids, mask = _batch(3)
    with pytest.raises(ValueError, match="cannot honour a StaticCache"), kvtune.compress(model, "snapkv", budget=8):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, cache_implementation="static")


def test_assisted_decoding_is_refused_inside_compress_and_stock_after_it():
    """Drafts are verified by multi-token forwards, which a compressing cache would compress: transformers refuses
    a cache it may not crop at will. After `compress`, the model's own assisted decoding is untouched."""
    model, untouched = tiny_llama(), tiny_llama()
    ids = torch.randint(1, 97, (1, 30), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="cropped"), kvtune.compress(model, "snapkv", budget=8):
        model.generate(ids, **settings)
    assert torch.equal(model.generate(ids, **settings), untouched.generate(ids, **settings))


def test_rectangular_layers_are_bit_identical_to_stock_sdpa():
    """No padding, nothing evicted: kvtune's path makes transformers' own SDPA calls (prefill and decode)."""
    model, stock = tiny_llama(), tiny_llama()
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache, reference = kvtune.new_cache(model), DynamicCache(config=stock.config)
        got, want = model(ids, past_key_values=cache), stock(ids, past_key_values=reference)
        assert torch.equal(got.logits, want.logits)
        for step in range(4):
            token = got.logits[:, -1:].argmax(-1)
            got, want = model(token, past_key_values=cache), stock(token, past_key_values=reference)
            assert torch.equal(got.logits, want.logits), step


def test_compress_refuses_a_filled_transformers_cache_and_exits_cleanly():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        filled = model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
        with pytest.raises(ValueError, match="already holds 30 tokens"):
            with kvtune.compress(model, "snapkv", budget=8):
                model(ids[:, :1], past_key_values=filled, use_cache=True)


def test_a_copy_taken_inside_compress_stops_compressing_after_it():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 60))
    with torch.no_grad():
        with kvtune.compress(model, "streaming_llm", budget=16):
            cache = model(ids, use_cache=True).past_key_values
            copied = copy.deepcopy(cache)
            assert copied.policy is not None
        assert copied.policy is None and cache.policy is None
        model(ids[:, :5], past_key_values=copied, position_ids=torch.arange(60, 65)[None], use_cache=True)
    assert all(int(n.max()) == 21 for n in copied.lengths())


def test_peft_wrapped_model_switches_per_forward():
    from peft import LoraConfig, get_peft_model

    untouched, base = tiny_llama(), tiny_llama()
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=True))
    ids, mask = _batch(1)
    with torch.no_grad(), kvtune.compress(model, "snapkv", budget=8):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    expected = _stock_runs(untouched, ids, mask)["static"][0]
    got = model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static"
    )
    assert torch.equal(got, expected)
