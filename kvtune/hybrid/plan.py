"""The layer plan of a LightTransfer hybrid: which layers stream (sinks + sliding window) and which stay full.

A plan is data, written once by `kvtune calibrate` and read by training, inference and export, so that all three
use the same layers and the same window. Window semantics follow transformers' ``sliding_window``: a query of a
lazy layer sees the keys at distance ``< window`` (itself included) plus the first ``sinks`` tokens of the
sequence. The streaming cache therefore holds ``sinks + window - 1`` entries between steps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

FORMAT_VERSION = 1
PLAN_FILE = "plan.json"  # the plan's name in a run, its adapter folder and every export


class PlanMismatchError(ValueError):
    """A plan was made for another model (layer count or model id)."""


@dataclass(frozen=True)
class LayerPlan:
    """Which decoder layers are lazy, with the window and sinks they keep; ``scores`` are the calibrated ratios."""

    model_id: str
    num_layers: int
    lazy_layers: tuple[int, ...]
    window: int
    sinks: int = 4
    data: dict = field(default_factory=dict)  # what the scores were measured on (corpus, sequences, length)
    scores: tuple[float, ...] = ()  # lazy ratio per layer, higher = lazier
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"a plan's window must be at least 1 token, got {self.window}")
        if self.sinks < 0:
            raise ValueError(f"a plan's sinks must be >= 0, got {self.sinks}")
        bad = [i for i in self.lazy_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"lazy layers {bad} lie outside the model's {self.num_layers} layers")
        if self.scores and len(self.scores) != self.num_layers:
            raise ValueError(f"{len(self.scores)} scores for {self.num_layers} layers")
        object.__setattr__(self, "lazy_layers", tuple(sorted(set(self.lazy_layers))))
        object.__setattr__(self, "scores", tuple(float(s) for s in self.scores))

    @property
    def layer_types(self) -> list[str]:
        """transformers' per-layer attention types (``sliding_attention`` for lazy layers)."""
        lazy = set(self.lazy_layers)
        return ["sliding_attention" if i in lazy else "full_attention" for i in range(self.num_layers)]

    def kept_entries(self, length: int) -> list[int]:
        """Cache entries each layer holds after ``length`` tokens went through it (the decode cache's arithmetic)."""
        lazy = set(self.lazy_layers)
        return [min(length, self.sinks + self.window - 1) if i in lazy else length for i in range(self.num_layers)]

    def kv_bytes(self, length: int, kv_heads: int, head_dim: int, itemsize: int, batch: int = 1) -> int:
        """Bytes of keys and values the plan's cache holds after ``length`` tokens (what a measured cache must meet)."""
        return 2 * sum(self.kept_entries(length)) * kv_heads * head_dim * itemsize * batch

    def check_model(self, model: PreTrainedModel, model_id: str | None = None) -> None:
        """Refuse a plan made for another model: different layer count, or (when given) another model id."""
        layers = model.config.get_text_config().num_hidden_layers
        if layers != self.num_layers:
            raise PlanMismatchError(
                f"the plan was calibrated for {self.model_id!r} with {self.num_layers} layers; this model has {layers}"
            )
        if model_id is not None and model_id != self.model_id:
            raise PlanMismatchError(f"the plan was calibrated for {self.model_id!r}, not {model_id!r}")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> LayerPlan:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no layer plan at {path} (write one with `kvtune calibrate`)")
        record = json.loads(path.read_text())
        version = record.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path} is layer-plan format {version!r}; this kvtune reads format {FORMAT_VERSION}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"{path} has unknown layer-plan keys {unknown}")
        return cls(**{**record, "lazy_layers": tuple(record["lazy_layers"]), "scores": tuple(record["scores"])})


def plan_from_scores(
    scores: list[float], model_id: str, lazy_fraction: float, window: int, sinks: int, data: dict | None = None
) -> LayerPlan:
    """The ``round(lazy_fraction * L)`` layers with the highest lazy ratio become lazy (LightTransfer's cut)."""
    if not 0.0 <= lazy_fraction <= 1.0:
        raise ValueError(f"lazy_fraction must lie in [0, 1], got {lazy_fraction}")
    count = round(lazy_fraction * len(scores))
    order = torch.tensor(scores).argsort(descending=True, stable=True).tolist()
    return LayerPlan(
        model_id=model_id,
        num_layers=len(scores),
        lazy_layers=tuple(order[:count]),
        window=window,
        sinks=sinks,
        data=dict(data or {}),
        scores=tuple(scores),
    )
