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


def adapter_for(model) -> Adapter:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS and cls.__module__.startswith("transformers."):
            return ADAPTERS[cls.__name__](model)
    raise TypeError(
        f"vtprune does not support {type(model).__name__}; supported model classes: {', '.join(supported())}"
    )


__all__ = ["ADAPTERS", "Adapter", "adapter_for", "supported"]
