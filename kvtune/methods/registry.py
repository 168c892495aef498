"""Method registry: names to policy classes, and `lighttransfer+X` composition."""

from __future__ import annotations

from collections.abc import Callable

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


def build(method: str, **kwargs):
    """Instantiate a policy by name. ``a+b`` makes ``a`` route layers and ``b`` compress the layers it keeps."""
    head, _, rest = method.partition("+")
    if head not in _REGISTRY or (rest and rest not in _REGISTRY):
        raise ValueError(f"unknown method '{method}'; valid names: {', '.join(available())}")
    cls = _REGISTRY[head]
    if not rest:
        return cls(**kwargs)
    if not getattr(cls, "composes", False):
        raise ValueError(f"'{head}' does not take an inner method; composable: {', '.join(available())}")
    if not getattr(_REGISTRY[rest], "composable", True):
        raise ValueError(f"'{rest}' cannot run inside '{head}'; composable: {', '.join(available())}")
    return cls(inner=rest, **kwargs)


def get(name: str) -> type:
    return _REGISTRY[name]


def training_free() -> list[str]:
    """The methods that need no trained adapter (everything `available` lists except e.g. `lococo`)."""
    return [n for n in available() if not getattr(_REGISTRY[n.partition("+")[0]], "needs_adapter", False)]
