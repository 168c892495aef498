"""`kvtune bench`: what a method really costs and saves, against the *stock* model measured in the same run.

Rows per (context length, batch size):

* ``full``: the stock model, transformers' own `DynamicCache` and attention (never kvtune's backend), so every
  ratio includes what kvtune itself costs;
* ``reference``: the same model whose whole context is ``budget`` tokens, with an ordinary cache: the decode speed
  a compressed cache of that budget should reach;
* every method x budget x prefill chunk (``None``: one-shot prefill);
* ``hybrid``, one row per LightTransfer layer plan given (`kvtune.hybrid`): the same weights with the plan's lazy
  layers attending to sinks + a sliding window, decoding through a cache that keeps only that on those layers.

Figures: prefill seconds, decode tokens/s, the storage the cache keeps alive after prefill (deduplicated
``untyped_storage`` bytes), peak memory during prefill (RSS above the level at its start on CPU,
`torch.cuda.max_memory_allocated` on GPU), and compression overhead: the share of prefill time spent inside the
method's selection hooks. On Linux, large allocations are served by ``mmap`` (a fixed threshold) and freed memory is
trimmed before each prefill, so that RSS follows what is alive instead of what the allocator kept from earlier
configurations.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import psutil
import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from kvtune.api import cache_kwargs, new_cache, prefill
from kvtune.cache import KVCache, storage_bytes
from kvtune.eval.corpus import corpus_text
from kvtune.hybrid.attention import hybrid_cache, planned
from kvtune.hybrid.plan import LayerPlan
from kvtune.methods import build
from kvtune.methods.registry import get
from kvtune.validation import check_count

HYBRID = "hybrid"

MMAP_THRESHOLD = 1 << 20  # allocations above 1 MiB get their own mapping, returned to the OS when freed


def _libc():
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


_LIBC = _libc()
if _LIBC is not None and hasattr(_LIBC, "mallopt"):
    _LIBC.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD (also stops glibc's threshold from drifting upwards)


def _trim() -> None:
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


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
        _trim()
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


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer reads what was really spent."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(cache) -> int:
    if isinstance(cache, KVCache):
        return cache.nbytes()
    return sum(storage_bytes([t for layer in cache.layers for t in (layer.keys, layer.values)]).values())


@torch.no_grad()
def measure(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    method: str,
    budget: int | None,
    decode_tokens: int,
    prefill_chunk: int | None = None,
    plan: LayerPlan | None = None,
    decode_interval: int = 1,
) -> dict[str, Any]:
    """One configuration: prefill ``input_ids`` (in chunks of ``prefill_chunk``), then decode greedily, evicting
    every ``decode_interval`` steps (methods that evict while decoding).

    ``full`` and ``reference`` run the stock model with a `DynamicCache`; ``hybrid`` the model as ``plan``'s hybrid
    (restored after) with its bounded cache; every other method a compressing `KVCache`.
    """
    device = model.device
    if (method == HYBRID) != (plan is not None):
        raise ValueError("a layer plan goes with method 'hybrid', and only with it")
    stock = method in ("full", "reference")
    policy = None if stock or plan is not None else build(method, budget=budget, decode_interval=decode_interval)
    spent = [0.0]
    if policy is not None:  # instance attributes shadow the class's hooks, which the attention backend looks up
        policy.on_prefill = _timed(policy.on_prefill, spent)
    with planned(model, plan) if plan is not None else nullcontext():
        if plan is not None:
            cache = hybrid_cache(model)
        else:
            cache = DynamicCache(config=model.config) if stock else new_cache(model, policy)
        mask = torch.ones_like(input_ids)
        with PeakMemory(device) as peak:
            synchronize(device)
            start = time.perf_counter()
            logits, mask = prefill(model, cache, input_ids, mask, chunk=prefill_chunk)
            synchronize(device)
            prefill_seconds = time.perf_counter() - start
        if policy is not None:
            cache.prefilling = False
        kv_bytes = _cache_bytes(cache)
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
        synchronize(device)
        decode_seconds = time.perf_counter() - start
    batch = input_ids.shape[0]
    return {
        "method": method,
        "budget": None if method in ("full", HYBRID) else budget,
        "context_length": input_ids.shape[1],
        "batch_size": batch,
        "prefill_chunk": prefill_chunk,
        "decode_interval": decode_interval,
        "prefill_s": prefill_seconds,
        "decode_tok_s": batch * decode_tokens / decode_seconds,
        "kv_bytes": kv_bytes,
        "peak_bytes": peak.peak,
        "overhead_pct": 100.0 * spent[0] / prefill_seconds,
        **({"plan": plan_label(plan)} if plan is not None else {}),
    }


def plan_label(plan: LayerPlan) -> str:
    """What a hybrid row keeps, for its table cell: sliding layers, window and sinks."""
    return f"{len(plan.lazy_layers)}/{plan.num_layers} layers W={plan.window} sinks={plan.sinks}"


def corpus_input_ids(tokenizer: PreTrainedTokenizerBase, length: int, batch: int, device: torch.device) -> torch.Tensor:
    """``batch`` rows of ``length`` tokens of the offline corpus, one stretch of text cut in rows."""
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
    prefill_chunks: list[int | None] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    plans: list[LayerPlan] | None = None,
    decode_intervals: list[int] | None = None,
) -> list[dict[str, Any]]:
    """Every configuration, with ratios against stock `full` (and decode against the ``budget``-token reference)
    of the same context length and batch size, plus a ``hybrid`` row per layer plan in ``plans``. ``progress``
    sees each raw row as soon as it is measured. ``decode_intervals`` adds rows of the methods that evict while
    decoding, evicting every that many steps (1, every step, is the default)."""
    report = progress or (lambda row: None)
    if decode_tokens < 1:
        raise ValueError(f"decode_tokens must be at least 1, got {decode_tokens}")
    prefill_chunks = [None] if prefill_chunks is None else list(prefill_chunks)
    decode_intervals = [1] if decode_intervals is None else list(decode_intervals)
    for interval in decode_intervals:
        check_count("decode_interval")(interval)
    if any(chunk is not None and chunk < 1 for chunk in prefill_chunks):
        raise ValueError(f"prefill_chunks must be positive token counts or null, got {prefill_chunks}")
    for length in context_lengths:
        if any(budget > length for budget in budgets):
            raise ValueError(f"budgets {budgets} must not exceed the context length {length}")
    model.eval()
    warm = corpus_input_ids(tokenizer, 16, 1, model.device)
    measure(model, warm, "full", None, 2)  # first-call costs (allocator, kernels) stay out of the table
    measure(model, warm, methods[-1] if methods[-1] != "full" else "snapkv", 8, 2)
    plans = list(plans or [])
    for plan in plans:
        plan.check_model(model)
        measure(model, warm, HYBRID, None, 2, plan=plan)
    rows = []
    for length in context_lengths:
        for batch in batch_sizes:
            ids = corpus_input_ids(tokenizer, length, batch, model.device)
            rows.append(measure(model, ids, "full", None, decode_tokens))
            report(rows[-1])
            for budget in budgets:
                rows.append(measure(model, ids[:, :budget], "reference", budget, decode_tokens))
                report(rows[-1])
            for method in (m for m in methods if m != "full"):
                for budget in budgets:
                    for chunk in prefill_chunks:
                        for interval in intervals_of(method, decode_intervals):
                            rows.append(measure(model, ids, method, budget, decode_tokens, chunk, None, interval))
                            report(rows[-1])
            for plan in plans:
                for chunk in prefill_chunks:
                    rows.append(measure(model, ids, HYBRID, None, decode_tokens, chunk, plan=plan))
                    report(rows[-1])
    return with_ratios(rows)


def intervals_of(method: str, decode_intervals: list[int]) -> list[int]:
    """The decode intervals a method's rows are measured at: just 1 for a method that does not evict while
    decoding (the interval changes nothing there)."""
    return decode_intervals if get(method.partition("+")[0]).evicts_during_decoding else [1]


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of rows in measurement order with their ratios against the stock `full` row that opened their group
    (one context length and batch size) and decode against that group's ``budget``-token reference; a partial run's
    rows make a table too."""
    out, full, references = [], None, {}
    for row in rows:
        if row["method"] == "full":
            full, references = row, {}
        elif row["method"] == "reference":
            references[row["budget"]] = row
        if full is None:
            continue
        reference = references.get(row["budget"])
        out.append(
            {
                **row,
                "prefill_ratio": row["prefill_s"] / full["prefill_s"],
                "decode_ratio": row["decode_tok_s"] / full["decode_tok_s"],
                "decode_vs_reference": row["decode_tok_s"] / reference["decode_tok_s"] if reference else None,
                "kv_ratio": row["kv_bytes"] / full["kv_bytes"],
                "peak_ratio": row["peak_bytes"] / max(full["peak_bytes"], 1),
            }
        )
    return out


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The bench rows as a markdown table (ratios against stock `full` at the same length and batch; decode also
    against the ``budget``-token reference)."""
    lines = [
        "| method | budget | context | batch | chunk | prefill s (x full) | decode tok/s (x full) | decode x reference "
        "| KV MiB (x full) | peak MiB (x full) | overhead % of prefill |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = (
            "" if r["decode_vs_reference"] is None or r["method"] == "reference" else f"{r['decode_vs_reference']:.2f}"
        )
        interval = r.get("decode_interval", 1)
        name = r["method"] if interval == 1 else f"{r['method']} (every {interval})"
        lines.append(
            f"| {name} | {r.get('plan') or r['budget'] or 'all'} | {r['context_length']} | {r['batch_size']} "
            f"| {r['prefill_chunk'] or '-'} | {r['prefill_s']:.2f} ({r['prefill_ratio']:.2f}) "
            f"| {r['decode_tok_s']:.1f} ({r['decode_ratio']:.2f}) | {versus} "
            f"| {r['kv_bytes'] / 2**20:.1f} ({r['kv_ratio']:.3f}) "
            f"| {r['peak_bytes'] / 2**20:.0f} ({r['peak_ratio']:.2f}) | {r['overhead_pct']:.1f} |"
        )
    return "\n".join(lines)
