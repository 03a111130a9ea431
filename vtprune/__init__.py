"""vtprune: drop the visual tokens a vision-language model does not need.

    import vtprune
    model = vtprune.patch(model, "random", ratio=0.25)
    out = model.generate(**inputs)
"""
from .methods import ImageTokens, LayerTokens, Method, PruneConfig, Selection, VisionSignal, available, register
from .patching import compile_llm, patch, pruned, stats, uncompile_llm, unpatch, unpatched
from .vit import patch_vit

__version__ = "0.1.0"

__all__ = [
    "ImageTokens", "LayerTokens", "Method", "PruneConfig", "Selection", "VisionSignal",
    "available", "compile_llm", "patch", "patch_vit", "pruned", "register", "stats", "uncompile_llm", "unpatch",
    "unpatched",
]
