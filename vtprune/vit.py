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

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from .hooks.base import PerThread, call_arguments, reduce_attention, wrap_method
from .hooks.checks import checked_batch
from .hooks.runtime import Stats, ThreadStats, mark
from .methods.base import ImageTokens, VisionSignal
from .methods.registry import build_method, get_method
from .patching import _ATTR, _base, _state

REPLAYS = 64  # forwards whose earlier-block scores a checkpointed backward can still find (VitState._scores)
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

    prefix: int  # tokens before the patches (CLS, registers): never pruned
    has_cls: bool
    owner: torch.nn.Module  # the timm model or open_clip visual tower: grid size, patch dropout
    batch_first: bool
    kind: str  # "timm" | "open_clip"
    via: tuple = ()  # modules between the model given and the owner (open_clip's TimmModel around its timm trunk)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The blocks, read when needed (prune_intermediate_layers replaces the list)."""
        return self.owner.blocks if self.kind == "timm" else self.owner.transformer.resblocks

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid, read when needed (timm's set_input_size changes it)."""
        g = self.owner.patch_embed.grid_size if self.kind == "timm" else self.owner.grid_size
        return int(g[0]), int(g[1])

    def patch_dropout(self) -> float:
        """Probability with which this tower drops patches before its blocks (train mode only)."""
        drop = getattr(self.owner, "patch_drop" if self.kind == "timm" else "patch_dropout", None)
        return float(getattr(drop, "prob", 0.0) or 0.0) if self.owner.training else 0.0


def tower(model) -> Tower:
    """The blocks and token layout of a timm VisionTransformer or an open_clip visual tower (or CLIP model)."""
    if hasattr(model, "blocks") and (hasattr(model, "patch_embed") or type(model).__module__.startswith("timm.")) \
            and hasattr(model, "num_prefix_tokens"):
        from timm.models.vision_transformer import VisionTransformer

        if not isinstance(model, VisionTransformer):  # Eva, BEiT, NaFlexVit...: rotary / relative positions
            raise TypeError(f"patch_vit supports timm's VisionTransformer family (ViT, DeiT, DINOv2, SigLIP, ...), not "
                            f"{type(model).__name__}: its position encoding inside the blocks needs the full grid")
        if getattr(model, "dynamic_img_size", False) or getattr(model.patch_embed, "dynamic_img_size", False):
            raise ValueError("timm ViTs with dynamic_img_size are not supported: the patch grid must be fixed "
                             "(model.set_input_size changes it between calls, and works)")
        return Tower(int(model.num_prefix_tokens), getattr(model, "cls_token", None) is not None,
                     model, True, "timm")
    visual = getattr(model, "visual", model)
    trunk = getattr(visual, "trunk", None)  # open_clip's timm-tower models (SigLIP, ...): a timm ViT inside
    if isinstance(trunk, torch.nn.Module) and hasattr(trunk, "blocks") and hasattr(trunk, "num_prefix_tokens"):
        t = tower(trunk)
        t.via = tuple(m for m in (visual,) if m is not model)
        return t
    if hasattr(visual, "transformer") and hasattr(visual.transformer, "resblocks") and hasattr(visual, "grid_size"):
        # open_clip before 2.26 has no batch_first and runs its blocks sequence-first
        return Tower(1, True, visual,
                     getattr(visual.transformer, "batch_first", False), "open_clip")
    from .hooks import adapter_class

    vlm = adapter_class(model) is not None
    raise TypeError(f"patch_vit supports timm VisionTransformer and open_clip visual towers (their own or a timm "
                    f"trunk), got {type(model).__name__}" + ("; a vision-language model is patched with "
                                                            "vtprune.patch(model, method, ...)" if vlm else ""))


def _signal_block_error(block, kind: str) -> str | None:
    """Why vision signals cannot be read from this block (None: they can)."""
    if kind == "timm":
        attn = getattr(block, "attn", None)
        if not all(hasattr(attn, a) for a in ("qkv", "q_norm", "k_norm", "scale", "num_heads", "head_dim")):
            return (f"vision signals need timm blocks with attn.qkv (a standard Attention); "
                    f"{type(block).__name__} has none")
        if attn.qkv.out_features != 3 * attn.num_heads * attn.head_dim:  # DiffAttention: two maps per head
            return (f"vision signals need a standard Attention (one softmax map per head); "
                    f"{type(attn).__name__} is not one")
        return None
    attn = getattr(block, "attn", None)
    if not hasattr(block, "ln_1") or not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        return "vision signals need open_clip blocks with torch.nn.MultiheadAttention (packed in-projection)"
    return None


def _qk_timm(block, x):
    attn = block.attn
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return q, k, attn.scale


def _qk_open_clip(block, x):
    attn = block.attn
    d = attn.embed_dim
    bias = attn.in_proj_bias
    q = F.linear(x, attn.in_proj_weight[:d], None if bias is None else bias[:d])
    k = F.linear(x, attn.in_proj_weight[d:2 * d], None if bias is None else bias[d:2 * d])
    b, n, _ = x.shape
    h = attn.num_heads
    q, k = (t.reshape(b, n, h, d // h).transpose(1, 2) for t in (q, k))
    return q, k, (d // h) ** -0.5


class _VitCall(PerThread):
    """A VitState's per-forward state, each thread's own (threads running one patched ViT at once)."""

    def __init__(self):
        self.scores: dict[str, torch.Tensor] = {}  # this forward's signals, by name
        self.last_stats: Stats | None = None


class VitState(ThreadStats):
    """What patch_vit attaches to a ViT (as `patch` does to a VLM): method, hooks, last stats."""

    def __init__(self, model, method, method_name: str, options: dict, layer: int, t: Tower):
        self.model, self.method, self.method_name, self.options = model, method, method_name, options
        self.layer, self.tower = layer, t
        self.handles: list = []
        self.call = _VitCall()
        # Scores from blocks before `layer`, per forward, for gradient checkpointing: backward reruns the
        # pruning block alone, after later forwards have replaced `scores` (two crops, then one backward).
        # Keyed by the pruning block's input (a rerun gets that tensor or a detached view of it); the most
        # recent REPLAYS forwards are kept.
        self.early: set[str] = set()
        self.replays: OrderedDict[tuple, dict[str, torch.Tensor]] = OrderedDict()
        self.latest = Stats(method=method_name)  # (last_stats: the calling thread's, ThreadStats)

    def holders(self) -> list:
        """The modules this state is attached to: the model given, an open_clip CLIP's visual tower, and
        the timm trunk of an open_clip timm tower."""
        out = [self.model]
        for m in (*self.tower.via, self.tower.owner):
            if all(m is not h for h in out):
                out.append(m)
        return out

    def check(self):
        """Everything install() would refuse, before any hook is added."""
        n = self.layer + 1
        for name, sig in self.method.vision_signals().items():
            if sig.reduce == "entropy":
                raise ValueError(f"{self.method_name}: entropy signals need the raw image; not available in patch_vit")
            if sig.reduce in ("cls",) and not self.tower.has_cls:
                raise ValueError(f"{self.method_name}: signal {name!r} needs a CLS token; this ViT has none")
            why = _signal_block_error(self.tower.blocks[_resolve(sig, n, name)], self.tower.kind)
            if why is not None:
                raise ValueError(f"{self.method_name}: {why}")

    def install(self):
        self.check()
        n = self.layer + 1
        for name, sig in self.method.vision_signals().items():
            at = _resolve(sig, n)
            if at < self.layer:
                self.early.add(name)
            block = self.tower.blocks[at]
            # q, k from the attention's own input (after norm1 in a pre-norm Block, the raw tokens in timm's
            # post-norm ResPostBlock)
            self.handles.append(block.attn.register_forward_pre_hook(partial(self._signal, name, sig, block),
                                                                     with_kwargs=True))
        self.handles.append(self.tower.blocks[self.layer].register_forward_hook(self._drop, with_kwargs=True))
        # every forward runs block 0 (prune_intermediate_layers keeps the first blocks): it notices a pruning block gone
        self.handles.append(self.tower.blocks[0].register_forward_pre_hook(self._check_layer))
        owner = self.tower.owner
        if hasattr(owner, "forward_intermediates"):
            self.handles.append(wrap_method(owner, "forward_intermediates", self._intermediates))
        for holder in self.holders():
            setattr(holder, _ATTR, self)

    def remove(self):
        for h in reversed(self.handles):
            h.remove()
        self.handles = []
        for holder in self.holders():
            if holder.__dict__.get(_ATTR) is self:
                delattr(holder, _ATTR)

    def _check_layer(self, module, args):
        n = len(self.tower.blocks)
        if self.layer >= n:
            raise ValueError(f"patch_vit: the pruning block {self.layer} is gone (the model keeps {n} blocks, after "
                             "prune_intermediate_layers), so nothing would be pruned; patch_vit again with an earlier "
                             "layer, or unpatch")

    def _intermediates(self, original, *args, **kwargs):
        """forward_intermediates: spatial (NCHW) maps exist only for blocks before the pruning one."""
        bound = call_arguments(original, args, kwargs)
        fmt = bound.get("output_fmt", "NCHW")
        indices = bound.get("indices")
        n = len(self.tower.blocks)
        self._check_layer(None, ())
        taken = range(n) if indices is None else range(n - indices, n) if isinstance(indices, int) else \
            [i % n for i in indices]
        late = [i for i in taken if i >= self.layer]
        if fmt != "NLC" and late:
            raise ValueError(f"forward_intermediates: blocks {late} come after the pruning (block {self.layer} and "
                             "later hold the kept tokens, not a full grid); pass output_fmt='NLC', or ask for "
                             f"blocks before {self.layer}")
        return original(*args, **kwargs)

    def _tokens(self, x):
        return x if self.tower.batch_first else x.transpose(0, 1)

    def _signal(self, name: str, sig: VisionSignal, block, module, args, kwargs):
        x = self._tokens(args[0] if args else kwargs.get("x", kwargs.get("query")))  # the attention's input
        with torch.no_grad():  # the scores pick indices only (in training, their N x N softmax stayed in the graph)
            q, k, scale = (_qk_timm if self.tower.kind == "timm" else _qk_open_clip)(block, x)
            scores = reduce_attention(q, k, float(scale), sig, self.tower.has_cls)
        self.call.scores[name] = scores[:, self.tower.prefix:]
        return None

    def _scores(self, x) -> dict[str, torch.Tensor]:
        """This forward's signals. Under backward (a checkpointed pruning block rerun alone) the earlier
        blocks' scores are those its forward recorded for the same input, not the last forward's."""
        if not self.early:
            return dict(self.call.scores)
        key = (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.device)
        if torch._C._current_graph_task_id() != -1:  # inside backward: a recomputation
            if key not in self.replays:
                raise RuntimeError(
                    f"{self.method_name}: gradient checkpointing reran block {self.layer} for a forward whose "
                    f"earlier-block scores ({', '.join(sorted(self.early))}) are gone (more than {REPLAYS} "
                    "forwards before one backward, or a forward under no_grad in eval mode); run backward sooner, "
                    f"or take the signals from block {self.layer} itself")
            return {**self.call.scores, **self.replays[key]}
        if self.model.training or torch.is_grad_enabled():  # a backward may rerun this block
            self.replays[key] = {k: self.call.scores[k] for k in self.early}
            self.replays.move_to_end(key)
            while len(self.replays) > REPLAYS:
                self.replays.popitem(last=False)
        return dict(self.call.scores)

    def _drop(self, module, args, kwargs, output):
        # open_clip's checkpointing passes the mask positionally: bind the call only when it has such arguments
        positional = len(args) > 1 and call_arguments(module.forward, args, kwargs).get("attn_mask") is not None
        if kwargs.get("attn_mask") is not None or positional:
            raise ValueError("patch_vit: an attention mask is not supported (it covers the full sequence; the blocks "
                             "after the pruning see the kept tokens only); unpatch, or call without attn_mask")
        if kwargs.get("is_causal"):
            raise ValueError("patch_vit: causal attention (is_causal=True) is not supported (the attention signals "
                             "are bidirectional); unpatch, or call without is_causal")
        x = self._tokens(output)
        p = self.tower.prefix
        patches = x[:, p:]
        b, n, _ = patches.shape
        h, w = self.tower.grid
        if n != h * w:
            hint = (" (patch dropout is on in train mode: it drops patches before the blocks; use eval mode or "
                    "set it to 0)") if self.tower.patch_dropout() > 0 else ""
            raise ValueError(f"block {self.layer} output has {n} patch tokens, the {h}x{w} grid needs {h * w}{hint}")
        keep = self.method.budget(n, (1, h, w))
        scores = self._scores(args[0] if args else kwargs.get("x", kwargs.get("q_x")))  # (the block's input)
        stats = Stats(method=self.method_name, visual_before=[n] * b, visual_after=[n] * b)
        if keep >= n:
            self.last_stats = stats
            return None
        t0 = mark(x)
        images = [ImageTokens(patches[i], (1, h, w), keep, {k: v[i] for k, v in scores.items()}) for i in range(b)]
        what = f"{self.method_name}.select"
        # one launch for the batch where the method has a batched form, one host sync for its checks
        sels = checked_batch(self.method.select_batch(images), b, n, keep, patches.shape[-1], what)
        counts = {s.indices.numel() for s in sels}
        if len(counts) != 1:
            raise RuntimeError(f"{self.method_name} kept different token counts per image: {sorted(counts)}")
        idx = torch.stack([s.indices for s in sels]).to(x.device)
        if all(s.tokens is None for s in sels):
            kept = patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))
        else:
            kept = torch.stack([patches[i, idx[i]] if s.tokens is None else s.tokens.to(x.dtype)
                                for i, s in enumerate(sels)])
        out = torch.cat([x[:, :p], kept], 1)
        stats.add_selection(t0, mark(x))
        stats.visual_after = [idx.shape[1]] * b
        self.last_stats = stats  # only a finished forward's figures (one that raised keeps the last ones)
        return out if self.tower.batch_first else out.transpose(0, 1)


def _resolve(sig, n: int, name: str = "") -> int:
    """A VisionSignal's layer over blocks 0..n-1 (n - 1 = the pruning block)."""
    layer = sig.layer
    if layer == "feature":
        return n - 1
    if layer == "object":
        return (n - 1) // 2  # the middle block (round(n / 2) - 1 gave the lower one for n = 5, 9, ...)
    if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
        raise sig.layer_error(name, n, "blocks up to the pruning layer")
    return layer % n


def patch_vit(model, method: str, *, layer: int | None = None, **options):
    """Prune patch tokens of `model` (timm VisionTransformer, open_clip visual tower or CLIP model) after
    block `layer` (0-based; default: the middle block, n_blocks // 2 - 1) with strategy `method`.

    Options: exactly one of `keep` (patch tokens kept per image) or `ratio`, plus the method's own.
    Returns the same model (of a PEFT model, patches the one it wraps); `vtprune.unpatch(model)` removes the
    hooks, `vtprune.stats(model)` reports the last forward. Patching again replaces the previous
    configuration."""
    if method in LLM_ONLY:
        raise ValueError(f"{method} has no ViT form: {LLM_ONLY[method]}")
    options = dict(options)
    if "video_budget" in options:
        raise TypeError("patch_vit: video_budget is for VLMs' videos; a ViT prunes each image on its own")
    if "keep_positions" in options:
        raise TypeError("patch_vit: keep_positions is for VLMs' language models (RoPE positions); a ViT's kept "
                        "tokens keep the position embeddings they were given")
    vlm_only = {"keep_positions", "video_budget"}
    if method == "todre":
        if options.get("stage2", False):
            raise ValueError("todre's stage 2 acts inside a language model; patch_vit runs stage 1 (stage2=False)")
        if stage2 := sorted({"tau", "stage2_layer"} & set(options)):
            raise TypeError(f"patch_vit: {', '.join(stage2)}: todre's stage-2 options (inside a language model); "
                            "a ViT runs stage 1")
        if "stage1" in options:
            raise TypeError("patch_vit: stage1: a ViT runs todre's stage 1 always (turning it off leaves stage 2 "
                            "alone, which acts inside a language model)")
        options["stage2"] = False
        vlm_only |= {"stage1", "stage2", "tau", "stage2_layer"}
    fields = {f.name for f in dataclasses.fields(get_method(method).Config)} - vlm_only
    if unknown := sorted(set(options) - fields - ({"stage2"} if method == "todre" else set())):
        raise TypeError(f"unknown option(s) {', '.join(map(repr, unknown))} for method {method!r} in a ViT; "
                        f"allowed: {', '.join(sorted(fields))}")
    built = build_method(method, options)
    if built.stage == "llm" or built.drop_layers(1000):
        raise ValueError(f"{method} acts inside a language model's decoder; it has no ViT form")
    wrapper, model = model, _base(model)  # (a PEFT model: the one it wraps)
    t = tower(model)
    n_blocks = len(t.blocks)
    if layer is None:
        layer = max(0, n_blocks // 2 - 1)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n_blocks - 1:
        raise ValueError(f"layer must be an int in [0, {n_blocks - 1}) (a block must follow it), got {layer!r}")
    state = VitState(model, built, method, options, layer, t)
    state.check()  # refusals before the previous configuration is touched
    previous = _state(model)  # (patched before as CLIP, as CLIP.visual or as its timm trunk)
    if previous is not None:
        previous.remove()
    try:
        state.install()
    except BaseException:
        state.remove()
        if previous is not None:  # leave the model as it was before this call
            previous.install()
        raise
    return wrapper

