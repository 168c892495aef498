"""`h2o`: Heavy-Hitter Oracle (Zhang et al.). Each entry accumulates the attention it receives from every query,
prompt and generated; the cache keeps the heaviest entries plus a recent window, evicting at every decode step.

``normalize=True`` adds, per call, the attention an entry received divided by the number of that call's queries that
could see it (`kvtune.methods.base.visible_queries`) instead of the plain column sum: within a prefill (or a chunk)
the oldest entries no longer win by having had the most queries. Across calls the per-call means add up as H2O's
sums do (a decode step is one query, so its term is the same either way): without a position per entry the cache
cannot tell how many queries an entry has seen over its whole life, so the choice is to accumulate what is exact.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import (
    Policy,
    dense_view,
    evict_to,
    full_valid,
    keep_top,
    over_by_one,
    per_head_counts,
    protect_recent,
    received_scores,
    valid_lengths,
)
from kvtune.methods.registry import register


@register("h2o")
class H2O(Policy):
    needs_column_scores = True
    evicts_during_decoding = True

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
        recent = torch.clamp(torch.round(target.float() * self.recent_ratio).long(), min=1)
        return keep_top(protect_recent(scores, valid, torch.minimum(recent, target)), per_head_counts(target, lengths))

    def on_prefill(self, ctx: LayerContext) -> None:
        evict_to(self, ctx, self.layer_target(ctx, valid_lengths(ctx)), aux=self.accumulated(ctx))

    def on_decode(self, ctx: LayerContext) -> None:
        target = self.decode_target(valid_lengths(ctx))
        aux = self.accumulated(ctx)
        if not over_by_one(ctx, target):
            evict_to(self, ctx, target, aux=aux)
            return
        # One over the budget: the lightest entry outside the recent window goes (the first of equal ones).
        valid = full_valid(ctx)
        recent = torch.minimum(torch.clamp(torch.round(target.float() * self.recent_ratio).long(), min=1), target)
        scores = protect_recent(aux.masked_fill(~valid, float("inf")), valid, recent)
        drop = torch.zeros_like(valid).scatter_(2, scores.argmin(dim=-1, keepdim=True), True)
        ctx.layer.evict(drop, dense_view(ctx, aux))
