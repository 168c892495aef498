"""`pyramidkv`: SnapKV scoring with layer budgets on a decreasing arithmetic sequence (mean = the budget)."""

import torch

from kvtune.attention import LayerContext
from kvtune.methods.registry import register
from kvtune.methods.snapkv import KERNEL, POOLING, SnapKV


def pyramid_targets(
    target: torch.Tensor, seen: torch.Tensor, window: int, layer: int, num_layers: int, beta: int = 20
) -> torch.Tensor:
    """KVCache-Factory's per-layer capacity: layer 0 gets the most, the last layer ``(target - window) / beta``.

    ``seen`` (``[B]``) is the prompt length the schedule is laid over (KVCache-Factory's ``q_len``). It must be the
    same for every layer: with chunked prefill the layers already hold different lengths, and a schedule laid over
    each layer's own length gives later layers more than the first (the mean then overshoots the budget).
    """
    n = seen
    base = target - window
    min_num = base // beta
    max_num = 2 * base - min_num
    capped = max_num >= n - window
    max_num = torch.where(capped, n - window, max_num)
    min_num = torch.where(capped, 2 * base - max_num, min_num)
    steps = (max_num - min_num) // max(num_layers - 1, 1)
    return torch.where(base > 0, max_num - layer * steps + window, target)


@register("pyramidkv")
class PyramidKV(SnapKV):
    sliding_refusal = "lays its budgets over the depth of all layers"

    def __init__(
        self,
        budget=None,
        ratio=None,
        window: int = 32,
        kernel: int = KERNEL,
        pooling: str = POOLING,
        heads: str = "group",
        beta: int = 20,
    ) -> None:
        super().__init__(budget, ratio, window, kernel, pooling, heads)
        self.beta = beta

    def layer_target(self, ctx: LayerContext, lengths: torch.Tensor) -> torch.Tensor:
        seen = torch.full_like(lengths[:, 0], ctx.layer.seen_tokens)  # positions fed to every layer so far
        target = self.target(seen[:, None])  # the mean budget, from the same length in every layer
        window = self.window_size(target)
        return pyramid_targets(target, seen, window, ctx.layer_idx, ctx.num_layers, self.beta)
