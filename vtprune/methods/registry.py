"""The strategy registry: unique lowercase names -> Method subclasses, filled on import."""
from __future__ import annotations

import dataclasses
import re

from .base import STAGES, Method, PruneConfig

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: `@register("mymethod") class MyMethod(Method): ...`."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"method names are lowercase identifiers, got {name!r}")

    def wrap(cls):
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register({name!r}) expects a subclass of vtprune.Method, got {cls!r}")
        if cls.stage not in STAGES:
            raise ValueError(f"method {name!r} has stage {cls.stage!r}; allowed: {', '.join(STAGES)}")
        if not (isinstance(cls.Config, type) and issubclass(cls.Config, PruneConfig)):
            raise TypeError(f"method {name!r}: Config must subclass vtprune.PruneConfig")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available() -> list[str]:
    """Registered strategy names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a name (str), got {type(name).__name__}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(available())}") from None


def build_method(name: str, options: dict) -> Method:
    """Instantiate a registered method from patch() keyword arguments, validating option names."""
    cls = get_method(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for method {name!r}; "
            f"allowed: {', '.join(sorted(fields))}"
        )
    return cls(cls.Config(**options))


def option_help(cls: type[Method]) -> list[tuple[str, str, object]]:
    """(name, type, default) for each option of a method's config."""
    out = []
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, str(f.type), default))
    return out
