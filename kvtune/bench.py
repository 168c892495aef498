"""`kvtune bench`: what a method really costs and saves, each figure set against `full` measured in the same run.

Per (method, budget, context length, batch size): prefill seconds, decode tokens/s, the bytes the cache holds after
prefill (from its own tensors), peak memory during prefill and decode (RSS above the starting point on CPU,
`torch.cuda.max_memory_allocated` on GPU), and compression overhead: the share of prefill time spent inside the
method's selection hooks.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.api import cache_kwargs, new_cache, prefill
from kvtune.eval.corpus import corpus_text
from kvtune.methods import build


class PeakMemory:
    """Peak memory above the level at entry: sampled RSS on CPU, the allocator's own peak on CUDA."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval, self.peak = device, interval, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        process = psutil.Process()
        self.start = process.memory_info().rss
        self._highest, self._stop = self.start, threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._highest = max(self._highest, process.memory_info().rss)
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.start
            return
        self._stop.set()
        self._thread.join()
        self.peak = self._highest - self.start


def _timed(hook: Callable[..., None], spent: list[float]) -> Callable[..., None]:
    def wrapper(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        hook(*args, **kwargs)
        spent[0] += time.perf_counter() - start

    return wrapper


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(
    model: PreTrainedModel, input_ids: torch.Tensor, method: str, budget: int | None, decode_tokens: int
) -> dict[str, Any]:
    """One configuration: prefill ``input_ids`` through a compressing cache, then decode greedily."""
    device = model.device
    policy = None if method == "full" else build(method, budget=budget)
    spent = [0.0]
    if policy is not None:  # instance attributes shadow the class's hooks, which the attention backend looks up
        policy.on_prefill = _timed(policy.on_prefill, spent)
    cache = new_cache(model, policy)
    mask = torch.ones_like(input_ids)
    with PeakMemory(device) as peak:
        _sync(device)
        start = time.perf_counter()
        logits, mask = prefill(model, cache, input_ids, mask)
        _sync(device)
        prefill_seconds = time.perf_counter() - start
        cache.prefilling = False
        kv_bytes = cache.nbytes()
        positions = mask.sum(dim=1, keepdim=True)
        start = time.perf_counter()
        for _ in range(decode_tokens):
            token = logits.argmax(dim=-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(
                input_ids=token,
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                **cache_kwargs(model, cache),
                use_cache=True,
            )
            logits, positions = out.logits[:, -1], positions + 1
        _sync(device)
        decode_seconds = time.perf_counter() - start
    batch = input_ids.shape[0]
    return {
        "method": method,
        "budget": None if method == "full" else budget,
        "context_length": input_ids.shape[1],
        "batch_size": batch,
        "prefill_s": prefill_seconds,
        "decode_tok_s": batch * decode_tokens / decode_seconds,
        "kv_bytes": kv_bytes,
        "peak_bytes": peak.peak,
        "overhead_pct": 100.0 * spent[0] / prefill_seconds,
    }


def _input_ids(tokenizer: PreTrainedTokenizerBase, length: int, batch: int, device: torch.device) -> torch.Tensor:
    stream = tokenizer(corpus_text(), add_special_tokens=False).input_ids
    if len(stream) < length * batch:
        raise ValueError(f"the corpus holds {len(stream)} tokens; {batch} x {length} were asked for")
    return torch.tensor(stream[: length * batch]).view(batch, length).to(device)


def bench(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    methods: list[str],
    budgets: list[int],
    context_lengths: list[int],
    batch_sizes: list[int],
    decode_tokens: int = 32,
) -> list[dict[str, Any]]:
    """Every configuration, with ratios against the `full` row of the same context length and batch size."""
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be at least 1, got {decode_tokens}")
    for length in context_lengths:
        if any(budget > length for budget in budgets):
            raise ValueError(f"budgets {budgets} must not exceed the context length {length}")
    model.eval()
    warm = _input_ids(tokenizer, 16, 1, model.device)
    measure(model, warm, "full", None, 2)  # first-call costs (allocator, kernels) stay out of the table
    rows = []
    for length in context_lengths:
        for batch in batch_sizes:
            ids = _input_ids(tokenizer, length, batch, model.device)
            reference = measure(model, ids, "full", None, decode_tokens)
            rows.append(reference)
            for method in (m for m in methods if m != "full"):
                for budget in budgets:
                    rows.append(measure(model, ids, method, budget, decode_tokens))
            for row in rows:
                if row["context_length"] == length and row["batch_size"] == batch:
                    row["prefill_ratio"] = row["prefill_s"] / reference["prefill_s"]
                    row["decode_ratio"] = row["decode_tok_s"] / reference["decode_tok_s"]
                    row["kv_ratio"] = row["kv_bytes"] / reference["kv_bytes"]
                    row["peak_ratio"] = row["peak_bytes"] / max(reference["peak_bytes"], 1)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The bench rows as a markdown table (ratios are against `full` at the same length and batch)."""
    lines = [
        "| method | budget | context | batch | prefill s (x full) | decode tok/s (x full) | KV MiB (x full) "
        "| peak MiB (x full) | overhead % of prefill |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['budget'] or 'all'} | {r['context_length']} | {r['batch_size']} "
            f"| {r['prefill_s']:.2f} ({r['prefill_ratio']:.2f}) | {r['decode_tok_s']:.1f} ({r['decode_ratio']:.2f}) "
            f"| {r['kv_bytes'] / 2**20:.1f} ({r['kv_ratio']:.3f}) "
            f"| {r['peak_bytes'] / 2**20:.0f} ({r['peak_ratio']:.2f}) | {r['overhead_pct']:.1f} |"
        )
    return "\n".join(lines)
