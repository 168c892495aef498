"""Score one (task, method, budget) on a model: greedy answers, teacher-forced answer NLL, cache bytes.

Question-answering tasks share one recorded prefill per batch of samples between every method and budget of a
sweep (`kvtune.replay`): prefill-time compression never changes the prefill itself, so a grid of N methods costs
one prefill, not N. Hydra's default launcher runs a multirun's jobs in one process, where recordings are kept
(most recent sweep point only, to bound memory). Perplexity is scored chunk by chunk through the live compressed
cache instead, so that compression between chunks (and LoCoCo's fixed-size cache) is what gets measured.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.api import (
    PromptTokens,
    append_tails,
    cache_kwargs,
    greedy,
    left_pad,
    new_cache,
    prefill,
    tokenize_prompts,
)
from kvtune.cache import KVCache
from kvtune.eval.tasks import Sample, Task
from kvtune.methods import build
from kvtune.replay import RecordedPrefill

KEEP_QUERIES = 64  # the longest observation window a recording serves (SnapKV's 32, LightTransfer's 32, questions)


@dataclass
class _Batch:
    samples: list[Sample]
    recording: RecordedPrefill
    tails: list[list[int]]
    window: int | None
    seconds: float


_recordings: dict[tuple, list[_Batch]] = {}
_full_results: dict[tuple, dict[str, Any]] = {}


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _prompts(tokenizer: PreTrainedTokenizerBase, samples: list[Sample], question_aware: bool) -> PromptTokens:
    return tokenize_prompts(
        tokenizer,
        [s.context for s in samples],
        [s.question for s in samples],
        [s.answer_prefix for s in samples],
        question_aware,
    )


def _with_window(method_kwargs: dict[str, Any], window: int | None) -> dict[str, Any]:
    """A question-aware prompt's question is the observation window unless the caller set one."""
    return method_kwargs if window is None else {"window": window, **method_kwargs}


def _recorded_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    key: tuple,
    batch_size: int,
    question_aware: bool,
    progress: tqdm,
) -> list[_Batch]:
    """Prefill every batch once (or reuse the recordings of the same sweep point)."""
    if key in _recordings:
        return _recordings[key]
    _recordings.clear()
    batches = []
    for chunk in _batches(samples, batch_size):
        start = time.perf_counter()
        prompt = _prompts(tokenizer, chunk, question_aware)
        ids, mask = left_pad(prompt.heads, tokenizer.pad_token_id)
        keep = max(KEEP_QUERIES, prompt.window or 0)
        recording = RecordedPrefill(model, ids, mask, keep_queries=keep)
        batches.append(_Batch(chunk, recording, prompt.tails, prompt.window, time.perf_counter() - start))
        progress.set_postfix_str("prefilled")
    _recordings[key] = batches
    return batches


@torch.no_grad()
def _answer_nll(
    model: PreTrainedModel, cache: KVCache, logits: torch.Tensor, mask: torch.Tensor, gold: list[list[int]]
) -> list[float]:
    """Mean NLL per token of each gold answer fed teacher-forced through ``cache`` (right-padded, masked)."""
    width = max(len(g) for g in gold)
    ids = torch.tensor([g + [0] * (width - len(g)) for g in gold])
    gold_mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in gold])
    all_logits = logits[:, None]
    if width > 1:
        full_mask = torch.cat([mask, gold_mask], dim=1)
        positions = mask.sum(dim=1, keepdim=True) + torch.arange(width - 1)[None]
        out = model(
            input_ids=ids[:, :-1].to(model.device),
            attention_mask=full_mask[:, :-1].to(model.device),
            position_ids=positions.to(model.device),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        all_logits = torch.cat([all_logits, out.logits], dim=1)
    losses = F.cross_entropy(all_logits.float().flatten(0, 1).cpu(), ids.flatten(), reduction="none").view_as(ids)
    return ((losses * gold_mask).sum(dim=1) / gold_mask.sum(dim=1)).tolist()


@dataclass
class _Compressed:
    samples: list[Sample]
    cache: KVCache
    logits: torch.Tensor
    mask: torch.Tensor
    tails: list[list[int]]
    full_bytes: float  # per sample
    prefill_seconds: float


def _compressed_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    samples: list[Sample],
    method: str,
    budget: int | None,
    ratio: float | None,
    method_kwargs: dict[str, Any],
    key: tuple,
    batch_size: int,
    question_aware: bool,
    progress: tqdm,
) -> Iterator[_Compressed]:
    """Each batch's prompt heads compressed by the method: replayed from shared recordings where the method allows,
    else prefilled live (chunk by chunk for methods that say so, e.g. `lococo`)."""
    plain_full = method == "full" and budget is None and ratio is None
    if plain_full or getattr(build(method, budget=budget, ratio=ratio, **method_kwargs), "replayable", True):
        for batch in _recorded_batches(model, tokenizer, samples, key, batch_size, question_aware, progress):
            kwargs = _with_window(method_kwargs, batch.window)
            recording = batch.recording
            cache = (
                copy.deepcopy(recording.cache) if plain_full else recording.compress(method, budget, ratio, **kwargs)
            )
            full_bytes = recording.cache.nbytes() / len(batch.samples)
            yield _Compressed(
                batch.samples, cache, recording.logits, recording.mask, batch.tails, full_bytes, batch.seconds
            )
        return
    for chunk in _batches(samples, batch_size):
        start = time.perf_counter()
        prompt = _prompts(tokenizer, chunk, question_aware)
        kwargs = _with_window(method_kwargs, prompt.window)
        policy = build(method, budget=budget, ratio=ratio, **kwargs)
        cache = new_cache(model, policy)
        ids, mask = left_pad(prompt.heads, tokenizer.pad_token_id)
        logits, mask = prefill(model, cache, ids, mask, chunk=getattr(policy, "prefill_chunk", None))
        cache.prefilling = False
        seconds = time.perf_counter() - start
        yield _Compressed(chunk, cache, logits, mask, prompt.tails, _full_bytes(model, ids.shape[1]), seconds)


@torch.no_grad()
def _qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    samples: list[Sample],
    method: str,
    budget: int | None,
    ratio: float | None,
    method_kwargs: dict[str, Any],
    key: tuple,
    batch_size: int,
    question_aware: bool,
    max_new_tokens: int | None,
    progress: tqdm,
) -> dict[str, Any]:
    scores, nlls, kv_bytes, full_bytes, answers, prefill_seconds = [], [], [], [], [], 0.0
    batches = _compressed_batches(
        model, tokenizer, samples, method, budget, ratio, method_kwargs, key, batch_size, question_aware, progress
    )
    for batch in batches:
        cache, rows = batch.cache, len(batch.samples)
        kv_bytes += [cache.nbytes() / rows] * rows
        full_bytes += [batch.full_bytes] * rows
        prefill_seconds += batch.prefill_seconds
        logits, mask = append_tails(model, cache, batch.tails, batch.mask, batch.logits, tokenizer.pad_token_id)
        gold = [tokenizer(s.answers[0], add_special_tokens=False).input_ids for s in batch.samples]
        nlls += _answer_nll(model, copy.deepcopy(cache), logits, mask, gold)
        limit = max_new_tokens or getattr(task, "max_new_tokens", None) or max(len(g) for g in gold) + 8
        tokens = greedy(model, cache, logits, mask, limit, tokenizer.eos_token_id)
        for sample, row in zip(batch.samples, tokens):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            answers.append(answer)
            scores.append(task.score(answer, sample))
        progress.update(rows)
    return {
        "score": sum(scores) / len(scores),
        "answer_nll": sum(nlls) / len(nlls),
        "kv_bytes": sum(kv_bytes) / len(kv_bytes),
        "full_kv_bytes": sum(full_bytes) / len(full_bytes),
        "prefill_seconds": prefill_seconds,
        "per_sample": [
            {"score": s, "answer_nll": n, "answer": a, "gold": smp.answers[0]}
            for s, n, a, smp in zip(scores, nlls, answers, samples)
        ],
    }


@torch.no_grad()
def chunked_nll(
    model: PreTrainedModel, cache: KVCache, input_ids: torch.Tensor, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL of ``input_ids`` (``[B, T]``, no padding) fed ``chunk`` tokens at a time through ``cache``.

    The cache's policy compresses after every chunk, so each chunk is predicted from what the method kept of all
    earlier ones. Returns ``[B, T - 1]`` NLLs of tokens 1.. and the cache's bytes after each chunk (``[chunks]``).
    """
    losses, sizes, previous = [], [], None
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start : start + chunk]
        positions = torch.arange(start, start + piece.shape[1])[None].expand(piece.shape[0], -1)
        out = model(
            input_ids=piece.to(model.device),
            position_ids=positions.to(model.device),
            **cache_kwargs(model, cache),
            use_cache=True,
        )
        logits = out.logits.float().cpu()
        if previous is not None:  # the first token of this chunk is predicted by the last one of the previous
            logits = torch.cat([previous[:, None], logits], dim=1)
            targets = piece
        else:
            targets = piece[:, 1:]
        previous = logits[:, -1]
        logits = logits[:, : targets.shape[1]]
        losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view_as(targets))
        sizes.append(cache.nbytes())
    return torch.cat(losses, dim=1), torch.tensor(sizes)


def _perplexity(
    model: PreTrainedModel,
    task: Task,
    samples: list[Sample],
    method: str,
    budget: int | None,
    ratio: float | None,
    method_kwargs: dict[str, Any],
    batch_size: int,
    progress: tqdm,
) -> dict[str, Any]:
    """Chunked perplexity; tokens of the first chunk (identical for every method) are left out of the score."""
    chunk = task.chunk
    nlls, kv_bytes, full_bytes = [], [], []
    for batch in _batches(samples, batch_size):
        ids = torch.tensor([s.meta["input_ids"] for s in batch])
        plain_full = method == "full" and budget is None and ratio is None
        policy = None if plain_full else build(method, budget=budget, ratio=ratio, **method_kwargs)
        cache = new_cache(model, policy)
        losses, sizes = chunked_nll(model, cache, ids, chunk)
        nlls += losses[:, chunk - 1 :].mean(dim=1).tolist()
        kv_bytes += [int(sizes[-1]) / len(batch)] * len(batch)
        full_bytes += [_full_bytes(model, ids.shape[1])] * len(batch)
        progress.update(len(batch))
    mean_nll = sum(nlls) / len(nlls)
    return {
        "score": math.exp(mean_nll),
        "answer_nll": mean_nll,
        "kv_bytes": sum(kv_bytes) / len(kv_bytes),
        "full_kv_bytes": sum(full_bytes) / len(full_bytes),
        "prefill_seconds": 0.0,
        "per_sample": [{"answer_nll": n, "perplexity": math.exp(n)} for n in nlls],
    }


def _full_bytes(model: PreTrainedModel, length: int) -> float:
    """Bytes an uncompressed cache of ``length`` tokens holds for one sample, from the model's shapes and dtype."""
    config = model.config.get_text_config()
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * length * model.dtype.itemsize


@torch.no_grad()
def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    method: str,
    budget: int | None = None,
    ratio: float | None = None,
    context_length: int = 4096,
    samples: int = 20,
    seed: int = 0,
    batch_size: int = 1,
    question_aware: bool = False,
    max_new_tokens: int | None = None,
    method_kwargs: dict[str, Any] | None = None,
    task_key: tuple = (),
) -> dict[str, Any]:
    """One results row: the task's mean score, mean answer NLL and mean cache bytes per sample, and timings.

    ``task_key`` identifies the task's configuration so that recordings are reused only for identical samples.
    """
    start = time.perf_counter()
    items = task.samples(tokenizer, context_length, samples, seed)
    progress = tqdm(total=len(items), desc=f"{task.name} {method} {budget or ratio or 'all'}", unit="sample")
    method_kwargs = dict(method_kwargs or {})
    key = (id(model), task.name, task_key, context_length, samples, seed, batch_size, question_aware)
    # `full` keeps everything whatever the budget: a sweep's rows for other budgets reuse its first result
    reuse = (key, max_new_tokens, tuple(sorted(method_kwargs.items()))) if method == "full" else None
    with progress:
        if reuse in _full_results:
            result = _full_results[reuse]
            progress.update(len(items))
        elif getattr(task, "kind", "qa") == "perplexity":
            result = _perplexity(model, task, items, method, budget, ratio, method_kwargs, batch_size, progress)
        else:
            result = _qa(
                model,
                tokenizer,
                task,
                items,
                method,
                budget,
                ratio,
                method_kwargs,
                key,
                batch_size,
                question_aware,
                max_new_tokens,
                progress,
            )
    if reuse is not None:
        _full_results.clear()
        _full_results[reuse] = result
    return {
        "task": task.name,
        "method": method,
        "budget": budget,
        "ratio": ratio,
        "context_length": context_length,
        "samples": len(items),
        "seed": seed,
        "question_aware": question_aware,
        **{k: v for k, v in result.items() if k != "per_sample"},
        "seconds": time.perf_counter() - start,
        "per_sample": result["per_sample"],
    }
