"""`patch_vit`: the registry's strategies inside a plain vision transformer (timm `VisionTransformer`,
open_clip visual towers), the way Token Merging patches a ViT in one line.

    model = timm.create_model("vit_base_patch16_224")
    vtprune.patch_vit(model, "divprune", ratio=0.25, layer=5)   # after block 5 (0-based) keep 49 of 196
    logits = model(images)
    vtprune.unpatch(model)                                       # bit-identical to never patched

After block `layer`, each image's patch tokens are reduced to the budget (`keep` tokens, or `ratio`
of the patches); the tokens before the patches (CLS, registers) are always kept, and the later
blocks, the final norm and the head run on the shorter sequence. Selection strategies keep the
chosen tokens in their order; merging ones (pool, token_shuffle) replace them with merged tokens.
Vision signals (HiPrune's attention, ToDRE's CLS-attended pivot) come from the blocks up to `layer`:
"feature" is block `layer` itself, "object" the middle one of blocks 0..layer, integers count blocks
0..layer (negative from `layer`). Strategies that act inside a language model (fastv, transprune,
vflowopt's in-LLM drops, todre's stage 2) have no ViT form and raise.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .hooks.base import reduce_attention
from .hooks.runtime import Stats, _check_selection, _sync
from .methods.base import ImageTokens, VisionSignal
from .methods.registry import build_method
from .patching import _ATTR, unpatch

LLM_ONLY = {"fastv": "it drops tokens inside a language model's decoder, by the text's attention",
            "transprune": "it drops tokens inside a language model's decoder, by the text's attention",
            "vflowopt": "its schedule drops tokens inside a language model (r2, r3) and recycles them there"}


def supported() -> list[str]:
    """Registered strategies that patch_vit can run (those that do not act inside a language model)."""
    from .methods.registry import available, get_method

    return [m for m in available() if m not in LLM_ONLY and get_method(m).stage != "llm"]


@dataclass
class Tower:
    """What patch_vit needs to know about a ViT."""

    blocks: torch.nn.ModuleList
    prefix: int  # tokens before the patches (CLS, registers): never pruned
    has_cls: bool
    grid: tuple[int, int]
    batch_first: bool
    kind: str  # "timm" | "open_clip"


def tower(model) -> Tower:
    """The blocks and token layout of a timm VisionTransformer or an open_clip visual tower (or CLIP model)."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens"):
        grid = tuple(model.patch_embed.grid_size)
        if getattr(model.patch_embed, "dynamic_img_size", False):
            raise ValueError("timm ViTs with dynamic_img_size are not supported: the patch grid must be fixed")
        return Tower(model.blocks, int(model.num_prefix_tokens), getattr(model, "cls_token", None) is not None,
                     grid, True, "timm")
    visual = getattr(model, "visual", model)
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") and hasattr(visual, "grid_size"):
        if getattr(visual, "attn_pool", None) is not None and getattr(visual, "attn_pool_type", "") == "parallel":
            raise ValueError("open_clip towers with a parallel attention pool are not supported")
        return Tower(visual.transformer.resblocks, 1, True, tuple(visual.grid_size),
                     getattr(visual.transformer, "batch_first", True), "open_clip")
    raise TypeError(f"patch_vit supports timm VisionTransformer and open_clip visual towers, got {type(model).__name__}")


def _qk_timm(block, x):
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return q, k, attn.scale


def _qk_open_clip(block, x):
    attn = block.attn
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise ValueError("vision signals need open_clip blocks with torch.nn.MultiheadAttention (packed in-projection)")
    d = attn.embed_dim
    bias = attn.in_proj_bias
    q = F.linear(x, attn.in_proj_weight[:d], None if bias is None else bias[:d])
    k = F.linear(x, attn.in_proj_weight[d:2 * d], None if bias is None else bias[d:2 * d])
    b, n, _ = x.shape
    h = attn.num_heads
    q, k = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k))
    return q, k, (d // h) ** -0.5


class VitState:
    """What patch_vit attaches to a ViT (as `patch` does to a VLM): method, hooks, last stats."""

    def __init__(self, model, method, method_name: str, options: dict, layer: int, t: Tower):
        self.model, self.method, self.method_name, self.options = model, method, method_name, options
        self.layer, self.tower = layer, t
        self.handles: list = []
        self.scores: dict[str, torch.Tensor] = {}
        self.last_stats = Stats(method=method_name)

    def install(self):
        n = self.layer + 1
        for name, sig in self.method.vision_signals().items():
            if sig.reduce == "entropy":
                raise ValueError(f"{self.method_name}: entropy signals need the raw image; not available in patch_vit")
            if sig.reduce in ("cls",) and not self.tower.has_cls:
                raise ValueError(f"{self.method_name}: signal {name!r} needs a CLS token; this ViT has none")
            li = _resolve(sig.layer, n)
            block = self.tower.blocks[li]
            norm = block.norm1 if self.tower.kind == "timm" else block.ln_1
            self.handles.append(norm.register_forward_hook(partial(self._signal, name, sig, block)))
        self.handles.append(self.tower.blocks[self.layer].register_forward_hook(self._drop))

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []

    def _tokens(self, x):
        return x if self.tower.batch_first else x.transpose(0, 1)

    def _signal(self, name: str, sig: VisionSignal, block, module, args, output):
        x = self._tokens(output)  # the attention's input (after the block's first norm)
        q, k, scale = (_qk_timm if self.tower.kind == "timm" else _qk_open_clip)(block, x)
        scores = reduce_attention(q, k, float(scale), sig, self.tower.has_cls)
        self.scores[name] = scores[:, self.tower.prefix:]
        return None

    def _drop(self, module, args, output):
        x = self._tokens(output)
        p = self.tower.prefix
        patches = x[:, p:]
        b, n, _ = patches.shape
        h, w = self.tower.grid
        if n != h * w:
            raise ValueError(f"block {self.layer} output has {n} patch tokens, the {h}x{w} grid needs {h * w}")
        keep = self.method.budget(n, (1, h, w))
        scores, self.scores = self.scores, {}
        self.last_stats = Stats(method=self.method_name, visual_before=[n] * b, visual_after=[n] * b)
        if keep >= n:
            return None
        _sync(x)
        t0 = time.perf_counter()
        images = [ImageTokens(patches[i], (1, h, w), keep, {k: v[i] for k, v in scores.items()}) for i in range(b)]
        sels = self.method.select_batch(images)  # one launch for the batch where the method has a batched form
        counts = {torch.as_tensor(s.indices).numel() for s in sels}
        if len(counts) != 1:
            raise RuntimeError(f"{self.method_name} kept different token counts per image: {sorted(counts)}")
        idx = torch.stack([torch.as_tensor(s.indices).long().to(x.device) for s in sels])
        idx = _check_selection(idx, n, keep, f"{self.method_name}.select", rows=True)  # one host sync for the batch
        if all(s.tokens is None for s in sels):
            kept = patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        else:
            kept = torch.stack([patches[i, idx[i]] if s.tokens is None else s.tokens.to(x.dtype)
                                for i, s in enumerate(sels)])
        out = torch.cat([x[:, :p], kept], 1)
        _sync(x)
        self.last_stats.selection_ms = (time.perf_counter() - t0) * 1e3
        self.last_stats.visual_after = [idx.shape[1]] * b
        return out if self.tower.batch_first else out.transpose(0, 1)


def _resolve(layer, n: int) -> int:
    """A VisionSignal layer over blocks 0..n-1 (n - 1 = the pruning block)."""
    if layer == "feature":
        return n - 1
    if layer == "object":
        return max(0, round(n / 2) - 1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"vision signal layer must be 'feature', 'object' or an int in [{-n}, {n}) "
                         f"(blocks up to the pruning layer), got {layer!r}")
    return layer % n


def patch_vit(model, method: str, *, layer: int | None = None, **options):
    """Prune patch tokens of `model` (timm VisionTransformer, open_clip visual tower or CLIP model) after
    block `layer` (0-based; default: the middle block, n_blocks // 2 - 1) with strategy `method`.

    Options: exactly one of `keep` (patch tokens kept per image) or `ratio`, plus the method's own.
    Returns the same model; `vtprune.unpatch(model)` removes the hooks, `vtprune.stats(model)` reports
    the last forward. Patching again replaces the previous configuration."""
    if method in LLM_ONLY:
        raise ValueError(f"{method} has no ViT form: {LLM_ONLY[method]}")
    options = dict(options)
    if method == "todre":
        if options.get("stage2", False):
            raise ValueError("todre's stage 2 acts inside a language model; patch_vit runs stage 1 (stage2=False)")
        options["stage2"] = False
    built = build_method(method, options)
    if built.stage == "llm" or built.drop_layers(1000):
        raise ValueError(f"{method} acts inside a language model's decoder; it has no ViT form")
    t = tower(model)
    n_blocks = len(t.blocks)
    if layer is None:
        layer = max(0, n_blocks // 2 - 1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_blocks - 1:
        raise ValueError(f"layer must be an int in [0, {n_blocks - 1}) (a block must follow it), got {layer!r}")
    state = VitState(model, built, method, options, layer, t)
    unpatch(model)
    state.install()
    setattr(model, _ATTR, state)
    return model
