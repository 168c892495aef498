"""Compress one recorded prefill with many methods.

Prefill-time compression never changes the prefill's own outputs (each layer attends over the full context before
its entries are dropped), so a full prefill that records each layer's queries holds everything any method needs.
Comparing N methods then costs one prefill instead of N: this is how kvtune evaluates method grids quickly.
Only single-shot (unchunked) prefills can be replayed; chunked prefill changes later chunks' inputs.

Queries are only read through the observation window, so a recording may keep just the last ``keep_queries`` of
them (with the attention every entry received precomputed): a 4K-token recording then costs its cache, not 2.5x.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from kvtune.api import check_sliding_layers, new_cache, prefill
from kvtune.attention import LayerContext, received_attention
from kvtune.cache import KVCache
from kvtune.methods import build


class _QueryRecorder:
    """A policy that compresses nothing and keeps each layer's (last ``keep``) queries."""

    def __init__(self, keep: int | None) -> None:
        self.keep = keep
        self.needs_column_scores = keep is not None  # a truncated recording must keep what all queries gave
        self.queries: dict[int, torch.Tensor] = {}
        self.received: dict[int, torch.Tensor] = {}
        self.scaling, self.softcap = 1.0, None

    def on_prefill(self, ctx: LayerContext) -> None:
        self.queries[ctx.layer_idx] = ctx.query if self.keep is None else ctx.query[:, :, -self.keep :].clone()
        if ctx.column_scores is not None:
            self.received[ctx.layer_idx] = ctx.column_scores
        self.scaling, self.softcap = ctx.scaling, ctx.softcap

    def on_decode(self, ctx: LayerContext) -> None:
        return None


class RecordedPrefill:
    """A full prefill of ``input_ids`` and the queries of every layer, ready to be compressed by any method.

    ``keep_queries`` keeps only the last queries of each layer (methods whose observation window is longer are
    refused); ``None`` keeps them all.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        keep_queries: int | None = None,
    ) -> None:
        recorder = _QueryRecorder(keep_queries)
        self.model, self.input_ids = model, input_ids
        self.shared: dict = {}  # what methods compute once per recording for every budget (kvzip's scores)
        self.cache = new_cache(model, recorder)
        self.logits, self.mask = prefill(model, self.cache, input_ids, attention_mask)
        self.cache.policy, self.cache.prefilling = None, False
        self.queries, self.scaling, self.keep_queries = recorder.queries, recorder.scaling, keep_queries
        self.softcap = recorder.softcap
        self._received: dict[int, torch.Tensor] = recorder.received

    def received(self, layer_idx: int) -> torch.Tensor:
        """Attention each entry of a layer received from all prompt queries (computed once, shared by methods)."""
        if layer_idx not in self._received:
            view = self.cache.layers[layer_idx].dense()
            query = self.queries[layer_idx]
            self._received[layer_idx] = received_attention(query, view.keys, view.valid, self.scaling, self.softcap)
        return self._received[layer_idx]

    def compress(self, method: str, budget: int | None = None, ratio: float | None = None, **kwargs) -> KVCache:
        """A new cache holding what ``method`` keeps of this prefill, as if it had run during the prefill."""
        policy = build(method, budget=budget, ratio=ratio, **kwargs)
        check_sliding_layers(self.model, policy)
        if self.keep_queries is not None and policy.queries_needed() > self.keep_queries:
            raise ValueError(
                f"{method} reads the last {policy.queries_needed()} queries but only {self.keep_queries} were recorded"
            )
        cache = copy.deepcopy(self.cache)
        cache.policy = policy
        for layer_idx, layer in enumerate(cache.layers):
            if layer.is_sliding:  # kept at its window, as in a live prefill
                continue
            view = layer.dense()
            query = self.queries[layer_idx]
            received = self.received(layer_idx) if policy.needs_column_scores else None
            policy.on_prefill(
                LayerContext(
                    layer_idx=layer_idx,
                    num_layers=len(cache.layers),
                    layer=layer,
                    cache=cache,
                    query=query,
                    keys=view.keys,
                    values=view.values,
                    valid=view.valid,
                    aux=view.aux,
                    column_scores=received,
                    scaling=self.scaling,
                    positions=view.positions,
                    softcap=self.softcap,
                )
            )
        cache.policy_state["recording"] = self.shared
        policy.after_prefill(self.model, cache, self.input_ids, self.mask)
        cache.prefilling = False  # what follows (question, scored text, decoding) is appended, not re-compressed
        return cache
