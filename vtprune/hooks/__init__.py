"""Model adapters, chosen by the model's class from a dict. One module per family."""
from __future__ import annotations

from .base import Adapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_vl import Qwen3VLAdapter, QwenVLAdapter

# class name -> adapter; matched against the model's class and its bases (so subclasses work)
ADAPTERS: dict[str, type[Adapter]] = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "LlavaNextVideoForConditionalGeneration": LlavaNextVideoAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "Qwen2VLForConditionalGeneration": QwenVLAdapter,
    "Qwen2_5_VLForConditionalGeneration": QwenVLAdapter,
    "Qwen3VLForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3VLMoeForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3_5ForConditionalGeneration": Qwen3VLAdapter,
    "Qwen3_5MoeForConditionalGeneration": Qwen3VLAdapter,
}


def supported() -> list[str]:
    return sorted(ADAPTERS)


def adapter_class(model) -> type[Adapter] | None:
    """The adapter of `model`'s transformers class (or of a transformers class it derives from), or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS and cls.__module__.startswith("transformers."):
            return ADAPTERS[cls.__name__]
    return None


def adapter_for(model) -> Adapter:
    cls = adapter_class(model)
    inner = getattr(model, "_orig_mod", None)
    if cls is None and adapter_class(inner) is not None:
        raise TypeError(f"vtprune needs the model itself, not torch.compile's wrapper ({type(model).__name__}): pass "
                        f"model._orig_mod (the {type(inner).__name__}); to compile, vtprune.compile_llm(model) "
                        "compiles its language model, with the pruning outside the compiled region")
    if cls is None:
        raise TypeError(
            f"vtprune does not support {type(model).__name__}; supported model classes: {', '.join(supported())}"
        )
    return cls(model)


__all__ = ["ADAPTERS", "Adapter", "adapter_class", "adapter_for", "supported"]
