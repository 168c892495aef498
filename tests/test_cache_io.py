"""Compress once, ask many: saved and reloaded caches answer exactly like the original, copies are independent,
``questions=[...]`` prefills once, and a cache is refused by a model or tokenizer that did not make it."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from transformers import LlamaConfig, LlamaForCausalLM

import kvtune
from kvtune.api import CACHE_KEYWORDS, append_tails, cache_kwargs, left_pad, new_cache, prefill
from kvtune.cache_io import ContextState, copy_cache, tokenizer_fingerprint

PAD = 0


def _compressed_context(model, rows: list[list[int]], method: str = "snapkv", budget: int = 16):
    cache = new_cache(model, kvtune.methods.build(method, budget=budget, window=4))
    ids, mask = left_pad(rows, PAD)
    logits, mask = prefill(model, cache, ids, mask)
    cache.prefilling = False
    cache.context = ContextState(mask, logits)
    return cache


def _follow_up(model, cache, tails, pad: int = PAD):
    """Last logits of a follow-up question (appended after the context) and of two greedy steps after it."""
    state = cache.context
    work = copy_cache(cache)
    logits, mask = append_tails(model, work, tails, state.mask, state.logits, pad)
    steps = [logits]
    for _ in range(2):
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(
            input_ids=logits.argmax(-1)[:, None],
            attention_mask=mask,
            position_ids=mask.sum(dim=1, keepdim=True) - 1,
            **cache_kwargs(model, work),
            use_cache=True,
        )
        logits = out.logits[:, -1]
        steps.append(logits)
    return torch.stack(steps)


@pytest.mark.parametrize("rows", [[40], [60, 45]], ids=["batch1", "padded_batch2"])
def test_saved_and_reloaded_cache_gives_identical_logits(tmp_path, rows):
    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    context = [torch.randint(1, 97, (n,), generator=generator).tolist() for n in rows]
    cache = _compressed_context(model, context)
    assert max(int(n.max()) for n in cache.lengths()) <= 16  # really compressed
    path = cache.save(tmp_path / "ctx.safetensors")
    loaded = kvtune.load_cache(path, model)
    assert loaded.policy is None and loaded.made_by["method"] == "snapkv" and loaded.made_by["budget"] == 16
    assert [layer.seen_tokens for layer in loaded.layers] == [layer.seen_tokens for layer in cache.layers]
    assert all(torch.equal(a, b) for a, b in zip(loaded.lengths(), cache.lengths()))
    assert torch.equal(loaded.context.mask, cache.context.mask)
    tails = [[5, 6, 7], [8, 9]][: len(rows)]
    with torch.no_grad():
        assert torch.equal(_follow_up(model, loaded, tails), _follow_up(model, cache, tails))


def test_file_holds_only_the_kept_entries(tmp_path):
    model = tiny_llama()
    cache = _compressed_context(model, [list(range(1, 61)), list(range(1, 31))], budget=16)
    kept = sum(int(n.sum()) for n in cache.lengths())  # ragged: row 2 holds 16, padding not counted
    path = cache.save(tmp_path / "ctx.safetensors")
    entry = 2 * 8 * 4  # keys and values, head_dim 8, fp32
    assert kept * entry < path.stat().st_size < kept * entry + 64_000


def _storage_bytes(cache) -> int:
    """Bytes the layers' tensors really hold (storages deduplicated), whatever the layers call them."""
    storages = {}
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def test_loaded_cache_holds_only_the_kept_entries(tmp_path):
    model = tiny_llama()
    cache = _compressed_context(model, [list(range(1, 61)), list(range(1, 31))], budget=16)
    loaded = kvtune.load_cache(cache.save(tmp_path / "ctx.safetensors"), model)
    kept = sum(int(n.sum()) for n in cache.lengths())
    assert kept * 2 * 8 * 4 <= _storage_bytes(loaded) <= kept * 2 * 8 * 4 + 1024 * len(loaded.layers)


def test_copy_shares_no_mutable_state():
    model = tiny_llama()
    cache = _compressed_context(model, [list(range(1, 41))])
    twin = copy_cache(cache)
    before = [n.clone() for n in cache.lengths()]
    with torch.no_grad():
        model(input_ids=torch.tensor([[3, 4]]), **cache_kwargs(model, twin), use_cache=True)
    assert all(torch.equal(a, b) for a, b in zip(cache.lengths(), before))
    assert cache.get_seq_length() == 40 and twin.get_seq_length() == 42
    with torch.no_grad():
        model(input_ids=torch.tensor([[5]]), **cache_kwargs(model, cache), use_cache=True)
    assert twin.get_seq_length() == 42 and all(int(n.max()) == 18 for n in twin.lengths())


def test_cache_of_another_model_is_refused(tmp_path):
    model = tiny_llama()
    path = _compressed_context(model, [list(range(1, 41))]).save(tmp_path / "ctx.safetensors")
    with pytest.raises(kvtune.UserError, match="made by another model.*weights_sha256"):
        kvtune.load_cache(path, tiny_llama(seed=1))
    with pytest.raises(kvtune.UserError, match="num_kv_heads: saved 2, now 3"):
        kvtune.load_cache(path, tiny_llama(kv_heads=3))
    with pytest.raises(kvtune.UserError, match="dtype: saved 'float32', now 'bfloat16'"):
        kvtune.load_cache(path, copy.deepcopy(model).to(torch.bfloat16))
    with pytest.raises(kvtune.UserError, match="not a kvtune cache"):
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
        kvtune.load_cache(tmp_path / "other.safetensors", model)


def test_cache_made_with_another_tokenizer_is_refused(tmp_path, embedded_tokenizer):
    model = tiny_llama()
    cache = _compressed_context(model, [list(range(1, 41))])
    cache.made_by["tokenizer"] = tokenizer_fingerprint(embedded_tokenizer)
    path = cache.save(tmp_path / "ctx.safetensors")
    kvtune.load_cache(path, model, embedded_tokenizer)  # the same tokenizer loads
    other = copy.deepcopy(embedded_tokenizer)
    other.add_tokens(["<kvtune-extra>"])
    with pytest.raises(kvtune.UserError, match="made by another tokenizer"):
        kvtune.load_cache(path, model, other)


# ---- kvtune.generate(questions=[...]) on a small random model that shares the embedded tokenizer ---------------------
@pytest.fixture(scope="module")
def small(embedded_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(embedded_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval(), embedded_tokenizer


CONTEXT = "The hangar door code is 4417. " * 20 + "Pilots park on the east apron."
QUESTIONS = [" What is the door code?", " Where do pilots park?", " Who wrote this?"]


def _count_prefills(model) -> tuple[list[int], object]:
    """Forwards that start from an empty cache (a context prefill)."""
    starts: list[int] = []

    def hook(module, args, kwargs):
        cache = next((kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        if cache is not None and cache.get_seq_length() == 0:
            starts.append(kwargs["input_ids"].shape[1])

    return starts, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("method", ["snapkv", "h2o"])  # h2o also evicts while decoding, in each copy
def test_questions_prefill_once_and_match_asking_alone(small, method):
    model, tokenizer = small
    options = dict(method=method, budget=24, max_new_tokens=6, answer_prefix=" Answer:")
    starts, handle = _count_prefills(model)
    try:
        answers = kvtune.generate(model, tokenizer, CONTEXT, questions=QUESTIONS, **options)
    finally:
        handle.remove()
    assert len(starts) == 1 and starts[0] == len(tokenizer(CONTEXT).input_ids)
    alone = [kvtune.generate(model, tokenizer, CONTEXT, question=q, **options) for q in QUESTIONS]
    assert answers == alone
    batch = kvtune.generate(model, tokenizer, [CONTEXT, CONTEXT[:300]], questions=QUESTIONS[:2], **options)
    assert batch == [
        kvtune.generate(model, tokenizer, [CONTEXT, CONTEXT[:300]], question=q, **options) for q in QUESTIONS[:2]
    ]


def test_saved_context_answers_like_the_original(small, tmp_path):
    model, tokenizer = small
    cache = kvtune.compress_context(model, tokenizer, CONTEXT, method="snapkv", budget=24)
    lengths = [n.clone() for n in cache.lengths()]
    direct = kvtune.generate(model, tokenizer, cache, questions=QUESTIONS, max_new_tokens=6)
    assert all(torch.equal(a, b) for a, b in zip(cache.lengths(), lengths))  # answering copies, never changes it
    cache.save(tmp_path / "ctx.safetensors")
    loaded = kvtune.load_cache(tmp_path / "ctx.safetensors", model, tokenizer)
    assert kvtune.generate(model, tokenizer, loaded, questions=QUESTIONS, max_new_tokens=6) == direct
    assert direct == kvtune.generate(
        model, tokenizer, CONTEXT, questions=QUESTIONS, method="snapkv", budget=24, max_new_tokens=6
    )
    with pytest.raises(kvtune.UserError, match="do not apply"):
        kvtune.generate(model, tokenizer, loaded, question="?", method="snapkv", budget=8)
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]), **cache_kwargs(model, loaded), use_cache=True)
    with pytest.raises(kvtune.UserError, match="tokens were appended after it"):
        kvtune.generate(model, tokenizer, loaded, question="?")


@pytest.mark.slow
def test_embedded_saved_cache_gives_identical_follow_up_logits(embedded, tmp_path):
    model, tokenizer = embedded
    context = "The secret word is lighthouse. " * 30
    cache = kvtune.compress_context(model, tokenizer, context, method="adakv_snapkv", budget=64)
    loaded = kvtune.load_cache(cache.save(tmp_path / "ctx.safetensors"), model, tokenizer)
    tails = [tokenizer(" What is the secret word? It is", add_special_tokens=False).input_ids]
    with torch.no_grad():
        pad = tokenizer.pad_token_id
        assert torch.equal(_follow_up(model, loaded, tails, pad), _follow_up(model, cache, tails, pad))


@pytest.mark.slow
def test_cli_questions_file_prints_every_answer(embedded, tmp_path):
    model, tokenizer = embedded
    context = "The hangar door code is 4417. Pilots park on the east apron. " * 8
    questions = [" What is the door code?", " Where do pilots park?"]
    (tmp_path / "context.txt").write_text(context)
    (tmp_path / "questions.txt").write_text("\n".join(questions) + "\n\n")
    options = dict(method="snapkv", budget=32, max_new_tokens=5, answer_prefix=" Answer:")
    expected = kvtune.generate(model, tokenizer, context, questions=questions, **options)
    command = [sys.executable, "-m", "kvtune.cli", "generate", f"context_file={tmp_path / 'context.txt'}"]
    command += [f"questions_file={tmp_path / 'questions.txt'}", "answer_prefix=' Answer:'"]
    command += ["method=snapkv", "budget=32", "max_new_tokens=5"]
    out = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600).stdout
    for question, answer in zip(questions, expected):
        assert f"Q: {question}\nA: {answer!r}\n" in out
