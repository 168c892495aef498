"""`h2o`: Heavy-Hitter Oracle (Zhang et al.). Each entry accumulates the attention it receives from every query,
prompt and generated; the cache keeps the heaviest entries plus a recent window, evicting at every decode step.

``normalize=True`` adds, per call, the attention an entry received divided by the number of that call's queries that
could see it (`kvtune.methods.base.visible_queries`) instead of the plain column sum: within a prefill (or a chunk)
the oldest entries no longer win by having had the most queries. Across calls the per-call means add up as H2O's
sums do (a decode step is one query, so its term is the same either way): without a position per entry the cache
cannot tell how many queries an entry has seen over its whole life, so the choice is to accumulate what is exact.
"""

from functools import lru_cache

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import (
    Policy,
    age_positions,
    dense_view,
    evict_to,
    full_valid,
    group_reduce,
    keep_top,
    least_scored_slot,
    newest,
    over_by_one,
    per_head_counts,
    protect_recent,
    received_scores,
    steady_decode_length,
    valid_lengths,
)
from kvtune.methods.registry import register


@lru_cache(maxsize=64)
def _recent_count(target: int, ratio: float) -> int:
    """`H2O.recent` of one target, as a Python int (a decoding step asks the same question on every layer)."""
    return int(H2O.recent_window(torch.tensor([target]), ratio))


@register("h2o")
class H2O(Policy):
    needs_column_scores = True
    evicts_during_decoding = True
    accumulates_while_decoding = True

    def __init__(
        self, budget=None, ratio=None, window: int = 32, recent_ratio: float = 0.5, normalize: bool = False
    ) -> None:
        super().__init__(budget, ratio, window)
        if not 0.0 <= recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must lie in [0, 1], got {recent_ratio}")
        self.recent_ratio, self.normalize = recent_ratio, normalize

    def accumulated(self, ctx: LayerContext) -> torch.Tensor:
        """Attention received so far per KV head (summed over its query group), this call's queries included."""
        received = received_scores(ctx, self.normalize, how="sum")
        return received if ctx.aux is None else ctx.aux + received

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        valid = full_valid(ctx)
        scores = self.accumulated(ctx).masked_fill(~valid, float("-inf"))
        recent = self.recent(target)
        scores = protect_recent(scores, valid, recent, age_positions(ctx))
        return keep_top(scores, per_head_counts(target, lengths))

    def recent(self, target: torch.Tensor) -> torch.Tensor:
        return self.recent_window(target, self.recent_ratio)

    @staticmethod
    def recent_window(target: torch.Tensor, ratio: float) -> torch.Tensor:
        """Entries of the recent window, which are always kept: ``ratio`` of the target, at least 1."""
        return torch.minimum(torch.clamp(torch.round(target.float() * ratio).long(), min=1), target)

    def on_prefill(self, ctx: LayerContext) -> None:
        evict_to(self, ctx, self.layer_target(ctx, valid_lengths(ctx)), aux=self.accumulated(ctx))

    def on_decode(self, ctx: LayerContext) -> None:
        if self.decode_interval > 1:  # every step adds to the sums; every `decode_interval` steps the lightest go
            aux = self.accumulated(ctx)
            if self.decode_due(ctx.layer):
                evict_to(self, ctx, self.decode_target(valid_lengths(ctx)), aux=aux)
            else:
                ctx.layer.set_aux(aux)
            return
        length = steady_decode_length(self, ctx)
        if length is not None and ctx.aux is not None:
            # Every head one over: the lightest entry outside the recent window goes and the new token takes its
            # slot; the statistic is accumulated in the layer's own storage.
            ctx.aux.add_(group_reduce(ctx.column_scores, ctx.group_size, how="sum"))
            positions = ctx.layer.stored_positions()
            recent = _recent_count(length - 1, self.recent_ratio)
            scores = ctx.aux.masked_fill(newest(positions, recent), float("inf"))
            ctx.layer.replace(least_scored_slot(scores, positions))
            return
        target = self.decode_target(valid_lengths(ctx))
        aux = self.accumulated(ctx)
        if not over_by_one(ctx, target):
            evict_to(self, ctx, target, aux=aux)
            return
        # One over the budget: the lightest entry outside the recent window goes (the first of equal ones).
        valid = full_valid(ctx)
        scores = protect_recent(aux.masked_fill(~valid, float("inf")), valid, self.recent(target), age_positions(ctx))
        drop = torch.zeros_like(valid).scatter_(2, scores.argmin(dim=-1, keepdim=True), True)
        ctx.layer.evict(drop, dense_view(ctx, aux))
