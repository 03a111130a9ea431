"""Strategies: one module per method, each registering itself on import, plus the registry."""
from . import fastv, pool, random  # noqa: F401  (register on import)
from .base import ImageTokens, LayerTokens, Method, PruneConfig, Selection, VisionSignal
from .registry import available, build_method, get_method, register

__all__ = [
    "ImageTokens", "LayerTokens", "Method", "PruneConfig", "Selection", "VisionSignal",
    "available", "build_method", "get_method", "register",
]
