"""`kvtune calibrate`: score every layer's lazy ratio over a corpus and cut the laziest into a layer plan.

The lazy ratio is LightTransfer-Test's own (`kvtune.methods.lighttransfer.LightTransfer.lazy_ratio`): the attention
mass the last queries of a sequence put on the entries a streaming layer would keep (sinks + recent window). Online,
LightTransfer decides per input; calibration averages the ratio over sequences of a corpus (by default the offline
training corpus, held out from evaluation) so that training, inference and export share one fixed set of layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kvtune.api import cache_kwargs, new_cache
from kvtune.attention import LayerContext
from kvtune.hybrid.plan import LayerPlan, plan_from_scores
from kvtune.methods.base import Policy, valid_lengths
from kvtune.methods.lighttransfer import LightTransfer
from kvtune.train.data import Sequences, _tokens, load_documents


class LazyRatioProbe(Policy):
    """A policy that evicts nothing and records each layer's lazy ratio at every prefill."""

    name = "lazy_ratio_probe"

    def __init__(self, window: int, sinks: int, last_queries: int = 32) -> None:
        super().__init__(budget=sinks + window, window=last_queries)
        self.router = LightTransfer(budget=sinks + window, sinks=sinks, last_queries=last_queries)
        self.ratios: dict[int, list[float]] = {}

    def queries_needed(self) -> int:
        return self.router.queries_needed()

    def on_prefill(self, ctx: LayerContext) -> None:
        target = self.router.target(valid_lengths(ctx))
        self.ratios.setdefault(ctx.layer_idx, []).append(self.router.lazy_ratio(ctx, target))

    def on_decode(self, ctx: LayerContext) -> None:
        return None


def calibration_sequences(tokenizer: PreTrainedTokenizerBase, source: str, length: int, count: int) -> torch.Tensor:
    """The first ``count`` sequences of ``length`` tokens of ``source`` (``[count, length]``)."""
    sequences = Sequences(_tokens(tokenizer, load_documents(source)), length)
    if len(sequences) < count:
        raise ValueError(f"{source!r} fills only {len(sequences)} sequences of {length} tokens; {count} were asked")
    return sequences.data[:count]


@torch.no_grad()
def layer_scores(
    model: PreTrainedModel, sequences: torch.Tensor, window: int, sinks: int, last_queries: int = 32
) -> list[float]:
    """Mean lazy ratio of each layer over ``sequences`` (one prefill per sequence)."""
    probe = LazyRatioProbe(window, sinks, last_queries)
    for row in sequences:
        ids = row[None].to(model.device)
        model(input_ids=ids, **cache_kwargs(model, new_cache(model, probe)), use_cache=True, logits_to_keep=1)
    layers = model.config.get_text_config().num_hidden_layers
    return [sum(probe.ratios[i]) / len(probe.ratios[i]) for i in range(layers)]


def check_calibration(lazy_fraction: float, window: int, sinks: int, sequence_length: int, sequences: int) -> None:
    """Refuse settings that cannot make a plan, before any model is loaded."""
    if not 0.0 <= lazy_fraction <= 1.0:
        raise ValueError(f"lazy_fraction must lie in [0, 1], got {lazy_fraction}")
    if window < 1 or sinks < 0 or sequences < 1:
        raise ValueError(f"need window >= 1, sinks >= 0 and sequences >= 1; got {window}, {sinks}, {sequences}")
    if sequence_length <= sinks + window:
        raise ValueError(
            f"calibration sequences ({sequence_length} tokens) must be longer than sinks + window ({sinks + window})"
        )


def calibrate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    model_id: str,
    lazy_fraction: float = 0.5,
    window: int = 256,
    sinks: int = 4,
    source: str = "stdlib_train",
    sequence_length: int = 2048,
    sequences: int = 8,
    last_queries: int = 32,
) -> LayerPlan:
    """Score the layers on ``sequences`` sequences of ``source`` and make the plan that streams the laziest."""
    check_calibration(lazy_fraction, window, sinks, sequence_length, sequences)
    data = calibration_sequences(tokenizer, source, sequence_length, sequences)
    scores = layer_scores(model, data, window, sinks, last_queries)
    record = {
        "source": source,
        "sequences": sequences,
        "sequence_length": sequence_length,
        "last_queries": last_queries,
    }
    return plan_from_scores(scores, model_id, lazy_fraction, window, sinks, record)


def plot_plan(plan: LayerPlan, path: str | Path) -> Path:
    """Per-layer lazy ratio as bars, lazy layers highlighted, the cut as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lazy = set(plan.lazy_layers)
    colours = ["tab:orange" if i in lazy else "tab:blue" for i in range(plan.num_layers)]
    figure, axis = plt.subplots(figsize=(max(6.0, plan.num_layers * 0.25), 3.5))
    axis.bar(range(plan.num_layers), plan.scores, color=colours)
    if lazy and len(lazy) < plan.num_layers:
        cut = (min(plan.scores[i] for i in lazy) + max(s for i, s in enumerate(plan.scores) if i not in lazy)) / 2
        axis.axhline(cut, color="black", linestyle="--", linewidth=1, label=f"cut: {len(lazy)} lazy layers")
        axis.legend(loc="lower right")
    axis.set_xlabel("layer")
    axis.set_ylabel("lazy ratio")
    axis.set_title(f"{plan.model_id}: attention on {plan.sinks} sinks + {plan.window} recent (orange: streamed)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
