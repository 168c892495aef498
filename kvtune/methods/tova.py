"""`tova` and `adakv_tova`: Token Omission Via Attention (Oren et al., 2024, "Transformers are Multi-State RNNs").

TOVA scores every cached entry by the softmax attention it receives from the *last* query, averaged over all
heads of the layer, and keeps the same top entries for every head of that layer: the paper found the
layer-wise (head-averaged) variant better than per-head scores, and kvpress's `TOVAPress` does the same. With GQA
the average therefore runs over every query head of the layer (``heads="layer"``); ``heads="group"`` averages each
KV head's query group instead, so that the heads of a layer may keep different entries.

At prefill the cache is cut to the budget at once (the last prompt query votes); while decoding, every step that
takes the cache over its budget evicts the entry the new query attends to least, one per step, as in the paper.
The entry of the query itself is always kept (as in kvpress). ``window`` is how many of the last queries vote
(1, the paper's TOVA); a question-aware run sets it to the question's length, so that the question's queries
vote and its entries are kept.

`adakv_tova` scores each KV head by its query group's attention (``heads="group"``) and gives the heads of a layer
Ada-KV's adaptive budgets (`kvtune.methods.adakv`). While decoding it evicts, per step, the lowest-scoring entries
across the layer's heads (one per head on average), so the layer's total stays at its budget while the split
between heads keeps adapting.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.adakv import _AdaKV
from kvtune.methods.base import (
    Policy,
    age_positions,
    dense_view,
    full_valid,
    keep_top,
    last_query_votes,
    least_scored_slot,
    newest,
    per_head_counts,
    steady_decode_length,
    valid_lengths,
    window_then_past,
)
from kvtune.methods.registry import register

HEAD_MODES = ("layer", "group")


@register("tova")
class TOVA(Policy):
    evicts_during_decoding = True
    reads_decode_attention = True  # a decoding step's votes are the attention probabilities of its query

    def __init__(self, budget=None, ratio=None, window: int = 1, heads: str = "layer") -> None:
        super().__init__(budget, ratio, window)
        if heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got '{heads}'")
        self.heads = heads

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        """``[B, H_kv, L]``: attention of the last ``window`` queries, averaged over them and over the layer's heads
        (or each GQA group); +inf on the voting queries' own entries, -inf on padding."""
        return window_then_past(last_query_votes(ctx, window, self.heads), full_valid(ctx), window, age_positions(ctx))

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        return keep_top(self.scores(ctx, self.window_size(target)), per_head_counts(target, lengths))

    def on_decode(self, ctx: LayerContext) -> None:
        """Once full, the entry the new query attends to least (outside the voting window) goes and the new token
        takes its slot in place; otherwise (a `decode_interval` above 1 included) the general selection."""
        length = steady_decode_length(self, ctx)
        if length is None:
            super().on_decode(ctx)
            return
        window = self.window_size(length - 1)
        positions = ctx.layer.stored_positions()
        scores = last_query_votes(ctx, window, self.heads).masked_fill(newest(positions, window), float("inf"))
        ctx.layer.replace(least_scored_slot(scores, positions))


@register("adakv_tova")
class AdaTOVA(_AdaKV, TOVA):
    def on_decode(self, ctx: LayerContext) -> None:
        """Drop the layer's lowest-scoring entries (across its heads) so that it holds no more than before this step
        (before the last `decode_interval` steps), or than its budget when that is larger."""
        if not self.decode_due(ctx.layer):
            return
        lengths = valid_lengths(ctx)
        held, heads = lengths.sum(dim=1), lengths.shape[1]
        cap = held - heads * self.decode_interval
        if self.budget is not None:
            cap = torch.maximum(cap, torch.full_like(held, heads * self.budget))
        if not bool((held > cap).any()):
            return
        scores = self.scores(ctx, self.window_size(lengths.min(dim=1).values))
        droppable = scores.masked_fill(~full_valid(ctx), float("inf"))  # neither padding nor the window
        drop = torch.zeros_like(droppable, dtype=torch.bool).flatten(1)
        for b in range(held.shape[0]):
            excess = min(int(held[b] - cap[b]), int(torch.isfinite(droppable[b]).sum()))
            if excess > 0:
                drop[b, droppable[b].flatten().topk(excess, largest=False).indices] = True
        drop = drop.view_as(droppable)
        in_place = self.decode_interval == 1 and not (torch.is_grad_enabled() and ctx.keys.requires_grad)
        if ctx.query.shape[2] == 1 and in_place:
            ctx.layer.evict_unevenly(drop)  # the layer stays rectangular; the new tokens fill the holes
        else:
            counts = lengths - drop.sum(dim=-1)
            ctx.layer.compact(keep_top(scores, counts), view=dense_view(ctx), lazy=self.decode_interval == 1)
