"""LoCoCo: trainable convolutional KV compression, as a PEFT method (importing registers it with PEFT)."""

from kvtune.lococo.compressor import LoCoCoCompressor
from kvtune.lococo.peft import LoCoCoConfig, LoCoCoLayer, LoCoCoModel

__all__ = ["LoCoCoCompressor", "LoCoCoConfig", "LoCoCoLayer", "LoCoCoModel"]
