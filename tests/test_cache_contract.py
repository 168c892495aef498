"""`KVCache`/`RaggedLayer` honour transformers' cache contract (issue 12.2): beam search, crop, batch operations,
offloading, keys/values views, empty caches; and decoding writes in place instead of rebuilding (issue 14.3)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

import kvtune
from kvtune.api import cache_kwargs
from kvtune.cache import FUSED, KVCache, RaggedLayer, Selection


def _batch(rows: int, length: int = 30):
    g = torch.Generator().manual_seed(rows)
    ids = torch.randint(1, 97, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, rows):
        mask[row, : 4 * row] = 0
        ids[row, : 4 * row] = 0
    return ids, mask


def _beams(model, ids, mask, **extra):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, pad_token_id=0, **extra
    )


@pytest.mark.parametrize("rows", [1, 3])
def test_beam_search_inside_compress_matches_dynamic_cache(rows):
    model = tiny_llama()
    ids, mask = _batch(rows)
    expected = _beams(model, ids, mask)
    for method in ("snapkv", "h2o", "adakv_snapkv"):
        with torch.no_grad(), kvtune.compress(model, method, budget=64):
            assert torch.equal(_beams(model, ids, mask), expected), method


@pytest.mark.parametrize("rows", [1, 3])
def test_beam_search_from_a_returned_cache_matches_dynamic_cache(rows):
    model = tiny_llama()
    ids, mask = _batch(rows)
    more = torch.randint(1, 97, (rows, 5), generator=torch.Generator().manual_seed(7))
    full_ids, full_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    with torch.no_grad():
        reference = DynamicCache(config=model.config)
        model(ids, attention_mask=mask, **cache_kwargs(model, reference), use_cache=True)
        reference.batch_repeat_interleave(2)  # generate expands the inputs per beam, not a cache it is given
        expected = _beams(model, full_ids, full_mask, cache=reference)
        with kvtune.compress(model, "snapkv", budget=64):
            cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
        cache.batch_repeat_interleave(2)
        assert torch.equal(_beams(model, full_ids, full_mask, cache=cache), expected)


def _filled(method="snapkv", budget=16, length=40, rows=2):
    model = tiny_llama()
    ids = torch.randint(1, 97, (rows, length), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), kvtune.compress(model, method, budget=budget, window=4):
        cache = model(ids, use_cache=True).past_key_values
    return model, cache


def _decode(model, cache, tokens, start):
    positions = torch.arange(start, start + tokens.shape[1])[None].expand(tokens.shape[0], -1)
    with torch.no_grad():
        return model(tokens, position_ids=positions, **cache_kwargs(model, cache), use_cache=True).logits


def test_crop_back_to_what_the_cache_holds():
    model, cache = _filled()
    more = torch.randint(1, 97, (2, 6))
    before = [layer.dense().keys.clone() for layer in cache.layers]
    _decode(model, cache, more, 40)
    assert cache.get_seq_length() == 46
    cache.crop(-6)
    assert cache.get_seq_length() == 40
    assert all(torch.equal(layer.dense().keys, k) for layer, k in zip(cache.layers, before))
    assert all(
        torch.equal(layer.dense().positions[..., -4:], torch.arange(36, 40).expand(2, 2, -1)) for layer in cache.layers
    )
    # the compressed part: its window (4 tokens) is all that still stands as it was
    cache.crop(37)
    assert cache.get_seq_length() == 37 and all(int(n.max()) == 13 for n in cache.lengths())
    with pytest.raises(ValueError, match="back at most to 36 tokens"):
        cache.crop(30)


def test_batch_select_repeat_and_reorder():
    model, cache = _filled("adakv_snapkv", rows=3)
    dense = [layer.dense() for layer in cache.layers]
    cache.batch_select_indices(torch.tensor([2, 0]))
    for layer, view in zip(cache.layers, dense):
        got = layer.dense()
        for new, old in ((0, 2), (1, 0)):
            assert torch.equal(
                got.keys[new][got.valid.expand(2, 2, -1)[new]], view.keys[old][view.valid.expand(3, 2, -1)[old]]
            )
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and all(torch.equal(n[0], n[1]) and torch.equal(n[2], n[3]) for n in cache.lengths())
    cache.reorder_cache(torch.tensor([3, 3, 0, 1]))
    assert all(torch.equal(n[0], n[1]) for n in cache.lengths())


def test_offload_prefetch_keys_values_and_empty_cache():
    empty = KVCache(3)
    assert [tuple(n.shape) for n in empty.lengths()] == [(0, 0)] * 3 and empty.nbytes() == 0
    assert empty.layers[0].keys is None and empty.get_seq_length() == 0
    model, cache = _filled()
    view = cache.layers[1].dense()
    assert torch.equal(cache.layers[1].keys, view.keys) and torch.equal(cache.layers[1].values, view.values)
    with pytest.raises(AttributeError, match="read-only"):
        cache.layers[1].keys = view.keys
    expected = _decode(model, cache, torch.tensor([[5], [6]]), 40)
    model, cache = _filled()
    cache.offload(1)
    cache.prefetch(1)
    assert torch.equal(_decode(model, cache, torch.tensor([[5], [6]]), 40), expected)


def test_decoding_writes_in_place_and_rebuilds_only_when_the_spare_runs_out():
    model, cache = _filled("snapkv", budget=16, length=40, rows=1)
    layer = cache.layers[0]
    _decode(model, cache, torch.tensor([[3]]), 40)  # the first append after compaction makes room
    storage = layer._keys.untyped_storage().data_ptr()
    for step in range(1, 20):
        _decode(model, cache, torch.tensor([[3 + step]]), 40 + step)
        assert layer._keys.untyped_storage().data_ptr() == storage, step
    assert int(layer.lengths().max()) == 36


def test_decode_time_eviction_keeps_sinks_and_window_in_bounded_storage():
    model, cache = _filled("streaming_llm", budget=16, length=40, rows=1)
    with kvtune.compress(model, "streaming_llm", budget=16, window=4):
        sizes = set()
        for step in range(60):
            _decode(model, cache, torch.tensor([[3 + step % 50]]), 40 + step)
            sizes.add(cache.layers[0].nbytes())
            view = cache.layers[0].dense()
            kept = view.positions[view.valid.expand_as(view.positions)].view(2, 16).sort(dim=-1).values  # 2 KV heads
            assert kept[0, :4].tolist() == [0, 1, 2, 3] and kept[0, 4:].tolist() == list(range(step + 29, step + 41))
    entry = cache.layers[0].nbytes() / max(1, cache.layers[0].dense().keys.shape[2])
    assert max(sizes) <= entry * (16 + 16 + 32) and len(sizes) < 10  # budget + lazy holes + spare, few rebuilds


def test_fused_slots_have_no_position_and_positions_survive_compaction():
    cache = KVCache(1)
    layer = cache.layers[0]
    keys = torch.randn(1, 2, 10, 4)
    layer.update(keys, keys.clone())
    indices = torch.tensor([[[1, 5, 9], [0, 2, 9]]])
    layer.compact(Selection(indices, torch.tensor([[3, 2]])))  # few holes: marked invalid in place
    view = layer.dense()
    valid = view.valid.expand(1, 2, -1)
    assert view.positions[0, 0][valid[0, 0]].tolist() == [1, 5, 9]
    assert view.positions[0, 1][valid[0, 1]].tolist() == [0, 2]
    more = torch.randn(1, 2, 40, 4)
    layer.update(more, more.clone())
    keep = torch.tensor([[[1, 9, 29, 49], [2, 19, 49, 0]]])
    layer.compact(Selection(keep, torch.tensor([[4, 3]])))  # many holes: rebuilt, ragged
    view = layer.dense()
    assert layer.ragged and view.positions[0, 0].tolist() == [1, 9, 29, 49] and view.valid.all(-1)[0, 0]
    assert view.positions[0, 1, 1:].tolist() == [2, 19, 49] and view.valid[0, 1].tolist() == [False] + [True] * 3
    fused = torch.randn(1, 2, 2, 4)
    layer.compact(Selection(torch.tensor([[[0, 1], [0, 1]]]), torch.tensor([[2, 2]]), fused, fused))
    assert (layer.dense().positions == FUSED).all()


def _by_age(view, rows: int, heads: int = 2):
    """Each head's valid entries as (positions, keys, values, aux), oldest first: the kept set, whatever the order."""
    valid = view.valid.expand(rows, heads, -1)
    positions = view.positions.expand(rows, heads, -1)
    kept = []
    for b in range(rows):
        for h in range(heads):
            order = positions[b, h][valid[b, h]].argsort()
            pick = [t[b, h][valid[b, h]][order] for t in (view.keys, view.values)]
            aux = None if view.aux is None else view.aux[b, h][valid[b, h]][order]
            kept.append((positions[b, h][valid[b, h]][order], *pick, aux))
    return kept


def _decode_past_the_budget(method, steps=24, general=None, **kwargs):
    """Prefill 40 tokens at budget 16, then decode ``steps`` greedy tokens; ``general`` (a monkeypatch) disables
    the in-place decoding step so that every step takes the general selection and compaction."""
    if general is not None:
        for module in (kvtune.methods.base, kvtune.methods.h2o, kvtune.methods.streaming_llm, kvtune.methods.tova):
            general.setattr(module, "steady_decode_length", lambda policy, ctx: None, raising=False)
        general.setattr(RaggedLayer, "evict_unevenly", lambda layer, drop: layer.evict(drop))
    model = tiny_llama()
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), kvtune.compress(model, method, budget=16, window=4, **kwargs):
        out = model(ids, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for step in range(steps):
            logits.append(_decode(model, cache, logits[-1].argmax(-1, keepdim=True), 40 + step)[:, -1])
    return cache, torch.stack(logits)


@pytest.mark.parametrize("method", ["h2o", "streaming_llm", "tova", "lighttransfer", "adakv_tova"])
def test_decode_eviction_in_place_keeps_what_the_general_selection_keeps(method, monkeypatch):
    """The new token written over the evicted entry: per head, the same set of entries (positions, keys, values,
    accumulated attention) as the general selection's compaction, which keeps storage in age order."""
    fast, fast_logits = _decode_past_the_budget(method)
    assert not all(layer.in_age_order for layer in fast.layers)  # the in-place step did run
    with monkeypatch.context() as general:
        slow, slow_logits = _decode_past_the_budget(method, general=general)
    assert all(layer.in_age_order for layer in slow.layers)
    assert torch.equal(fast_logits.argmax(-1), slow_logits.argmax(-1))
    assert torch.allclose(fast_logits, slow_logits, atol=1e-5)  # attention sums the same entries in another order
    for fast_layer, slow_layer in zip(fast.layers, slow.layers):
        for kept, expected in zip(_by_age(fast_layer.dense(), 2), _by_age(slow_layer.dense(), 2)):
            assert torch.equal(kept[0], expected[0])  # the same entries, by position
            # (generated tokens' keys carry the float noise of attention summed in another order)
            assert torch.allclose(kept[1], expected[1], atol=1e-5) and torch.allclose(kept[2], expected[2], atol=1e-5)
            if expected[3] is not None:
                assert torch.allclose(kept[3], expected[3], rtol=1e-5, atol=1e-6)


def _data_pointers(cache):
    names = ("_keys", "_values", "_positions", "_valid", "_aux")
    return [[getattr(layer, n) is not None and getattr(layer, n).data_ptr() for n in names] for layer in cache.layers]


@pytest.mark.parametrize("method", ["h2o", "streaming_llm", "tova"])
def test_decode_eviction_reallocates_nothing(method):
    """Once a decoding step has made its spare slot, every later step evicts in place: no tensor of the layer is
    reallocated, its size stays at the budget, and the storage's bytes never change."""
    model, cache = _filled(method, budget=16, length=40, rows=2)
    with kvtune.compress(model, method, budget=16, window=4):
        _decode(model, cache, torch.tensor([[3], [4]]), 40)  # the first append after compaction makes room
        storage = _data_pointers(cache)
        size = cache.nbytes()
        for step in range(1, 40):
            _decode(model, cache, torch.tensor([[3 + step], [50 + step]]), 40 + step)
            assert _data_pointers(cache) == storage, step
            assert cache.nbytes() == size and all(bool((layer.lengths() == 16).all()) for layer in cache.layers)
    layer = cache.layers[0]
    assert not layer.in_age_order and layer._valid is None  # no holes: the new token took the evicted slot


def test_adakv_decode_eviction_stays_rectangular_without_reallocating():
    """Ada-KV-TOVA evicts unevenly across heads: after the first step stores the ragged layer as a rectangle with
    invalid slots, the new tokens fill the holes the evictions leave, in place, and the layer total holds."""
    model, cache = _filled("adakv_tova", budget=16, length=40, rows=2)
    assert any(layer.ragged for layer in cache.layers)
    with kvtune.compress(model, "adakv_tova", budget=16, window=4):
        _decode(model, cache, torch.tensor([[3], [4]]), 40)
        storage, uneven = _data_pointers(cache), False
        for step in range(1, 40):
            _decode(model, cache, torch.tensor([[3 + step], [50 + step]]), 40 + step)
            assert _data_pointers(cache) == storage, step
            for layer in cache.layers:
                assert not layer.ragged and bool((layer.lengths().sum(dim=1) == 2 * 16).all())
                uneven |= bool((layer.lengths() != 16).any())
    assert uneven  # the heads did hold different counts on the way


def test_age_order_is_restored_before_what_reads_it(tmp_path):
    """After in-place decode evictions: a save, a crop and a multi-token call see each head oldest first, with the
    same entries."""
    cache, _ = _decode_past_the_budget("streaming_llm", steps=30)
    layer = cache.layers[0]
    assert not layer.in_age_order
    before = _by_age(layer.dense(), 2)
    loaded = kvtune.load_cache(cache.save(tmp_path / "c.safetensors"), tiny_llama())
    for saved in (layer, loaded.layers[0]):
        positions = saved.dense().positions.expand(2, 2, -1)
        assert saved.in_age_order and bool((positions.diff(dim=-1) > 0).all())
        for kept, expected in zip(_by_age(saved.dense(), 2), before):
            assert all(torch.equal(a, b) for a, b in zip(kept[:3], expected[:3]))
    cache, _ = _decode_past_the_budget("streaming_llm", steps=30)
    assert cache.layers[0].croppable_tokens() == 12  # the recent window, in order once restored
    cache.crop(-3)
    assert cache.get_seq_length() == 67 and bool((cache.layers[0].lengths() == 13).all())


def test_ragged_decoding_reads_segments_exactly():
    """Single queries over a ragged (Ada-KV) layer, with left padding, equal attention over its dense view."""
    from kvtune.attention import attend, attend_segments

    model = tiny_llama()
    ids, mask = _batch(3, length=60)
    with torch.no_grad(), kvtune.compress(model, "adakv_snapkv", budget=24, window=4):
        cache = model(ids, attention_mask=mask, use_cache=True).past_key_values
    layer = cache.layers[1]
    assert layer.ragged
    for step in range(40):  # past the spare capacity: one regrow on the way
        layer.update(torch.randn(3, 2, 1, 8), torch.randn(3, 2, 1, 8))
        if step == 5:
            layer.mark_new_valid(torch.tensor([[True], [False], [True]]))
        query = torch.randn(3, 6, 1, 8)
        view = layer.dense()
        expected = attend(query, view.keys, view.values, view.valid, 0.3)
        assert torch.allclose(attend_segments(query, layer, 0.3), expected, atol=1e-6), step
