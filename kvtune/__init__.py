"""kvtune: compress the KV cache of Hugging Face causal LMs, with real memory savings."""

from kvtune import methods
from kvtune.adapters import load_adapter
from kvtune.api import compress, generate, new_cache, prefill
from kvtune.cache import KVCache
from kvtune.models import load_model

__all__ = ["KVCache", "compress", "generate", "load_adapter", "load_model", "methods", "new_cache", "prefill"]
__version__ = "0.1.0"
