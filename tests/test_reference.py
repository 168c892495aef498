"""Each method against a slow reference written from the spec, on random tensors with GQA shapes."""

from __future__ import annotations

import heapq
import math

import pytest
import torch
from conftest import tiny_llama

import kvtune
from kvtune.attention import LayerContext, received_attention
from kvtune.cache import KVCache
from kvtune.eval.runner import chunked_nll
from kvtune.methods import build
from kvtune.methods.pyramidkv import pyramid_targets

B, H, HKV, D, N, LAYERS = 2, 6, 2, 16, 96, 4
G = H // HKV


def _context(layer_idx=0, seed=0, cache=None, column_scores=False, n=N):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H, n, D, generator=g)
    keys = torch.randn(B, HKV, n, D, generator=g)
    keys[:, :, 1:] += 2.0 * keys[:, :, :-1]  # neighbours alike, as post-RoPE keys are
    values = torch.randn(B, HKV, n, D, generator=g)
    valid = torch.ones(B, 1, n, dtype=torch.bool)
    cache = cache or KVCache(LAYERS)
    layer = cache.layers[layer_idx]
    layer.update(keys, values)
    scaling = D**-0.5
    received = received_attention(query, keys, valid, scaling) if column_scores else None
    return LayerContext(layer_idx, LAYERS, layer, cache, query, keys, values, valid, None, received, scaling)


def _probs(ctx):
    """Dense causal softmax attention [B, H, n, n] in float64, written out directly."""
    q, k = ctx.query.double(), ctx.keys.double().repeat_interleave(G, dim=1)
    logits = q @ k.transpose(2, 3) * ctx.scaling
    n = logits.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf")).softmax(-1)


def _kept(ctx):
    """Indices kept per (b, h), from the layer's storage after compression."""
    layer = ctx.layer
    view = layer.dense()
    out = {}
    for b in range(B):
        for h in range(HKV):
            rows = view.keys[b, h][view.valid.expand(B, HKV, -1)[b, h]]
            out[b, h] = [int((ctx.keys[b, h] == r).all(-1).nonzero()[0]) for r in rows]
    return out


def _snap_votes(ctx, window, kernel=7):
    probs = _probs(ctx)[:, :, -window:].mean(2)  # [B, H, n]
    votes = probs.view(B, HKV, G, -1).mean(2)[..., :-window]  # pooled over past entries only
    pooled = torch.zeros_like(votes)
    n = votes.shape[-1]
    for i in range(n):
        lo, hi = max(0, i - kernel // 2), min(n, i + kernel // 2 + 1)
        pooled[..., i] = votes[..., lo:hi].max(-1).values
    return pooled


def _assert_top_plus_window(kept, scores, keep, window, n=N):
    """``kept`` holds the window and the ``keep - window`` best past entries (ties may pick either index)."""
    assert kept[len(kept) - window :] == list(range(n - window, n)) and len(kept) == keep
    best = sorted((float(s) for s in scores[: n - window]), reverse=True)[: keep - window]
    got = sorted((float(scores[i]) for i in kept[: keep - window]), reverse=True)
    assert got == pytest.approx(best, rel=1e-5, abs=1e-9)


def test_snapkv(budget=40, window=32):
    ctx = _context()
    build("snapkv", budget=budget, heads="group").on_prefill(ctx)
    votes = _snap_votes(ctx, window)
    for (b, h), kept in _kept(ctx).items():
        _assert_top_plus_window(kept, votes[b, h], budget, window)


def test_pyramidkv_layer_budgets_and_selection(budget=48, window=32):
    base, n = budget - window, N
    min_num = base // 20
    max_num = 2 * base - min_num
    if max_num >= n - window:
        max_num, min_num = n - window, 2 * base - (n - window)
    steps = (max_num - min_num) // (LAYERS - 1)
    for layer in range(LAYERS):
        expected = max_num - layer * steps + window
        got = pyramid_targets(torch.tensor([budget]), torch.tensor([n]), window, layer, LAYERS)
        assert int(got) == expected
    cache = KVCache(LAYERS)
    ctx = _context(layer_idx=2, cache=cache)
    build("pyramidkv", budget=budget).on_prefill(ctx)
    votes = _snap_votes(ctx, window)
    keep = max_num - 2 * steps + window
    for (b, h), kept in _kept(ctx).items():
        _assert_top_plus_window(kept, votes[b, h], keep, window)


@pytest.mark.parametrize("alpha", [0.2, 0.0])
def test_adakv_snapkv(alpha, budget=48, window=32):
    ctx = _context(seed=1)
    build("adakv_snapkv", budget=budget, floor_alpha=alpha).on_prefill(ctx)
    votes = _snap_votes(ctx, window)
    kept = _kept(ctx)
    base = budget - window
    for b in range(B):
        flat = [(float(votes[b, h, i]), h, i) for h in range(HKV) for i in range(N - window)]
        winners = sorted(flat, reverse=True)[: HKV * base]
        share = [alpha * base + (1 - alpha) * sum(1 for _, hh, _ in winners if hh == h) for h in range(HKV)]
        counts = [math.floor(s) for s in share]
        for h in sorted(range(HKV), key=lambda h: -(share[h] - counts[h]))[: HKV * base - sum(counts)]:
            counts[h] += 1
        assert sum(len(kept[b, h]) for h in range(HKV)) == HKV * budget
        for h in range(HKV):
            _assert_top_plus_window(kept[b, h], votes[b, h], counts[h] + window, window)


def test_adakv_heads_really_differ_in_storage():
    ctx = _context(seed=1)
    build("adakv_snapkv", budget=48, floor_alpha=0.0).on_prefill(ctx)
    lengths = ctx.layer.lengths()
    assert lengths.sum() == B * HKV * 48 and len(set(lengths.flatten().tolist())) > 1
    assert ctx.layer.ragged
    entry = D * 4  # fp32 keys; values alike
    assert ctx.layer._keys.untyped_storage().nbytes() == int(lengths.sum()) * entry  # flat, no padding stored


def test_streaming_llm(budget=20):
    ctx = _context()
    build("streaming_llm", budget=budget).on_prefill(ctx)
    for kept in _kept(ctx).values():
        assert kept == [0, 1, 2, 3] + list(range(N - (budget - 4), N))


def test_h2o_prefill_and_decode(budget=30):
    ctx = _context(column_scores=True)
    policy = build("h2o", budget=budget)
    policy.on_prefill(ctx)
    received = _probs(ctx).sum(2).view(B, HKV, G, N).sum(2)  # column sums over all queries, summed per group
    recent = budget // 2
    for (b, h), kept in _kept(ctx).items():
        heavy = sorted(range(N - recent), key=lambda i: -float(received[b, h, i]))[: budget - recent]
        assert kept == sorted(heavy) + list(range(N - recent, N))
    assert torch.allclose(
        ctx.layer.dense().aux,
        torch.stack([torch.stack([received[b, h, _kept(ctx)[b, h]] for h in range(HKV)]) for b in range(B)]).float(),
        atol=1e-5,
    )
    # one decode step: the cache stays at its budget, evicting the lowest accumulated non-recent entry
    layer = ctx.layer
    step_k, step_v = torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
    keys, values = layer.update(step_k, step_v)
    query = torch.randn(B, H, 1, D)
    view = layer.dense()
    scores = received_attention(query, keys, view.valid, ctx.scaling)
    dctx = LayerContext(0, LAYERS, layer, ctx.cache, query, keys, values, view.valid, view.aux, scores, ctx.scaling)
    accumulated = dctx.aux + scores.view(B, HKV, G, -1).sum(2)
    keys = keys.clone()  # the layer may evict lazily, in place
    policy.on_decode(dctx)
    assert (layer.lengths() == budget).all()
    after = layer.dense()
    for b in range(B):
        for h in range(HKV):
            dropped = min(range(budget + 1 - recent), key=lambda i: float(accumulated[b, h, i]))
            expected = torch.cat([keys[b, h, :dropped], keys[b, h, dropped + 1 :]])
            valid = after.valid.expand(B, HKV, -1)[b, h]
            oldest_first = after.positions[b, h][valid].argsort()  # the new token took the evicted entry's slot
            assert torch.equal(after.keys[b, h][valid][oldest_first], expected)


def test_kvmerger_merged_values(budget=40, threshold=0.75, sigma=5.0):
    ctx = _context(column_scores=True)
    build("kvmerger", budget=budget, threshold=threshold, sigma=sigma).on_prefill(ctx)
    attention = ctx.column_scores.view(B, HKV, G, N).sum(2)
    view = ctx.layer.dense()
    for b in range(B):
        for h in range(HKV):
            k, v, a = ctx.keys[b, h], ctx.values[b, h], attention[b, h]
            protected = set(range(N - 32, N))
            heavy = [i for i in sorted(range(N), key=lambda i: -float(a[i])) if i not in protected][: int(0.1 * budget)]
            protected |= set(heavy)
            links = []
            for i in range(N - 1):
                cos = float(torch.nn.functional.cosine_similarity(k[i], k[i + 1], dim=0))
                if i not in protected and i + 1 not in protected and cos > threshold:
                    links.append((cos, i))
            joined = {i for _, i in sorted(links, reverse=True)[: N - budget]}
            sets, current = [], [0]
            for i in range(1, N):
                if i - 1 in joined:
                    current.append(i)
                else:
                    sets.append(current)
                    current = [i]
            sets.append(current)
            merged = []
            for s in sets:
                pivot = max(s, key=lambda i: (float(a[i]), -i))
                g = torch.tensor([math.exp(-float(((k[pivot] - k[i]) ** 2).sum()) / (2 * sigma**2)) for i in s])
                w = g / g.sum()
                merged.append(
                    (pivot, float(a[pivot]), pivot in protected, (w[:, None] * k[s]).sum(0), (w[:, None] * v[s]).sum(0))
                )
            if len(merged) > budget:
                order = sorted(merged, key=lambda m: (m[2], m[1]), reverse=True)[:budget]
                merged = sorted(order, key=lambda m: m[0])
            got_k, got_v = view.keys[b, h], view.values[b, h]
            assert got_k.shape[0] == budget
            assert torch.allclose(got_k, torch.stack([m[3] for m in merged]), atol=1e-5)
            assert torch.allclose(got_v, torch.stack([m[4] for m in merged]), atol=1e-5)


def test_lighttransfer_streams_the_laziest_layers(budget=24):
    cache = KVCache(LAYERS)
    policy = build("lighttransfer", budget=budget, lazy_fraction=0.5)
    ratios = []
    for layer_idx in range(LAYERS):
        ctx = _context(layer_idx=layer_idx, seed=10 + layer_idx, cache=cache)
        probs = _probs(ctx)[:, :, -32:]
        mask = torch.zeros(N, dtype=torch.bool)
        mask[:4] = True
        mask[N - (budget - 4) :] = True
        ratios.append(float(probs[..., mask].sum(-1).mean()))
        policy.on_prefill(ctx)
    lazy = set(heapq.nlargest(LAYERS // 2, range(LAYERS), key=lambda i: ratios[i]))
    assert cache.policy_state["lazy"] == lazy
    for layer_idx, layer in enumerate(cache.layers):
        assert int(layer.lengths().max()) == (budget if layer_idx in lazy else N)


def test_random_is_seeded_and_keeps_window(budget=40):
    kept = []
    for _ in range(2):
        ctx = _context()
        build("random", budget=budget, seed=3).on_prefill(ctx)
        kept.append(_kept(ctx))
    assert kept[0] == kept[1]
    assert all(k[-32:] == list(range(N - 32, N)) and len(k) == budget for k in kept[0].values())


def test_pyramidkv_keeps_its_mean_budget_under_chunked_compression():
    # chunk by chunk the layers hold different lengths; the schedule must still average the budget over layers
    model = tiny_llama(layers=6)
    ids = torch.randint(0, 97, (1, 2048), generator=torch.Generator().manual_seed(0))
    sizes = {}
    for method in ("snapkv", "pyramidkv"):
        cache = kvtune.new_cache(model, kvtune.methods.build(method, budget=256))
        sizes[method] = chunked_nll(model, cache, ids, chunk=256)[1]
    assert torch.allclose(sizes["pyramidkv"].float(), sizes["snapkv"].float(), rtol=0.01)
