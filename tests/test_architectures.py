"""Hybrid and sliding-window architectures (issue 12.4): sliding layers keep exactly their window, full-attention
layers are compressed by the method, Gemma 2's logit soft-capping is applied as stock applies it.

Tiny random models of each family, against transformers' own DynamicCache (which builds sliding layers from the
same config): exact logits at a budget above the context, and storage that is the sliding windows plus the
compressed full layers below it.
"""

from __future__ import annotations

import pytest
import torch
from conftest import greedy_logits
from transformers import (
    DynamicCache,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kvtune
from kvtune.attention import layer_windows
from kvtune.cache import KVCache
from kvtune.validation import UserError

WINDOW, CONTEXT, STEPS = 8, 36, 4
TOLERANCE = 1e-4  # as tests/test_exactness.py
ENTRY_BYTES = 2 * 8 * 4 + 4  # fp32 key and value of head_dim 8, and the entry's int32 position
SEGMENT_BYTES = 2 * 8  # per (batch row, KV head) of a rebuilt layer: its entry count and end offset (two int64)
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
COMMON = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    head_dim=HEAD_DIM,
    max_position_embeddings=256,
    sliding_window=WINDOW,
)
SLIDE, FULL = "sliding_attention", "full_attention"

# family: (model class, config) with the sliding layers the family puts where its config says
FAMILIES = {
    "mistral": (MistralForCausalLM, lambda: MistralConfig(num_hidden_layers=2, **COMMON)),  # every layer slides
    "qwen2": (  # use_sliding_window: layers from max_window_layers on slide
        Qwen2ForCausalLM,
        lambda: Qwen2Config(num_hidden_layers=3, use_sliding_window=True, max_window_layers=1, **COMMON),
    ),
    "gemma2": (  # alternating local/global; logit soft-capping at 5 (not 50) and larger weights, so that it bites
        Gemma2ForCausalLM,
        lambda: Gemma2Config(
            num_hidden_layers=4, query_pre_attn_scalar=16, attn_logit_softcapping=5.0, initializer_range=0.2, **COMMON
        ),
    ),
    "gemma3": (  # explicit layer types; sliding layers use their own RoPE base (10K vs 1M for global layers)
        Gemma3ForCausalLM,
        lambda: Gemma3TextConfig(
            num_hidden_layers=4, query_pre_attn_scalar=16, layer_types=[SLIDE, SLIDE, FULL, SLIDE], **COMMON
        ),
    ),
    "qwen3": (
        Qwen3ForCausalLM,
        lambda: Qwen3Config(num_hidden_layers=4, use_sliding_window=True, layer_types=[FULL, SLIDE] * 2, **COMMON),
    ),
}
EXPECTED_SLIDING = {
    "mistral": [0, 1],
    "qwen2": [1, 2],
    "gemma2": [0, 2],
    "gemma3": [0, 1, 3],
    "qwen3": [1, 3],
}
METHODS = ["full", "snapkv", "adakv_snapkv", "h2o", "tova", "streaming_llm"]


def _model(family: str, seed: int = 0):
    cls, config = FAMILIES[family]
    torch.manual_seed(seed)
    return cls(config()).eval()


def _inputs(rows: int):
    """``rows`` sequences of CONTEXT tokens; row ``i`` left-padded by ``5 i`` (padding inside the first window)."""
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, 97, (rows, CONTEXT), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, : 5 * row] = 0
        ids[row, : 5 * row] = 0
    return ids, mask


@pytest.fixture(scope="module")
def stock():
    """Reference logits per (family, rows): the stock model with transformers' DynamicCache."""
    found = {}
    with torch.no_grad():
        for family in FAMILIES:
            model = _model(family)
            for rows in (1, 3):
                ids, mask = _inputs(rows)
                found[family, rows] = greedy_logits(model, ids, mask, DynamicCache(config=model.config), STEPS)
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_windows_are_read_as_transformers_reads_them(family):
    model = _model(family)
    windows = layer_windows(model)
    assert [i for i, w in enumerate(windows) if w is not None] == EXPECTED_SLIDING[family]
    assert all(w in (None, WINDOW) for w in windows)
    stock_cache = DynamicCache(config=model.config)
    assert [i for i, sliding in enumerate(stock_cache.is_sliding) if sliding] == EXPECTED_SLIDING[family]


@pytest.mark.filterwarnings("ignore:every layer of MistralForCausalLM")
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_logits_above_the_budget(family, rows, stock):
    """Prefill of 36 tokens (4.5 windows) and 4 greedy steps: every method equals DynamicCache."""
    model = _model(family)
    ids, mask = _inputs(rows)
    expected = stock[family, rows]
    for method in METHODS:
        with torch.no_grad():
            if method == "full":
                got = greedy_logits(model, ids, mask, kvtune.new_cache(model), STEPS)
            else:
                with kvtune.compress(model, method, budget=4 * CONTEXT, window=4):
                    got = greedy_logits(model, ids, mask, None, STEPS)
        for step, (a, b) in enumerate(zip(got, expected, strict=True)):
            diff = (a - b).abs().max().item()
            assert diff <= TOLERANCE, f"{family} rows={rows} {method} step {step}: max abs diff {diff}"


def test_softcap_is_applied():
    """Gemma 2's logits differ measurably without the cap, so the exactness above depends on applying it."""
    model = _model("gemma2")
    ids, mask = _inputs(1)
    with torch.no_grad():
        capped = model(ids, attention_mask=mask, past_key_values=kvtune.new_cache(model)).logits
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        uncapped = model(ids, attention_mask=mask, past_key_values=kvtune.new_cache(model)).logits
    assert (capped - uncapped).abs().max().item() > 100 * TOLERANCE


@pytest.mark.parametrize("family", ["qwen2", "gemma2", "gemma3", "qwen3", "mistral"])
def test_bytes_below_the_budget_are_windows_plus_compressed_full_layers(family):
    """After a compressed prefill: each sliding layer holds its last window - 1 positions, each full layer the
    budget, nothing else (no spare, no dropped entry kept alive)."""
    budget, rows = 12, 3
    model = _model(family)
    ids, mask = _inputs(rows)
    with torch.no_grad(), kvtune.compress(model, "snapkv", budget=budget, window=4):
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    windows = layer_windows(model)
    expected_entries = [WINDOW - 1 if w is not None else budget for w in windows]
    for layer, entries in zip(cache.layers, expected_entries, strict=True):
        assert layer.lengths().tolist() == [[entries] * KV_HEADS] * rows
    segments = rows * KV_HEADS
    expected = sum(segments * (entries * ENTRY_BYTES + SEGMENT_BYTES) for entries in expected_entries)
    assert cache.nbytes() == expected
    stock = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=stock, use_cache=True)
    for index, window in enumerate(windows):
        if window is not None:  # transformers' sliding layer shows the same window - 1 entries
            assert stock.layers[index].keys.shape[2] == WINDOW - 1


@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_decoding_keeps_sliding_layers_at_their_window(family):
    """Twenty steps after the prefill: sliding layers still hold window - 1 valid entries (plus at most the few
    lazily evicted holes and the spare of one regrowth), full layers the budget plus the generated tokens."""
    budget = 12
    model = _model(family)
    ids, mask = _inputs(1)
    with torch.no_grad(), kvtune.compress(model, "snapkv", budget=budget, window=4):
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        token = ids[:, -1:]
        for step in range(20):
            model(token, past_key_values=cache, position_ids=torch.tensor([[CONTEXT + step]]), use_cache=True)
    for layer, window in zip(cache.layers, layer_windows(model), strict=True):
        held = int(layer.lengths().max())
        assert held == (WINDOW - 1 if window is not None else budget + 20)
        if window is not None:
            assert layer._width <= WINDOW - 1 + 16 + 1


@pytest.mark.parametrize("method", ["pyramidkv", "adakv_pyramidkv", "kvzip", "lighttransfer", "lighttransfer+snapkv"])
def test_cross_layer_methods_are_refused_beside_sliding_layers(method):
    model = _model("gemma3")
    with pytest.raises(UserError, match=r"layers \[0, 1, 3\] use sliding windows"):
        with kvtune.compress(model, method, budget=16):
            pass
    with pytest.raises(UserError, match="sliding windows"):
        kvtune.new_cache(model, kvtune.methods.build(method, budget=16))


def test_a_model_whose_layers_all_slide_warns_that_nothing_is_compressed():
    model = _model("mistral")
    ids, mask = _inputs(1)
    with pytest.warns(UserWarning, match="no full-attention layer to compress"):
        with torch.no_grad(), kvtune.compress(model, "snapkv", budget=4):
            model(ids, attention_mask=mask, use_cache=True)


def test_a_cache_without_the_models_windows_is_refused():
    model = _model("qwen3")
    ids, _ = _inputs(1)
    kvtune.api.use_kvtune_attention(model)
    with pytest.raises(ValueError, match=r"sliding_window=8 but its kvtune cache layer has None"):
        with torch.no_grad():
            model(ids, past_key_values=KVCache(4), use_cache=True)


def test_chunked_attention_layers_are_refused():
    model = _model("qwen3")
    model.config.layer_types = ["chunked_attention", FULL, FULL, FULL]
    model.config.attention_chunk_size = 4
    with pytest.raises(NotImplementedError, match="chunked_attention layers"):
        kvtune.new_cache(model)


@pytest.mark.parametrize("rows", [[40], [40, 31]], ids=["batch1", "padded_batch2"])
def test_saved_hybrid_cache_keeps_its_windows(tmp_path, rows):
    """A saved and reloaded Gemma 3 cache answers a follow-up exactly like the original (positions are saved: the
    windows slide on by position)."""
    from test_cache_io import _compressed_context, _follow_up

    model = _model("gemma3")
    generator = torch.Generator().manual_seed(2)
    context = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in rows]
    cache = _compressed_context(model, context, budget=12)
    loaded = kvtune.load_cache(cache.save(tmp_path / "ctx.safetensors"), model)
    assert [layer.sliding_window for layer in loaded.layers] == [WINDOW, WINDOW, None, WINDOW]
    for original, reloaded in zip(cache.layers, loaded.layers, strict=True):
        assert torch.equal(reloaded.lengths(), original.lengths())
        assert torch.equal(reloaded.dense().positions, original.dense().positions)
    tails = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [8, 9]][: len(rows)]
    with torch.no_grad():
        assert torch.equal(_follow_up(model, loaded, tails), _follow_up(model, cache, tails))


@pytest.mark.parametrize("beams", [1, 2])
@pytest.mark.parametrize("family", ["gemma2", "qwen3"])
def test_generate_inside_compress_matches_stock_generate(family, beams):
    """transformers' own generate loop (its cache replaced by kvtune's), greedy and beam search, padded batch."""
    model = _model(family)
    ids, mask = _inputs(3)
    settings = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
        with kvtune.compress(model, "snapkv", budget=4 * CONTEXT, window=4):
            got = model.generate(ids, **settings)
    assert torch.equal(got, expected)


def test_learned_attention_sinks_are_refused():
    """gpt-oss passes learned sinks (``s_aux``) to its attention: refused, never silently ignored."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1, **COMMON)
    model = GptOssForCausalLM(config).eval()
    with pytest.raises(NotImplementedError, match="s_aux"), torch.no_grad():
        model(_inputs(1)[0], past_key_values=kvtune.new_cache(model), use_cache=True)


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_chunked_prefill_slides_between_chunks(family):
    """Prefill in chunks of 10 (longer than the window): every chunk attends within the window over what the last
    one kept; the last logits equal a one-shot stock prefill."""
    model = _model(family)
    ids, mask = _inputs(3)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits[:, -1]
        cache = kvtune.new_cache(model)
        got, _ = kvtune.api.prefill(model, cache, ids, mask, chunk=10)
    assert (got - expected).abs().max().item() <= TOLERANCE
    windows = layer_windows(model)
    assert [int(n.max()) for n in cache.lengths()] == [WINDOW - 1 if w else CONTEXT for w in windows]


def test_load_model_falls_back_to_eager_where_transformers_has_no_sdpa(tmp_path):
    """Gemma 2 has no SDPA in transformers (soft-capping): `kvtune.load_model`'s default must still load it."""
    _model("gemma2").save_pretrained(tmp_path)
    kvtune.models.load_tokenizer("embedded").save_pretrained(tmp_path)
    model, _ = kvtune.load_model(str(tmp_path))
    assert type(model).__name__ == "Gemma2ForCausalLM" and model.config._attn_implementation == "eager"
