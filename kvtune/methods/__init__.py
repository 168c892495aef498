"""Compression methods, one small module each, looked up by name (see `available`)."""

from kvtune.methods import (  # noqa: F401  (importing registers them)
    adakv,
    full,
    h2o,
    kvmerger,
    kvzip,
    lighttransfer,
    lococo,
    pyramidkv,
    random_eviction,
    snapkv,
    streaming_llm,
    tova,
)
from kvtune.methods.base import Policy
from kvtune.methods.registry import available, build, training_free

__all__ = ["Policy", "available", "build", "training_free"]
