"""kvtune's own DeepSpeed code: adapter-only ZeRO states, gathered or consolidated back into a PEFT adapter folder.

ZeRO shards optimiser states and gradients (stage 2) and the parameters too (stage 3) across ranks, so under
stage 3 no rank's module holds the whole adapter, and a checkpoint folder holds it in per-rank fp32 shards.
`save_adapter` gathers the trainable tensors before PEFT's `save_pretrained` (what `kvtune fit` does at the end of
every run); `consolidate_adapter` rebuilds the adapter from a ZeRO checkpoint folder (an interrupted run, or one
trained with raw DeepSpeed), reading only the trainable tensors (`exclude_frozen_parameters`).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel

PEFT_ROOT = "base_model."  # where a PeftModel's own parameter names start inside any wrapper's names


def zero_stage_3(strategy: object) -> bool:
    """Whether a Lightning strategy partitions parameters (DeepSpeed ZeRO-3)."""
    return bool(getattr(strategy, "zero_stage_3", False))


def save_adapter(model: PeftModel, out_dir: str | Path, is_global_zero: bool = True, gather: bool = False) -> None:
    """PEFT's ``save_pretrained`` on rank 0; with ``gather`` (ZeRO-3) every rank joins the gathering first."""
    context = nullcontext()
    if gather:
        import deepspeed

        trainable = [p for p in model.parameters() if p.requires_grad]
        context = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
    with context:
        if is_global_zero:
            model.save_pretrained(out_dir)


def trainable_state_from_zero(checkpoint_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The fp32 trainable tensors of a ZeRO-2/3 checkpoint folder, merged across ranks (frozen ones skipped)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag, exclude_frozen_parameters=True)


def consolidate_adapter(
    checkpoint_dir: str | Path, model: PeftModel, out_dir: str | Path, tag: str | None = None
) -> Path:
    """Load a ZeRO checkpoint's trainable tensors into ``model`` (the same PEFT model, any rank count) and save it.

    Names are matched from the PEFT model's root, so checkpoints of a bare engine and of a Lightning module (whose
    names carry a ``model.`` prefix) both work. Every trainable tensor of ``model`` must be found.
    """
    state = trainable_state_from_zero(checkpoint_dir, tag)
    found = {key[key.index(PEFT_ROOT) :]: tensor for key, tensor in state.items() if PEFT_ROOT in key}
    expected = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    missing = sorted(expected - found.keys())
    if missing:
        raise ValueError(
            f"{checkpoint_dir} lacks {len(missing)} trainable tensors of this adapter (first: {missing[0]}); was it "
            "saved from the same recipe?"
        )
    model.load_state_dict({name: found[name] for name in expected}, strict=False)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir
