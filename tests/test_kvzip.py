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


def test_max_received_comes_with_the_attention_itself():
    """`attend_with_max_received`: `attend`'s output, and per KV head the largest probability one real query of its
    group gave each key (written out: softmax of the masked logits, padding queries excluded)."""
    from kvtune.attention import allowed_mask, attend, attend_with_max_received

    torch.manual_seed(0)
    batch, length, q_len, dim = 2, 37, 11, 8
    query = torch.randn(batch, HKV * GROUP, q_len, dim)
    keys, values = torch.randn(batch, HKV, length, dim), torch.randn(batch, HKV, length, dim)
    valid = torch.ones(batch, 1, length, dtype=torch.bool)
    valid[1, :, :5] = False  # left padding of the held entries
    valid[1, :, length - q_len] = False  # and a padding query of this call
    out, most = attend_with_max_received(query, keys, values, valid, 0.3)
    assert torch.allclose(out, attend(query, keys, values, valid, 0.3), atol=1e-5)
    logits = torch.matmul(query, keys.repeat_interleave(GROUP, dim=1).transpose(2, 3)) * 0.3
    probs = logits.masked_fill(~allowed_mask(valid, q_len), float("-inf")).softmax(dim=-1)
    probs = probs * valid[:, :, -q_len:, None]  # the padding query votes for nothing
    expected = probs.amax(dim=2).view(batch, HKV, GROUP, length).amax(dim=2)
    assert torch.allclose(most, expected, atol=1e-6)
    assert most[1, :, :5].eq(0).all()


def test_the_pass_leaves_the_cache_as_it_found_it():
    """The reconstruction runs through the cache itself (no copy) and crops its tokens off again."""
    model = tiny_llama()
    ids, mask = _padded_batch([45, 30])
    cache = kvtune.api.new_cache(model)
    kvtune.api.prefill(model, cache, ids, mask)
    before = [(layer.dense().keys.clone(), layer.seen_tokens) for layer in cache.layers]
    scores = kvtune.methods.kvzip.reconstruction_scores(model, cache, ids, mask, mask, PROMPT, chunk=16)
    for layer, (keys, seen), layer_scores in zip(cache.layers, before, scores):
        assert torch.equal(layer.dense().keys, keys) and layer.seen_tokens == seen
        assert layer_scores.shape == (2, HKV, 45)
    assert cache.policy is None


def test_chunked_prefill_reconstructs_each_token_once(budget=30):
    """With ``prefill_chunk``, each reconstruction covers the tokens fed since the last one (those fed while the
    cache was within budget wait), over what the cache holds; earlier entries keep their best score as ``aux``."""
    model = tiny_llama()
    ids, mask = _padded_batch([60])
    seen = []
    original = kvtune.methods.kvzip.reconstruction_scores
    kvtune.methods.kvzip.reconstruction_scores = lambda m, c, ids, *a: (
        seen.append(ids.shape[1]) or original(m, c, ids, *a)
    )
    try:
        cache = kvtune.api.new_cache(model, build("kvzip", budget=budget, prompt=PROMPT))
        kvtune.api.prefill(model, cache, ids, mask, chunk=25)
    finally:
        kvtune.methods.kvzip.reconstruction_scores = original
    assert seen == [50, 10]  # 25 tokens fit the budget; 50 do not; then the last 10
    per_sample = sum(int(held.sum()) for held in cache.lengths())
    assert per_sample == len(cache.layers) * HKV * budget
    assert all(layer.dense().aux is not None for layer in cache.layers)
    entry = 2 * 8 * 4 + 4 + 4  # fp32 key and value of head_dim 8, int32 position, fp32 score
    assert cache.nbytes() <= 1.05 * per_sample * entry  # no reconstruction room left behind
