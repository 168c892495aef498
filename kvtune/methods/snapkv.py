"""`snapkv`: the last ``window`` queries vote for the past entries (mean softmax attention, max-pooled over
neighbouring positions, averaged over each GQA group); the top entries plus the window are kept, once, at prefill."""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import Policy, full_valid, keep_top, per_head_counts, snapkv_scores, window_then_past
from kvtune.methods.registry import register


@register("snapkv")
class SnapKV(Policy):
    def __init__(self, budget=None, ratio=None, window: int = 32, kernel: int = 7, pooling: str = "max") -> None:
        super().__init__(budget, ratio, window)
        if pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got '{pooling}'")
        self.kernel, self.pooling = kernel, pooling

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        """Selection scores: window-attention votes, +inf on the window, -inf on padding."""
        votes = snapkv_scores(ctx, window, self.kernel, self.pooling)
        return window_then_past(votes, full_valid(ctx), window)

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        return keep_top(self.scores(ctx, self.window_size(target)), per_head_counts(target, lengths))
