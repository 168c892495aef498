"""`lighttransfer`: LightTransfer-Test (Zhang et al.). Lazy layers, those whose last queries put almost all their
attention on the sinks and the recent window, are turned into streaming layers during prefill.

While the prefill runs layer by layer, each layer's lazy ratio (attention mass of the last ``last_queries``
queries on ``sinks`` + recent entries, averaged over heads and the batch) is pushed on a max-heap; whenever more
than ``P = L - round(lazy_fraction * L)`` layers are held full, the laziest is popped and cut to sinks plus a
recent window at once, so memory is freed during prefill. The popped layers are exactly the ``L - P`` laziest.
Streaming layers keep ``budget`` entries (``sinks`` + ``budget - sinks`` recent) and slide while decoding.

``lighttransfer+X``: the layers that stay full run method ``X`` at the same budget. Their selection is computed
in their own attention call and applied once the heap has settled (a layer popped later is streamed instead).
The lazy set is chosen once per cache and per batch, on the first prefill longer than the streaming window.

``plan=PATH`` (a `kvtune calibrate` layer plan) fixes the lazy set instead of deciding online; its sinks and window
become the defaults (``budget = sinks + window - 1``: what a sliding layer of window ``window`` keeps between steps).
``window`` is handed to the inner method only when given, so that each inner method keeps its own default.
"""

import heapq

import torch

from kvtune.attention import LayerContext
from kvtune.cache import AttentionCall
from kvtune.hybrid.plan import LayerPlan, PlanMismatchError
from kvtune.methods.base import Policy, dense_view, evict_to, full_valid, valid_lengths, window_attention
from kvtune.methods.registry import build, register
from kvtune.methods.streaming_llm import StreamingLLM, streaming_selection


@register("lighttransfer")
class LightTransfer(Policy):
    composes = True
    sliding_refusal = "chooses the layers to stream among all layers, after the last one"
    evicts_during_decoding = True

    def __init__(
        self,
        budget=None,
        ratio=None,
        window: int | None = None,
        lazy_fraction: float = 0.5,
        sinks: int | None = None,
        last_queries: int = 32,
        inner: str | None = None,
        plan: str | None = None,
        **inner_kwargs,
    ) -> None:
        self.plan = LayerPlan.load(plan) if plan is not None else None
        if self.plan is not None:
            sinks = self.plan.sinks if sinks is None else sinks
            if budget is None and ratio is None:
                budget = sinks + self.plan.window - 1
        sinks = 4 if sinks is None else sinks
        super().__init__(budget, ratio, 32 if window is None else window)
        if not 0.0 <= lazy_fraction <= 1.0:
            raise ValueError(f"lazy_fraction must lie in [0, 1], got {lazy_fraction}")
        self.lazy_fraction, self.last_queries = lazy_fraction, last_queries
        self.streaming = StreamingLLM(budget, ratio, sinks=sinks)
        if window is not None:  # else the inner method keeps its own default (TOVA's is 1 query, SnapKV's 32)
            inner_kwargs["window"] = window
        self.inner = build(inner, budget=budget, ratio=ratio, **inner_kwargs) if inner else None
        self.needs_column_scores = bool(self.inner and self.inner.needs_column_scores)
        self.reads_decode_attention = bool(self.inner and self.inner.reads_decode_attention)

    def queries_needed(self) -> int:
        inner = self.inner.queries_needed() if self.inner is not None else 0
        return max(self.window, self.last_queries, inner)

    def lazy_ratio(self, ctx: LayerContext, target: torch.Tensor) -> float:
        """Mean attention mass of the last queries on the entries a streaming layer would keep."""
        valid = full_valid(ctx)
        kept = self.streaming.select(ctx, valid_lengths(ctx), target)
        mask = torch.zeros_like(valid)
        width = kept.indices.shape[-1]
        in_count = torch.arange(width, device=valid.device) < kept.counts[..., None]
        mask.scatter_(2, kept.indices.clamp(max=valid.shape[-1] - 1), in_count)
        probs = window_attention(ctx, min(self.last_queries, ctx.query.shape[2]))
        mask = mask.repeat_interleave(ctx.group_size, dim=1)[:, :, None, :]
        return float((probs * mask).sum(dim=-1).mean())

    def on_prefill(self, ctx: LayerContext) -> None:
        state = ctx.cache.policy_state
        lengths = valid_lengths(ctx)
        target = self.target(lengths)
        if self.plan is not None and "lazy" not in state:
            if ctx.num_layers != self.plan.num_layers:
                raise PlanMismatchError(
                    f"the plan was calibrated for {self.plan.model_id!r} with {self.plan.num_layers} layers; this "
                    f"model has {ctx.num_layers}"
                )
            state["lazy"] = set(self.plan.lazy_layers)
        if "lazy" in state:  # decided earlier: stream the lazy layers, run the inner method on the others
            if ctx.layer_idx in state["lazy"]:
                evict_to(self.streaming, ctx, target)
            elif self.inner is not None:
                self.inner.on_prefill(ctx)
            return
        if bool((lengths <= target[:, None]).all()):
            return
        heap, pending = state.setdefault("heap", []), state.setdefault("pending", {})
        state.setdefault("streamed", set())
        heapq.heappush(heap, (-self.lazy_ratio(ctx, target), ctx.layer_idx))
        if self.inner is not None:
            pending[ctx.layer_idx] = self.inner_selection(ctx)
        full_layers = ctx.num_layers - round(self.lazy_fraction * ctx.num_layers)
        if len(heap) > full_layers:
            _, laziest = heapq.heappop(heap)
            self.stream_layer(ctx, laziest, target)
            pending.pop(laziest, None)
            state["streamed"].add(laziest)
        if ctx.layer_idx == ctx.num_layers - 1:
            for layer_idx, (selection, view) in pending.items():
                if selection is not None:
                    ctx.cache.layers[layer_idx].compact(selection, view)
            state["lazy"] = state.pop("streamed")
            del state["heap"], state["pending"]

    def inner_selection(self, ctx: LayerContext):
        """The inner method's choice for this layer, with the view it indexes, or None when under budget."""
        lengths = valid_lengths(ctx)
        target = self.inner.layer_target(ctx, lengths)
        if bool((lengths <= target[:, None]).all()):
            return None, None
        aux = self.inner.accumulated(ctx) if hasattr(self.inner, "accumulated") else None
        return self.inner.select(ctx, lengths, target), dense_view(ctx, aux)

    def stream_layer(self, ctx: LayerContext, layer_idx: int, target: torch.Tensor) -> None:
        """Cut an already-filled layer to sinks plus a recent window."""
        layer = ctx.cache.layers[layer_idx]
        view = layer.dense()
        valid = view.valid.expand(view.keys.shape[0], view.keys.shape[1], -1)
        layer.compact(streaming_selection(valid, target, self.streaming.sinks), view)

    def set_decode_interval(self, interval: int) -> None:
        super().set_decode_interval(interval)
        for policy in (self.streaming, self.inner):
            if policy is not None:
                policy.set_decode_interval(interval)

    def acts_on_decode_step(self, call: AttentionCall) -> bool:
        """Streamed layers as `streaming_llm` decides; full layers as the inner method does (never without one)."""
        if call.layer_idx in call.cache.policy_state.get("lazy", set()):
            return self.streaming.acts_on_decode_step(call)
        return self.inner is not None and self.inner.acts_on_decode_step(call)

    def on_decode(self, ctx: LayerContext) -> None:
        lazy = ctx.cache.policy_state.get("lazy", set())
        if ctx.layer_idx in lazy:
            self.streaming.on_decode(ctx)
        elif self.inner is not None:
            self.inner.on_decode(ctx)
