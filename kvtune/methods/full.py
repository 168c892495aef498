"""`full`: the uncompressed reference; every entry is kept."""

from kvtune.attention import LayerContext
from kvtune.methods.base import Policy
from kvtune.methods.registry import register


@register("full")
class Full(Policy):
    def __init__(self, budget: int | None = None, ratio: float | None = None, window: int = 32) -> None:
        self.budget, self.ratio, self.window = budget, ratio, window

    def on_prefill(self, ctx: LayerContext) -> None:
        return None
