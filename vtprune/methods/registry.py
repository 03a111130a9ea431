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
    config = cls.Config(**options)
    if config.video_budget == "clip" and cls.per_grid:
        anywhere = ", ".join(n for n in available() if not _REGISTRY[n].per_grid)
        raise ValueError(f"{name} works on each frame's token grid, so its video budget is per frame: "
                         f"video_budget='clip' is for strategies that choose among any tokens ({anywhere})")
    return cls(config)


def option_help(cls: type[Method]) -> list[tuple[str, str, object, str]]:
    """(name, type, default, help) for each option of a method's config; the help is the comment on the
    field's line (or the comment lines just above it) in the config class that declares it."""
    out = []
    notes = _field_comments(cls.Config)
    if cls.per_grid:  # (build_method refuses "clip" for it)
        notes["video_budget"] = "videos: \"frame\" only (it works on each frame's token grid)"
    for f in dataclasses.fields(cls.Config):
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append((f.name, str(f.type), default, notes.get(f.name, "")))
    return out


def _field_comments(config: type) -> dict[str, str]:
    import inspect
    import re

    notes: dict[str, str] = {}
    for klass in reversed(config.__mro__):  # base first: a subclass's own comment wins
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        above: list[str] = []
        for line in lines:
            m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
            comment = re.match(r"\s+#\s*(.*)$", line)
            if comment:
                above.append(comment.group(1))
            elif m and not line.lstrip().startswith(("def ", "return", "raise")):
                text = m.group(2) or " ".join(above)
                if text:
                    notes[m.group(1)] = text
                above = []
            else:
                above = []
    return notes
