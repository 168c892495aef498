"""Attention kernels for kvtune's per-layer call (prefill, chunked prefill, LoCoCo chunks and decode alike).

`attend_ragged` computes one layer's attention over the right-aligned dense view with a validity tensor;
`best_backend` picks the kernel for a device, dtype and layout. See `kvtune.kernels.backends`.
"""

from kvtune.kernels.backends import (
    BACKENDS,
    AttendFn,
    attend_ragged,
    best_backend,
    installed_kernels,
    masked_sdpa,
    rectangular_sdpa,
    visible_mask,
)
from kvtune.kernels.packing import VarlenPack, pack, unpack

__all__ = [
    "BACKENDS",
    "AttendFn",
    "VarlenPack",
    "attend_ragged",
    "best_backend",
    "installed_kernels",
    "masked_sdpa",
    "pack",
    "rectangular_sdpa",
    "unpack",
    "visible_mask",
]
