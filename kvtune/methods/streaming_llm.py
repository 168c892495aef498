"""`streaming_llm`: attention sinks plus a recent window (Xiao et al.); the window slides while decoding.

Keys keep their absolute RoPE phase (no position shift), as in Ada-KV's, kvpress's and KVCache-Factory's baseline.
Once the cache is full, each decoding step writes the new token over the oldest entry after the sinks (in place, a
ring over the window): entries are then found by position, not by storage order.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import (
    Policy,
    age_positions,
    dense_view,
    full_valid,
    keep_top,
    over_by_one,
    per_head_counts,
    protect_recent,
    protect_sinks,
    ranks,
    steady_decode_length,
    valid_lengths,
)
from kvtune.methods.registry import register


def streaming_scores(
    valid: torch.Tensor, target: torch.Tensor, sinks: int, age: torch.Tensor | None = None
) -> torch.Tensor:
    """+inf on the first ``sinks`` and the last ``target - sinks`` valid entries of each head, -inf elsewhere
    (first and last by ``age``, the positions, when given; by storage order otherwise)."""
    sinks_kept = torch.clamp(target, max=sinks)
    scores = torch.full(valid.shape, float("-inf"), device=valid.device)
    scores = protect_recent(scores, valid, target - sinks_kept, age)
    return protect_sinks(scores, valid, sinks, age)


def streaming_selection(valid: torch.Tensor, target: torch.Tensor, sinks: int, age: torch.Tensor | None = None):
    """Sinks plus recent entries, ``target[b]`` per head, from a ``[B, H_kv, L]`` validity mask."""
    lengths = valid.sum(dim=-1)
    return keep_top(streaming_scores(valid, target, sinks, age), per_head_counts(target, lengths))


@register("streaming_llm")
class StreamingLLM(Policy):
    evicts_during_decoding = True

    def __init__(self, budget=None, ratio=None, window: int = 32, sinks: int = 4) -> None:
        super().__init__(budget, ratio, window)
        self.sinks = sinks

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        return streaming_selection(full_valid(ctx), target, self.sinks, age_positions(ctx))

    def on_decode(self, ctx: LayerContext) -> None:
        """One token over the budget (every decoding step once full): the oldest entry after the sinks goes. With a
        `decode_interval`, the general selection runs when due (sinks plus the newest)."""
        if self.decode_interval > 1:
            super().on_decode(ctx)
            return
        length = steady_decode_length(self, ctx)
        if length is not None and length - 1 > self.sinks:  # the new token takes that entry's slot
            positions = ctx.layer.stored_positions()
            ctx.layer.replace(positions.kthvalue(self.sinks + 1, dim=-1, keepdim=True).indices)
            return
        target = self.decode_target(valid_lengths(ctx))
        if int(target.min()) > self.sinks and over_by_one(ctx, target):
            valid = full_valid(ctx)
            ctx.layer.evict(valid & (ranks(valid, age_positions(ctx)) == self.sinks), dense_view(ctx))
        else:
            super().on_decode(ctx)
