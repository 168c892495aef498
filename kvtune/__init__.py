"""kvtune: compress the KV cache of Hugging Face causal LMs, with real memory savings."""

from kvtune import methods
from kvtune.adapters import load_adapter
from kvtune.api import compress, compress_context, generate, new_cache, prefill
from kvtune.cache import KVCache
from kvtune.cache_io import load_cache
from kvtune.models import load_model
from kvtune.validation import UserError

__all__ = [
    "KVCache",
    "UserError",
    "compress",
    "compress_context",
    "generate",
    "load_adapter",
    "load_cache",
    "load_model",
    "methods",
    "new_cache",
    "prefill",
]
__version__ = "0.1.0"
