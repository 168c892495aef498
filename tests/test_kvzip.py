"""`kvzip`: reconstruction scores against eager attention written out, exactness, savings, batching, replay."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_tova import _greedy_logits, _padded_batch, storage_bytes
from transformers import DynamicCache

import kvtune
from kvtune.methods import build
from kvtune.replay import RecordedPrefill

PROMPT = [5, 11, 17, 23]
HKV, GROUP = 2, 3


def _reference_scores(context: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """Per layer ``[H_kv, T]``: max attention from the queries of the reconstruction pass over ``context`` (one row,
    no padding), from a stock eager model fed ``context + prompt + piece`` for every piece of ``chunk`` tokens."""
    model = tiny_llama()
    model.set_attn_implementation("eager")
    length = context.shape[1]
    best = None
    for end in range(length, 0, -chunk):  # chunks cut from the right
        piece = context[:, max(0, end - chunk) : end]
        ids = torch.cat([context, torch.tensor([PROMPT]), piece], dim=1)
        with torch.no_grad():
            attentions = model(input_ids=ids, output_attentions=True).attentions
        received = [a[0, :, length:, :length].amax(dim=1) for a in attentions]  # prompt and piece queries, [H, T]
        votes = [r.view(HKV, GROUP, length).amax(dim=1) for r in received]
        best = votes if best is None else [torch.maximum(a, b) for a, b in zip(best, votes)]
    return best


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("chunk", [64, 24])
def test_kvzip_keeps_the_top_max_attention_entries(chunk, layerwise, length=64, budget=12):
    ids, mask = _padded_batch([length], seed=2)
    model = tiny_llama()
    policy = build("kvzip", budget=budget, prompt=PROMPT, chunk=chunk, layerwise=layerwise)
    cache, full = kvtune.api.new_cache(model, policy), kvtune.api.new_cache(model)
    kvtune.api.prefill(model, full, ids, mask)
    kvtune.api.prefill(model, cache, ids, mask)
    sinks = 4  # kept with the last entry whatever their scores, counted in the budget
    past = torch.stack([scores[:, sinks : length - 1] for scores in _reference_scores(ids, chunk)])
    width = past.shape[-1]
    per_layer = HKV * (budget - 1 - sinks)
    if layerwise:  # one ranking over each layer's heads
        winners = [(layer, int(i)) for layer in range(len(past)) for i in past[layer].flatten().topk(per_layer)[1]]
    else:  # one ranking over every layer and head
        winners = [divmod(int(i), HKV * width) for i in past.flatten().topk(len(past) * per_layer)[1]]
    for index, (layer, everything) in enumerate(zip(cache.layers, full.layers)):
        keys = everything.dense().keys[0]
        view = layer.dense()
        valid = view.valid.expand(1, HKV, -1)[0]
        mine = [i for layer_index, i in winners if layer_index == index]
        for h in range(HKV):
            chosen = sorted(sinks + i % width for i in mine if i // width == h)
            assert torch.equal(view.keys[0, h][valid[h]], keys[h, list(range(sinks)) + chosen + [length - 1]])
    held = torch.stack([lengths[0] for lengths in cache.lengths()])
    assert int(held.sum()) == len(cache.layers) * HKV * budget
    assert layerwise or len(set(held.sum(dim=1).tolist())) > 1  # global: layers differ


def test_budget_above_the_context_is_exact():
    model = tiny_llama()
    ids, mask = _padded_batch([40, 25, 33])
    with torch.no_grad():
        expected, _ = _greedy_logits(model, ids, mask, DynamicCache(config=model.config))
        with kvtune.compress(model, "kvzip", budget=64, prompt=PROMPT):
            got, _ = _greedy_logits(model, ids, mask, None)
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5


def test_storage_shrinks_with_the_budget(length=200, budget=32):
    model = tiny_llama()
    ids, mask = _padded_batch([length])
    with torch.no_grad():
        with kvtune.compress(model, "full"):
            full = model(input_ids=ids, attention_mask=mask).past_key_values
        with kvtune.compress(model, "kvzip", budget=budget, prompt=PROMPT):
            small = model(input_ids=ids, attention_mask=mask).past_key_values
    assert storage_bytes(small) <= 1.1 * budget / length * storage_bytes(full)


def test_left_padded_rows_select_as_alone(budget=10):
    model = tiny_llama()
    ids, mask = _padded_batch([50, 31])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad(), kvtune.compress(model, "kvzip", budget=budget, prompt=PROMPT, chunk=20):
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions).past_key_values
        alone = model(input_ids=ids[1:, -31:]).past_key_values
    for together, single in zip(batch.layers, alone.layers):
        a, b = together.dense(), single.dense()
        a_valid, b_valid = a.valid.expand_as(a.keys[..., 0]), b.valid.expand_as(b.keys[..., 0])
        for h in range(HKV):
            assert torch.allclose(a.keys[1, h][a_valid[1, h]], b.keys[0, h][b_valid[0, h]], atol=1e-5)


def test_replays_share_one_scoring_pass_between_budgets():
    model = tiny_llama()
    ids, mask = _padded_batch([70, 52])
    recording = RecordedPrefill(model, ids, mask)
    calls = []
    original = kvtune.methods.kvzip.reconstruction_scores
    kvtune.methods.kvzip.reconstruction_scores = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        small = recording.compress("kvzip", budget=8, prompt=PROMPT)
        large = recording.compress("kvzip", budget=16, prompt=PROMPT)
    finally:
        kvtune.methods.kvzip.reconstruction_scores = original
    assert len(calls) == 1
    assert small.nbytes() < large.nbytes()


def test_kvzip_does_not_compose_and_needs_token_ids_without_a_tokenizer():
    with pytest.raises(ValueError, match="cannot run inside"):
        build("lighttransfer+kvzip", budget=8)
    assert "lighttransfer+kvzip" not in kvtune.methods.available()
    model = tiny_llama()
    ids, mask = _padded_batch([40])
    with pytest.raises(ValueError, match="prompt="):
        kvtune.api.prefill(model, kvtune.api.new_cache(model, build("kvzip", budget=8)), ids, mask)


def test_every_prefill_path_runs_the_reconstruction(budget=10):
    """`kvtune.prefill` (chunked too) and `model.generate` under `kvtune.compress` all end with the scoring pass."""
    model = tiny_llama()
    ids, mask = _padded_batch([60, 44])
    chunked = kvtune.api.new_cache(model, build("kvzip", budget=budget, prompt=PROMPT))
    kvtune.api.prefill(model, chunked, ids, mask, chunk=25)
    layers = len(chunked.layers)
    per_sample = torch.stack([held.sum(dim=1) for held in chunked.lengths()]).sum(dim=0)
    assert (per_sample == layers * HKV * budget).all()
    caches = []
    with torch.no_grad(), kvtune.compress(model, "kvzip", budget=budget, prompt=PROMPT) as policy:
        original = policy.after_prefill
        policy.after_prefill = lambda m, cache, *a: caches.append(cache) or original(m, cache, *a)
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert len(caches) == 1  # once, after the prompt; decoding steps are not prefills
    per_sample = torch.stack([held.sum(dim=1) for held in caches[0].lengths()]).sum(dim=0)
    assert (per_sample == layers * HKV * (budget + 2)).all()  # + 2 decoded tokens
