"""Apply a saved adapter (LoCoCo, LoRA, or both) to a model: a local PEFT folder or a Hub repository id."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel

import kvtune.lococo  # noqa: F401  (registers the LOCOCO PEFT type before PEFT reads the config)
from kvtune.hybrid.attention import apply_plan
from kvtune.hybrid.plan import PLAN_FILE, LayerPlan


def load_adapter(model: PreTrainedModel, path_or_repo: str | Path, adapter_name: str = "default") -> PeftModel:
    """The model wrapped with the adapter at ``path_or_repo``, in eval mode (frozen; see `kvtune fit` to train).

    PEFT injects adapters into ``model`` in place; loading the same source again returns the same wrapper. A local
    folder with a layer plan (``plan.json``: a LightTransfer hybrid's LoRA) also makes the plan's lazy layers stream.
    """
    source = str(path_or_repo)
    loaded = model.__dict__.setdefault("_kvtune_adapters", {})
    if source in loaded:
        return loaded[source]
    if not Path(source).expanduser().exists() and source.count("/") != 1:
        raise FileNotFoundError(f"adapter {source!r} is neither a local folder nor a Hub repository id (owner/name)")
    adapter = PeftModel.from_pretrained(model, source, adapter_name=adapter_name).eval()
    plan = Path(source).expanduser() / PLAN_FILE
    if plan.is_file():
        apply_plan(adapter, LayerPlan.load(plan))
    loaded[source] = adapter
    return adapter
