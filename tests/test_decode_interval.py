"""`decode_interval`: methods that evict while decoding evict every N steps, down to the budget, instead of every step
(kvpress's ``compression_interval``); the steps in between are plain appends that build no policy context."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_cache_contract import _by_age, _decode
from transformers import DynamicCache

import kvtune
from kvtune.api import cache_kwargs
from kvtune.bench import intervals_of
from kvtune.cache import RaggedLayer
from kvtune.methods import build
from kvtune.methods.tova import TOVA

EVICTING = ["streaming_llm", "h2o", "tova", "adakv_tova", "lighttransfer"]


def _decoded(method, steps, interval=4, budget=16, rows=2, on_step=None, **kwargs):
    """Prefill 40 tokens at ``budget``, then decode ``steps`` greedy tokens with ``decode_interval=interval``."""
    model = tiny_llama()
    ids = torch.randint(1, 97, (rows, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad(), kvtune.compress(model, method, budget=budget, window=4, decode_interval=interval, **kwargs):
        out = model(ids, use_cache=True)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        for step in range(steps):
            logits.append(_decode(model, cache, logits[-1].argmax(-1, keepdim=True), 40 + step)[:, -1])
            if on_step is not None:
                on_step(cache, step)
    return cache, torch.stack(logits)


@pytest.mark.parametrize("method", EVICTING)
def test_the_cache_grows_by_the_interval_then_returns_to_the_budget(method):
    """Every layer holds budget + 1, ..., budget + N - 1 entries per head (per head on average for Ada-KV), then the
    N-th step evicts N at once; the rebuilt layer has no holes. lighttransfer's full layers keep everything."""
    sizes = []

    def record(cache, step):
        lazy = cache.policy_state.get("lazy", set()) if method == "lighttransfer" else set(range(3))
        layers = [layer for index, layer in enumerate(cache.layers) if index in lazy]
        assert layers
        sizes.append({float(layer.lengths().float().mean(dim=1).max()) for layer in layers})
        for layer in layers:  # Ada-KV's heads differ, but each row's layer total is the heads' share
            assert bool((layer.lengths().sum(dim=1) == layer.lengths().sum(dim=1)[0]).all())

    cache, _ = _decoded(method, 12, on_step=record)
    assert sizes == [{17.0}, {18.0}, {19.0}, {16.0}] * 3
    assert all(layer._valid is None or bool(layer.dense().valid.all()) for layer in cache.layers[:1])


def test_streaming_llm_keeps_the_sinks_and_the_newest_after_each_eviction():
    kept = []

    def record(cache, step):
        view = cache.layers[0].dense()
        positions = view.positions[view.valid.expand_as(view.positions)].view(2, 2, -1)  # 2 rows, 2 KV heads
        kept.append(positions.sort(dim=-1).values[0, 0].tolist())

    _decoded("streaming_llm", 8, on_step=record)
    for step, positions in enumerate(kept):
        newest = 40 + step  # the token decoded at this step
        held = 16 + (step + 1) % 4  # 17, 18, 19, 16, ...
        assert positions == [0, 1, 2, 3] + list(range(newest - held + 5, newest + 1)), step


def test_h2o_adds_every_step_and_evicts_the_lightest_when_due():
    """Steps that do not evict still add the query's attention to the sums (each step's GQA group of 3 query heads
    gives 3.0 per KV head), and the due step keeps the recent window plus the heaviest of the rest."""
    seen = {}
    compact = RaggedLayer.compact

    def watch(layer, selection, view=None, lazy=True):
        if layer is cache_layer[0]:
            seen["before"] = _by_age(view, 2)
        compact(layer, selection, view, lazy)

    cache_layer, totals = [None], []

    def record(cache, step):
        cache_layer[0] = cache.layers[1]
        totals.append(cache.layers[1].dense().aux.sum(dim=-1))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(RaggedLayer, "compact", watch)
        cache, _ = _decoded("h2o", 8, on_step=record)
    for step in (1, 2, 5, 6):  # no eviction between these steps and the previous: the sums grew by exactly 3
        assert torch.allclose(totals[step] - totals[step - 1], torch.full_like(totals[step], 3.0), atol=1e-4), step
    # the last due step (step 7): recent window (half of 16) plus the 8 heaviest of the older entries
    after = _by_age(cache.layers[1].dense(), 2)
    for (positions, _, _, aux), (kept, *_) in zip(seen["before"], after):
        recent = positions[-8:]
        heaviest = positions[:-8][aux[:-8].topk(8).indices].sort().values
        assert kept.tolist() == sorted(heaviest.tolist() + recent.tolist())


def test_steps_that_are_not_due_build_no_policy_context(monkeypatch):
    """The point of the interval: a step that does not evict runs attention alone (TOVA computes no probabilities)."""
    calls = []
    original = TOVA.on_decode
    monkeypatch.setattr(TOVA, "on_decode", lambda self, ctx: calls.append(ctx.layer_idx) or original(self, ctx))
    _decoded("tova", 8)
    assert len(calls) == 2 * 3  # steps 4 and 8, three layers


def test_exact_while_nothing_is_evicted():
    """Under budget + interval nothing is evicted: the same logits as transformers' own cache."""
    _, logits = _decoded("tova", 6, interval=8, budget=40)
    model = tiny_llama()
    ids = torch.randint(1, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        out = model(ids, **cache_kwargs(model, cache), use_cache=True)
        expected = [out.logits[:, -1]]
        for step in range(6):
            expected.append(_decode(model, cache, expected[-1].argmax(-1, keepdim=True), 40 + step)[:, -1])
    assert torch.allclose(logits, torch.stack(expected), atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(budget=16, decode_interval=0), "decode_interval must be a whole number of at least 1"),
        (dict(budget=16, decode_interval=2.0), "decode_interval must be a whole number of at least 1"),
        (dict(ratio=0.5, decode_interval=4), "decode_interval > 1 needs budget="),
    ],
)
def test_bad_intervals_are_refused(options, message):
    with pytest.raises(kvtune.UserError, match=message):
        build("tova", **options)


def test_lococo_keeps_its_own_buffer():
    with pytest.raises(kvtune.UserError, match="set its buffer= instead"):
        build("lococo", budget=16, decode_interval=4)


def test_bench_measures_intervals_only_where_they_change_something():
    assert intervals_of("tova", [1, 32]) == [1, 32]
    assert intervals_of("lighttransfer+snapkv", [1, 32]) == [1, 32]
    assert intervals_of("snapkv", [1, 32]) == [1]
    assert intervals_of("snapkv", [32]) == [1]
