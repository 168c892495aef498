"""`streaming_llm`: attention sinks plus a recent window (Xiao et al.); the window slides while decoding.

Keys keep their absolute RoPE phase (no position shift), as in Ada-KV's, kvpress's and KVCache-Factory's baseline.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import (
    Policy,
    dense_view,
    full_valid,
    keep_top,
    over_by_one,
    per_head_counts,
    protect_recent,
    protect_sinks,
    ranks,
    valid_lengths,
)
from kvtune.methods.registry import register


def streaming_scores(valid: torch.Tensor, target: torch.Tensor, sinks: int) -> torch.Tensor:
    """+inf on the first ``sinks`` and the last ``target - sinks`` valid entries of each head, -inf elsewhere."""
    sinks_kept = torch.clamp(target, max=sinks)
    scores = torch.full(valid.shape, float("-inf"), device=valid.device)
    scores = protect_recent(scores, valid, target - sinks_kept)
    return protect_sinks(scores, valid, sinks)


def streaming_selection(valid: torch.Tensor, target: torch.Tensor, sinks: int):
    """Sinks plus recent entries, ``target[b]`` per head, from a ``[B, H_kv, L]`` validity mask."""
    lengths = valid.sum(dim=-1)
    return keep_top(streaming_scores(valid, target, sinks), per_head_counts(target, lengths))


@register("streaming_llm")
class StreamingLLM(Policy):
    evicts_during_decoding = True

    def __init__(self, budget=None, ratio=None, window: int = 32, sinks: int = 4) -> None:
        super().__init__(budget, ratio, window)
        self.sinks = sinks

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        return streaming_selection(full_valid(ctx), target, self.sinks)

    def on_decode(self, ctx: LayerContext) -> None:
        """One token over the budget (every decoding step once full): the oldest entry after the sinks goes."""
        target = self.decode_target(valid_lengths(ctx))
        if int(target.min()) > self.sinks and over_by_one(ctx, target):
            valid = full_valid(ctx)
            ctx.layer.evict(valid & (ranks(valid) == self.sinks), dense_view(ctx))
        else:
            super().on_decode(ctx)
