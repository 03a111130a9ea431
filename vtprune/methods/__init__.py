"""Strategies: one module per method, each registering itself on import, plus the registry."""
from . import divprune, fastv, hiprune, pool, random, todre, token_shuffle, transprune, vflowopt  # noqa: F401
from .base import ImageTokens, LayerTokens, Method, PruneConfig, Selection, VisionSignal
from .registry import available, build_method, get_method, register

__all__ = [
    "ImageTokens", "LayerTokens", "Method", "PruneConfig", "Selection", "VisionSignal",
    "available", "build_method", "get_method", "register",
]
