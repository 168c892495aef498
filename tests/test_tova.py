"""`tova` and `adakv_tova` against references written from the paper, plus exactness, savings and batching."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from transformers import DynamicCache

import kvtune
from kvtune.attention import LayerContext
from kvtune.cache import KVCache
from kvtune.methods import build
from kvtune.methods.adakv import adaptive_head_budgets

B, H, HKV, D, N = 2, 6, 2, 16, 64
G = H // HKV


def _context(seed=0, n=N, cache=None, layer_idx=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H, n, D, generator=g)
    keys = torch.randn(B, HKV, n, D, generator=g) * 1.5
    values = torch.randn(B, HKV, n, D, generator=g)
    cache = cache or KVCache(2)
    layer = cache.layers[layer_idx]
    keys_view, values_view = layer.update(keys, values)
    valid = torch.ones(B, 1, n, dtype=torch.bool)
    return LayerContext(layer_idx, 2, layer, cache, query, keys_view, values_view, valid, None, None, D**-0.5)


def _last_query_probs(query, keys, scaling):
    """Softmax attention of the last query over every key, float64, ``[B, H, L]``."""
    k = keys.double().repeat_interleave(query.shape[1] // keys.shape[1], dim=1)
    return (query[:, :, -1:].double() @ k.transpose(2, 3) * scaling).softmax(-1)[:, :, 0]


def _kept_rows(layer, keys):
    """Per (b, h), the positions of ``keys`` that the layer still stores."""
    view = layer.dense()
    valid = view.valid.expand(view.keys.shape[0], view.keys.shape[1], -1)
    return {
        (b, h): [int((keys[b, h] == row).all(-1).nonzero()[0]) for row in view.keys[b, h][valid[b, h]]]
        for b in range(keys.shape[0])
        for h in range(keys.shape[1])
    }


def storage_bytes(cache) -> int:
    """What the cache's tensors really hold: storage bytes, each storage counted once."""
    seen, total = set(), 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def test_tova_keeps_last_query_attention_top_k(budget=20):
    ctx = _context()
    keys = ctx.keys.clone()
    probs = _last_query_probs(ctx.query, keys, ctx.scaling).mean(dim=1)  # head average over the whole layer
    build("tova", budget=budget).on_prefill(ctx)
    for (b, _), kept in _kept_rows(ctx.layer, keys).items():
        top = sorted(range(N - 1), key=lambda i: -float(probs[b, i]))[: budget - 1]
        assert kept == sorted(top) + [N - 1]  # the same entries in every head, the query's own always


def test_tova_group_mode_scores_each_kv_head(budget=20):
    ctx = _context(seed=3)
    keys = ctx.keys.clone()
    probs = _last_query_probs(ctx.query, keys, ctx.scaling).view(B, HKV, G, N).mean(dim=2)
    build("tova", budget=budget, heads="group").on_prefill(ctx)
    kept = _kept_rows(ctx.layer, keys)
    for (b, h), rows in kept.items():
        top = sorted(range(N - 1), key=lambda i: -float(probs[b, h, i]))[: budget - 1]
        assert rows == sorted(top) + [N - 1]
    assert kept[0, 0] != kept[0, 1]


def test_tova_decode_evicts_the_least_attended_entry(budget=20):
    ctx = _context()
    policy = build("tova", budget=budget)
    policy.on_prefill(ctx)
    layer = ctx.layer
    before = layer.dense().keys.clone()
    g = torch.Generator().manual_seed(9)
    layer.update(torch.randn(B, HKV, 1, D, generator=g), torch.randn(B, HKV, 1, D, generator=g))
    query = torch.randn(B, H, 1, D, generator=g)
    view = layer.dense()  # what attention hands a policy (`update` itself returns the layer's storage)
    keys = view.keys
    probs = _last_query_probs(query, keys, ctx.scaling).mean(dim=1)
    policy.on_decode(
        LayerContext(0, 2, layer, ctx.cache, query, keys, view.values, view.valid, None, None, ctx.scaling)
    )
    assert (layer.lengths() == budget).all()
    after = layer.dense()
    for b in range(B):
        dropped = min(range(budget), key=lambda i: float(probs[b, i]))  # never the new entry itself
        expected = torch.cat([before[b, :, :dropped], before[b, :, dropped + 1 :], keys[b, :, -1:]], dim=1)
        for h in range(HKV):  # the new token took the evicted entry's slot: compared oldest first
            valid = after.valid.expand(B, HKV, -1)[b, h]
            oldest_first = after.positions[b, h][valid].argsort()
            assert torch.equal(after.keys[b, h][valid][oldest_first], expected[h])


@pytest.mark.parametrize("alpha", [0.0, 0.2])
def test_adakv_tova_allocates_heads_on_group_scores(alpha, budget=24):
    ctx = _context(seed=5)
    keys = ctx.keys.clone()
    probs = _last_query_probs(ctx.query, keys, ctx.scaling).view(B, HKV, G, N).mean(dim=2)
    build("adakv_tova", budget=budget, floor_alpha=alpha).on_prefill(ctx)
    kept = _kept_rows(ctx.layer, keys)
    for b in range(B):
        counts = adaptive_head_budgets(probs[b, :, : N - 1].float(), budget - 1, alpha)
        for h in range(HKV):
            top = sorted(range(N - 1), key=lambda i: -float(probs[b, h, i]))[: int(counts[h])]
            assert kept[b, h] == sorted(top) + [N - 1]
    assert int(ctx.layer.lengths().sum()) == B * HKV * budget


def test_adakv_tova_decode_holds_the_layer_total(budget=24):
    ctx = _context(seed=5)
    policy = build("adakv_tova", budget=budget, floor_alpha=0.0)
    policy.on_prefill(ctx)
    layer = ctx.layer
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        new = torch.randn(B, HKV, 1, D, generator=g)
        layer.update(new, torch.randn(B, HKV, 1, D, generator=g))
        query = torch.randn(B, H, 1, D, generator=g)
        view = layer.dense()  # what attention hands a policy (`update` itself returns the layer's storage)
        policy.on_decode(
            LayerContext(0, 2, layer, ctx.cache, query, view.keys, view.values, view.valid, None, None, D**-0.5)
        )
        assert (layer.lengths().sum(dim=1) == HKV * budget).all()
        after = layer.dense()  # the new entry stays (in a hole an eviction left, or the last slot)
        assert ((after.keys == new).all(dim=-1) & after.valid.expand(B, HKV, -1)).any(dim=-1).all()


def _padded_batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(0, 97, (len(lengths), width), generator=g)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths])
    return ids, mask


def _greedy_logits(model, ids, mask, cache, steps=3):
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True)
    logits, cache = [out.logits[mask.bool()]], out.past_key_values
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=token, attention_mask=mask, position_ids=mask.sum(1, keepdim=True) - 1, past_key_values=cache
        )
        logits.append(out.logits[:, -1])
    return logits, cache


@pytest.mark.parametrize("method", ["tova", "adakv_tova", "lighttransfer+tova"])
def test_budget_above_the_context_is_exact(method):
    model = tiny_llama()
    ids, mask = _padded_batch([40, 25, 33])
    with torch.no_grad():
        expected, _ = _greedy_logits(model, ids, mask, DynamicCache(config=model.config))
        with kvtune.compress(model, method, budget=64):
            got, _ = _greedy_logits(model, ids, mask, None)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("method", ["tova", "adakv_tova"])
def test_storage_shrinks_with_the_budget(method, length=200, budget=32):
    model = tiny_llama()
    ids, mask = _padded_batch([length])
    with torch.no_grad():
        with kvtune.compress(model, "full"):
            full = model(input_ids=ids, attention_mask=mask).past_key_values
        with kvtune.compress(model, method, budget=budget):
            small = model(input_ids=ids, attention_mask=mask).past_key_values
    assert storage_bytes(small) <= 1.1 * budget / length * storage_bytes(full)


@pytest.mark.parametrize("method", ["tova", "adakv_tova"])
def test_left_padded_rows_select_as_alone(method, budget=16):
    """A row of a left-padded batch keeps exactly what it keeps when compressed on its own."""
    model = tiny_llama()
    ids, mask = _padded_batch([50, 31])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), kvtune.compress(model, method, budget=budget):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).past_key_values
        alone = model(input_ids=ids[1:, -31:]).past_key_values
    for together, single in zip(batch.layers, alone.layers):
        a, b = together.dense(), single.dense()
        a_valid, b_valid = a.valid.expand_as(a.keys[..., 0]), b.valid.expand_as(b.keys[..., 0])
        for h in range(HKV):
            assert torch.allclose(a.keys[1, h][a_valid[1, h]], b.keys[0, h][b_valid[0, h]], atol=1e-5)


def test_chunked_prefill_holds_the_budget(budget=24):
    model = tiny_llama()
    ids, mask = _padded_batch([120, 90])
    cache = kvtune.api.new_cache(model, build("tova", budget=budget))
    kvtune.api.prefill(model, cache, ids, mask, chunk=32)
    assert all(bool((lengths == budget).all()) for lengths in cache.lengths())


def test_snapkv_head_averaged_votes_select_one_set_per_layer(budget=24, window=8, kernel=5):
    ctx = _context(seed=7)
    keys = ctx.keys.clone()
    k = keys.double().repeat_interleave(G, dim=1)
    logits = ctx.query[:, :, -window:].double() @ k.transpose(2, 3) * ctx.scaling
    causal = torch.arange(N)[None, :] <= torch.arange(N - window, N)[:, None]
    votes = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(dim=(1, 2))  # queries and every head
    votes[:, -window:] = 0.0
    pooled = torch.stack([votes[:, max(0, i - kernel // 2) : i + kernel // 2 + 1].max(-1).values for i in range(N)], 1)
    build("snapkv", budget=budget, window=window, kernel=kernel, heads="layer").on_prefill(ctx)
    kept = _kept_rows(ctx.layer, keys)
    for (b, _), rows in kept.items():
        assert rows == kept[b, 0] and rows[-window:] == list(range(N - window, N))  # one set per layer, window kept
        best = sorted(pooled[b, : N - window].tolist(), reverse=True)[: budget - window]
        got = sorted((float(pooled[b, i]) for i in rows[:-window]), reverse=True)  # pooling ties may pick either
        assert got == pytest.approx(best, rel=1e-5)
