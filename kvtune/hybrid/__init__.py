"""LightTransfer hybrids: layer plans (`plan`), calibration (`calibrate`), streaming attention (`attention`),
training (`module`, `fit`), and export to a stock transformers checkpoint (`export`)."""

from kvtune.hybrid.attention import apply_plan, hybrid_cache, load_hybrid
from kvtune.hybrid.plan import LayerPlan, PlanMismatchError

__all__ = ["LayerPlan", "PlanMismatchError", "apply_plan", "hybrid_cache", "load_hybrid"]
