"""`random`: seeded random eviction, the sanity baseline every scored method must beat.

It keeps the observation window like SnapKV does, so that it differs from the scored methods only in how the
rest of the budget is chosen.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import Policy, full_valid, keep_top, per_head_counts, window_then_past
from kvtune.methods.registry import register


@register("random")
class RandomEviction(Policy):
    def __init__(self, budget=None, ratio=None, window: int = 32, seed: int = 0) -> None:
        super().__init__(budget, ratio, window)
        self.seed = seed

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        valid = full_valid(ctx)
        generator = torch.Generator(device="cpu").manual_seed(self.seed * 100_003 + ctx.layer_idx)
        scores = torch.rand(valid.shape, generator=generator).to(ctx.keys.device)
        scores = window_then_past(scores, valid, self.window_size(target))
        return keep_top(scores, per_head_counts(target, lengths))
