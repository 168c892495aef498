"""Method registry: names to policy classes, and `lighttransfer+X` composition."""

from __future__ import annotations

from collections.abc import Callable

from kvtune.validation import UserError, check_prefill_chunk

_REGISTRY: dict[str, type] = {}


def register(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Names accepted by `build`, composable ones included as ``router+method``."""
    names = sorted(_REGISTRY)
    routers = [n for n in names if getattr(_REGISTRY[n], "composes", False)]
    inner = [
        n
        for n in names
        if n not in routers
        and n != "full"
        and not getattr(_REGISTRY[n], "needs_adapter", False)
        and getattr(_REGISTRY[n], "composable", True)
    ]
    return names + [f"{r}+{m}" for r in routers for m in inner]


def check_name(method: str) -> None:
    """A `UserError` listing the valid names unless ``method`` is one (``router+method`` included)."""
    head, _, rest = str(method).partition("+")
    if head not in _REGISTRY or (rest and rest not in _REGISTRY):
        raise UserError(f"unknown method '{method}'; valid names: {', '.join(available())}")
    if rest and not getattr(_REGISTRY[head], "composes", False):
        raise UserError(f"'{head}' does not take an inner method; composable: {', '.join(available())}")
    if rest and not getattr(_REGISTRY[rest], "composable", True):
        raise UserError(f"'{rest}' cannot run inside '{head}'; composable: {', '.join(available())}")


def build(method: str, prefill_chunk: int | None = None, decode_interval: int = 1, **kwargs):
    """Instantiate a policy by name. ``a+b`` makes ``a`` route layers and ``b`` compress the layers it keeps.

    ``prefill_chunk`` makes any method prefill prompts that many tokens at a time and compress between chunks (as
    `lococo` does with its own chunk), so that methods compare under the same chunking; such a prefill cannot be
    replayed from a shared full-cache recording. ``decode_interval`` makes a method that evicts while decoding
    evict every that many steps, down to its budget, instead of every step (`Policy.set_decode_interval`).
    """
    check_name(method)
    check_prefill_chunk(prefill_chunk)
    head, _, rest = method.partition("+")
    cls = _REGISTRY[head]
    policy = cls(inner=rest, **kwargs) if rest else cls(**kwargs)
    if prefill_chunk is not None:
        policy.prefill_chunk, policy.replayable = prefill_chunk, False
    if decode_interval != 1:
        if head == "lococo":
            raise UserError("lococo cycles between mem_size and mem_size + buffer already: set its buffer= instead")
        policy.set_decode_interval(decode_interval)
    return policy


def get(name: str) -> type:
    return _REGISTRY[name]


def training_free() -> list[str]:
    """The methods that need no trained adapter (everything `available` lists except e.g. `lococo`)."""
    return [n for n in available() if not getattr(_REGISTRY[n.partition("+")[0]], "needs_adapter", False)]
