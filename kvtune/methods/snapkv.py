"""`snapkv`: the last ``window`` queries vote for the past entries (mean softmax attention, pooled over
neighbouring positions, averaged over each GQA group); the top entries plus the window are kept, once, at prefill.

`snapkv_paper` keeps the SnapKV authors' released settings (window 32, average pooling over 5 positions, per-KV-head
votes). `snapkv`'s defaults were chosen by measurement on kvtune's own task grid (`scripts/tune_snapkv_defaults.py`,
docs/results/snapkv_defaults/: passkey and variable tracking at 2K tokens, question-agnostic and question-aware,
ratios 0.5/0.75/0.9): votes averaged over every head of the layer (``heads="layer"``, one kept set per layer, as
TOVA does) beat per-KV-head votes in both modes, a 32-query window beat 8 and 64, max-pooling over 7 beat no pooling
and the paper's average pooling over 5. ``heads="group"`` gives the previous per-KV-head selection.
"""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.base import Policy, full_valid, keep_top, per_head_counts, snapkv_scores, window_then_past
from kvtune.methods.registry import register

POOLINGS = ("max", "avg")
HEAD_MODES = ("group", "layer")
# snapkv's defaults, chosen by measurement (see the module docstring); pyramidkv shares the pooling, and its own
# selection, not measured with head-averaged votes, stays per KV head; the Ada-KV variants need per-head scores
KERNEL, POOLING, HEADS = 7, "max", "layer"


@register("snapkv")
class SnapKV(Policy):
    def __init__(
        self,
        budget=None,
        ratio=None,
        window: int = 32,
        kernel: int = KERNEL,
        pooling: str = POOLING,
        heads: str = HEADS,
    ) -> None:
        super().__init__(budget, ratio, window)
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be 'max' or 'avg', got '{pooling}'")
        if heads not in HEAD_MODES:
            raise ValueError(f"heads must be one of {HEAD_MODES}, got '{heads}'")
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number of positions, got {kernel}")
        self.kernel, self.pooling, self.heads = kernel, pooling, heads

    def scores(self, ctx: LayerContext, window: int) -> torch.Tensor:
        """Selection scores: window-attention votes, +inf on the window, -inf on padding."""
        votes = snapkv_scores(ctx, window, self.kernel, self.pooling, self.heads)
        return window_then_past(votes, full_valid(ctx), window)

    def select(self, ctx: LayerContext, lengths: torch.Tensor, target: torch.Tensor):
        return keep_top(self.scores(ctx, self.window_size(target)), per_head_counts(target, lengths))


@register("snapkv_paper")
class SnapKVPaper(SnapKV):
    """SnapKV with its authors' released defaults, kept by name whatever `snapkv`'s measured defaults become."""

    def __init__(
        self, budget=None, ratio=None, window: int = 32, kernel: int = 5, pooling: str = "avg", heads: str = "group"
    ) -> None:
        super().__init__(budget, ratio, window, kernel, pooling, heads)
