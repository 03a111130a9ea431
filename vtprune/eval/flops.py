"""Analytic FLOPs per stage and KV-cache bytes, in one documented convention (docs/flops.md).

True FLOPs (2 per multiply-add) of the matrix products; norms, RoPE, softmax, activations and residual
adds (all O(n d)) are left out. Attention's quadratic term is counted dense (n^2, as FlopCounterMode
and the kernels compute it); the causal-exact figure, n(n+1)/2 score pairs, is reported beside it (at a
sliding-window layer, of window W: the pairs within it, sum over i of min(i + 1, W), as is a decode step's
min(c + 1, W) keys, and its KV cache keeps W - 1 positions, as transformers' dynamic cache does).
Token counts come from the model's real inputs and, under pruning, from the patched forward itself
(`vtprune.stats(model).layer_tokens`), so in-LLM strategies are counted per layer.

  decoder layer, n tokens:    2 n d (2 d_q + 2 d_kv) + 6 n d m + 4 n^2 d_q     (gated MLP: 3 matrices)
  decode step, KV length c:   2 d (2 d_q + 2 d_kv) + 6 d m + 4 (c + 1) d_q      per layer, + 2 d V LM head
  FastV-style (papers):       4 n d^2 + 2 n^2 d + 2 n d m   multiply-adds, 2-matrix MLP, no GQA
  mixture-of-experts layer:   the MLP term is 2 n d E (router) + k 6 n d m_e   (E experts, k per token,
                              m_e = their width: the experts each token runs, not all), + 6 n d m_s + 2 n d
                              with a gated shared expert of width m_s; FastV-style: m = k m_e (+ m_s)
  gated attention (Qwen3.5):  + 2 n d d_q (the q projection also makes each head's output gate)
  linear-attention layer      2 n d (2 d_k + 2 d_v + 2 h) + 2 n d_v d + 2 n (2 d_k + d_v) K + 6 n h d_hk d_hv
  (Qwen3.5 Gated DeltaNet):   + MLP: projections q k v, z, a, b and out; the causal depthwise convolution (kernel
                              K); the delta rule in its recurrent form (h value heads, state d_hk x d_hv:
                              read, update, query). No n^2 term; decode costs the same per token; its state
                              does not grow, and is not in the KV bytes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass(frozen=True)
class TextDims:
    d: int  # hidden size
    d_q: int  # query heads x head dim
    d_kv: int  # key/value heads x head dim
    m: int  # MLP intermediate size (gated: 3 matrices)
    layers: int
    vocab: int
    # mixture of experts (Qwen3-VL-MoE): `sparse` holds the decoder layers whose MLP is `experts` gated MLPs of
    # width `m_expert` behind a router, `top_k` of them run per token; the other layers' MLP is dense (`m`)
    experts: int = 0
    top_k: int = 0
    m_expert: int = 0
    sparse: frozenset = frozenset()
    m_shared: int = 0  # a sparse layer's shared expert (Qwen3.5-MoE: every token, its output gated by a d -> 1 linear)
    gate: bool = False  # the attention's q projection also makes an output gate per head (Qwen3.5)
    # hybrid (Qwen3.5): `linear` holds the linear-attention (Gated DeltaNet) layers: `lin_heads` value heads of
    # width `lin_dv`, keys `lin_dk` wide (`lin_k` = all key heads' width, `lin_v` = all value heads'), conv kernel
    linear: frozenset = frozenset()
    lin_k: int = 0
    lin_v: int = 0
    lin_heads: int = 0
    lin_dk: int = 0
    lin_dv: int = 0
    conv: int = 0
    # sliding-window attention (Mistral-style `sliding_window`, or `layer_types`): `sliding` holds those layers, each
    # token attending the `window` positions up to itself (dense attention still counts n^2: what SDPA computes)
    window: int = 0
    sliding: frozenset = frozenset()

    @classmethod
    def from_config(cls, cfg) -> "TextDims":
        tc = getattr(cfg, "text_config", cfg)
        hq = tc.num_attention_heads
        hd = getattr(tc, "head_dim", None) or tc.hidden_size // hq
        hkv = getattr(tc, "num_key_value_heads", None) or hq
        moe = {}
        if getattr(tc, "num_experts", 0) and getattr(tc, "moe_intermediate_size", None):
            step, dense = getattr(tc, "decoder_sparse_step", 1) or 1, set(getattr(tc, "mlp_only_layers", None) or ())
            moe = dict(experts=tc.num_experts, top_k=tc.num_experts_per_tok, m_expert=tc.moe_intermediate_size,
                       m_shared=getattr(tc, "shared_expert_intermediate_size", 0) or 0,
                       sparse=frozenset(i for i in range(tc.num_hidden_layers) if i not in dense and (i + 1) % step == 0))
        types = list(getattr(tc, "layer_types", None) or [])
        if unknown := sorted(set(types) - {"full_attention", "sliding_attention", "linear_attention"}):
            raise ValueError(f"FLOPs of {unknown} decoder layers are not modelled")
        if "linear_attention" in types:
            if getattr(tc, "model_type", "") not in ("qwen3_5_text", "qwen3_5_moe_text"):
                raise ValueError(f"FLOPs of {tc.model_type}'s linear-attention layers are not modelled")
            moe.update(linear=frozenset(i for i, kind in enumerate(types) if kind == "linear_attention"),
                       lin_k=tc.linear_num_key_heads * tc.linear_key_head_dim,
                       lin_v=tc.linear_num_value_heads * tc.linear_value_head_dim, lin_heads=tc.linear_num_value_heads,
                       lin_dk=tc.linear_key_head_dim, lin_dv=tc.linear_value_head_dim, conv=tc.linear_conv_kernel_dim)
        from ..hooks.runtime import layer_kind  # (the runtime's rule: layer_types, else a model-wide window)

        window = getattr(tc, "sliding_window", None)
        sliding = frozenset(i for i in range(tc.num_hidden_layers) if layer_kind(tc, i) == "sliding_attention")
        if sliding and window:
            moe.update(window=int(window), sliding=sliding)
        gate = getattr(tc, "model_type", "").startswith("qwen3_5")  # Qwen3.5's attention: q and an output gate
        m = getattr(tc, "intermediate_size", 0) or 0  # (Qwen3.5-MoE has no dense MLP)
        return cls(tc.hidden_size, hq * hd, hkv * hd, m, tc.num_hidden_layers, tc.vocab_size, gate=gate, **moe)

    def projections(self, layer: int) -> int:
        """FLOPs per token of decoder layer `layer`'s token mixer, all but attention's score term."""
        if layer in self.linear:
            conv_dim = 2 * self.lin_k + self.lin_v
            return (2 * self.d * (conv_dim + self.lin_v + 2 * self.lin_heads) + 2 * self.lin_v * self.d
                    + 2 * conv_dim * self.conv + 6 * self.lin_heads * self.lin_dk * self.lin_dv)
        return 2 * self.d * ((3 if self.gate else 2) * self.d_q + 2 * self.d_kv)

    def mlp(self, layer: int) -> int:
        """FLOPs of decoder layer `layer`'s MLP per token: 6 d m dense; router + the top-k experts if sparse."""
        if layer in self.sparse:
            shared = 6 * self.d * self.m_shared + 2 * self.d if self.m_shared else 0
            return 2 * self.d * self.experts + self.top_k * 6 * self.d * self.m_expert + shared
        return 6 * self.d * self.m

    def mlp_width(self, layer: int) -> int:
        """The MLP width a token runs through at `layer` (FastV-style counts): m, or k m_e if sparse."""
        return self.top_k * self.m_expert + self.m_shared if layer in self.sparse else self.m


def causal_pairs(n: int, window: int = 0) -> int:
    """(query, key) pairs causal attention over n tokens scores: n(n+1)/2, or with a sliding window of W
    positions (each token and the W - 1 before it) sum over i of min(i + 1, W)."""
    if not window or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def layer_prefill(n: int, t: TextDims, causal: bool = False, layer: int = 0) -> int:
    """FLOPs of decoder layer `layer` over n tokens (dense attention unless causal=True; causal-exact pairs are
    within the window at a sliding-window layer)."""
    if layer in t.linear:
        attn = 0
    elif causal:
        attn = 4 * causal_pairs(n, t.window if layer in t.sliding else 0) * t.d_q
    else:
        attn = 4 * n * n * t.d_q
    return n * t.projections(layer) + n * t.mlp(layer) + attn


def layer_decode(c: int, t: TextDims, layer: int = 0) -> int:
    """FLOPs of decoder layer `layer` for one new token over a KV cache of c tokens (+ itself; at a
    sliding-window layer the last `window` of them)."""
    keys = min(c + 1, t.window) if layer in t.sliding else c + 1
    return t.projections(layer) + t.mlp(layer) + (0 if layer in t.linear else 4 * keys * t.d_q)


def kv_positions(n: int, t: TextDims, layer: int) -> int:
    """Positions decoder layer `layer`'s KV cache holds after a prefill of n tokens: all of them, or at a
    sliding-window layer the window - 1 the next token needs (what transformers' dynamic cache keeps)."""
    return min(n, t.window - 1) if layer in t.sliding else n


def fastv_layer_macs(n: int, t: TextDims, layer: int = 0) -> int:
    """FastV's per-layer count (multiply-adds, MHA, 2-matrix MLP): 4 n d^2 + 2 n^2 d + 2 n d m; a linear-attention
    layer's mixer as multiply-adds (half our FLOPs) in place of the first two terms."""
    mixer = n * t.projections(layer) // 2 if layer in t.linear else 4 * n * t.d ** 2 + 2 * n * n * t.d
    return mixer + 2 * n * t.d * t.mlp_width(layer)


def _vit_layer(n: int, d: int, m: int, mlp_mats: int, attn_n2: int | None = None) -> int:
    """One ViT layer: q, k, v, o projections, attention over `attn_n2` score pairs (default n^2),
    an MLP with `mlp_mats` matrices of d x m."""
    n2 = n * n if attn_n2 is None else attn_n2
    return 8 * n * d * d + 4 * n2 * d + 2 * mlp_mats * n * d * m


def vision_flops(model, inputs: dict, arch=None) -> dict:
    """Vision encoder and projector FLOPs for the images and videos in `inputs` (LLaVA-1.5/NeXT/NeXT-Video/OneVision with
    CLIP or SigLIP, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE and Qwen3.5), for the transformers config `arch` (default: the
    model's)."""
    cfg = arch or model.config
    vc = cfg.vision_config
    kind = type(model).__name__
    text_d = TextDims.from_config(cfg).d
    if kind.startswith("Llava"):
        images = 0
        if inputs.get("pixel_values") is not None:
            images = inputs["pixel_values"].shape[0]
            if inputs["pixel_values"].dim() == 5:  # anyres (NeXT, OneVision): the base tile + the crops each image uses
                from transformers.image_processing_utils import select_best_resolution

                images = 0
                for h, w in inputs["image_sizes"].tolist():
                    bh, bw = select_best_resolution([h, w], cfg.image_grid_pinpoints)
                    images += 1 + (bh // vc.image_size) * (bw // vc.image_size)
        videos = inputs.get("pixel_values_videos")
        frames = 0 if videos is None else videos.shape[0] * videos.shape[1]  # every frame through the tower
        grid = vc.image_size // vc.patch_size
        d, m = vc.hidden_size, vc.intermediate_size
        siglip = getattr(vc, "model_type", "") == "siglip_vision_model"
        n = grid * grid + (0 if siglip else 1)  # CLIP has a CLS token, SigLIP none
        embed = 2 * grid * grid * 3 * vc.patch_size ** 2 * d
        enc = embed + vc.num_hidden_layers * _vit_layer(n, d, m, 2)
        if siglip and getattr(vc, "vision_use_head", False):  # attention pooling: one probe query, then an MLP
            enc += 4 * n * d * d + 4 * d * d + 4 * n * d + 4 * d * m
        strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        feats = n - 1 if strategy == "default" else n
        layers = getattr(cfg, "vision_feature_layer", -2)
        d_in = d * (1 if isinstance(layers, int) else len(layers))  # several feature layers: their features concatenated
        per_feature = 2 * (d_in * text_d + text_d * text_d)  # the projector's two linears
        proj = feats * per_feature
        frame_enc, frame_proj = enc, proj  # OneVision: a frame's projected features are pooled after the projector
        if kind.startswith("LlavaNextVideo"):  # its vision_resampler pools a frame's patches before the projector
            pooled = (grid // cfg.spatial_pool_stride) ** 2
            frame_proj = pooled * per_feature
            if cfg.spatial_pool_mode == "conv":  # a learned stride-s convolution (average and max pools: no FLOPs)
                frame_enc += 2 * pooled * cfg.spatial_pool_stride ** 2 * d * d
        return {"vision_encoder": images * enc + frames * frame_enc, "projector": images * proj + frames * frame_proj}
    if kind.startswith(("Qwen2VL", "Qwen2_5_VL", "Qwen3VL", "Qwen3_5")):  # Qwen3.5: Qwen3-VL's tower, no deepstack
        version = "2.5" if kind.startswith("Qwen2_5_VL") else "3" if kind.startswith(("Qwen3VL", "Qwen3_5")) else "2"
        enc = proj = 0
        for key in ("image_grid_thw", "video_grid_thw"):
            grids = inputs.get(key)
            if grids is None:
                continue
            for t_, h, w in grids.tolist():
                e, p = _qwen_vision(vc, version, int(t_), int(h), int(w), text_d)
                enc, proj = enc + e, proj + p
        return {"vision_encoder": enc, "projector": proj}
    raise ValueError(f"FLOPs of {kind}'s vision tower are not modelled")


def _qwen_vision(vc, version: str, t: int, h: int, w: int, text_d: int) -> tuple[int, int]:
    """Qwen-VL ViT (attention within each frame; Qwen2.5 windows) and its merger(s). Qwen3-VL's
    deepstack mergers count as projector work; its position-embedding interpolation is elementwise."""
    n = t * h * w
    ms = vc.spatial_merge_size
    d = vc.embed_dim if version == "2" else vc.hidden_size
    embed = 2 * n * (vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2) * d
    mergers = 1
    if version == "2.5":
        m, mats = vc.intermediate_size, 3
        full = set(vc.fullatt_block_indexes)
        unit = vc.window_size // ms // vc.patch_size  # merged units per window side
        lh, lw = h // ms, w // ms
        windowed = t * sum((min(unit, lh - i) * min(unit, lw - j) * ms * ms) ** 2
                           for i in range(0, lh, unit) for j in range(0, lw, unit))
        layers = sum(_vit_layer(n, d, m, mats, n * n // t if i in full else windowed) for i in range(vc.depth))
        out = vc.out_hidden_size
    elif version == "3":
        layers = vc.depth * _vit_layer(n, d, vc.intermediate_size, 2, n * n // t if t else 0)
        out = vc.out_hidden_size
        mergers += len(getattr(vc, "deepstack_visual_indexes", None) or ())
    else:
        m, mats = int(d * vc.mlp_ratio), 2
        layers = vc.depth * _vit_layer(n, d, m, mats, n * n // t if t else 0)  # frames attend within their image
        out = vc.hidden_size
    merged, hidden = n // (ms * ms), d * ms * ms
    proj = mergers * 2 * merged * (hidden * hidden + hidden * out)
    assert out == text_d, "Qwen merger output must be the LLM width"
    return embed + layers, proj


@dataclass
class FlopsReport:
    """One prefill (per batch: samples summed) plus the first decode step, in FLOPs; KV in bytes."""

    vision_encoder: int
    projector: int
    selection: int  # the strategy's own arithmetic where it is modelled (greedy Gram); 0 otherwise
    llm_prefill: int  # decoder layers, dense attention
    llm_prefill_causal: int  # the same with causal-exact attention
    llm_prefill_per_layer: list[int]
    lm_head: int  # last prefill position only (generate computes no other)
    decode_per_token: int  # first generated token, LM head included
    kv_bytes: int  # KV cache after the prefill (per-layer lengths)
    fastv_macs: int  # the FastV papers' prefill count, for comparison
    tokens_per_layer: list[list[int]]  # [layer][sample] real tokens entering each decoder layer
    visual_tokens: list[int] = field(default_factory=list)  # per sample, left at the last decoder layer

    @property
    def total_prefill(self) -> int:
        return self.vision_encoder + self.projector + self.selection + self.llm_prefill + self.lm_head

    def to_dict(self) -> dict:
        return {**asdict(self), "total_prefill": self.total_prefill}


def visual_left(stats, placeholders: list[int]) -> list[int]:
    """Per sample, the visual placeholders a pruned prefill left at the last decoder layer: the strategy's count
    (`stats.visual_after`) and the placeholders in no image or frame, always kept (OneVision's newline closing a
    video), so that the count compares with the unpatched one (`placeholders`: visual_token_counts)."""
    return [a + p - b for a, p, b in zip(stats.visual_after, placeholders, stats.visual_before)]


def visual_token_counts(config, inputs: dict) -> list[int]:
    """Per sample, the image/video placeholder tokens among the real (unpadded) input tokens."""
    ids = inputs["input_ids"]
    visual_ids = {getattr(config, k, None) for k in ("image_token_id", "video_token_id")} - {None}
    visual = torch.isin(ids, torch.tensor(sorted(visual_ids), device=ids.device))
    if inputs.get("attention_mask") is not None:
        visual &= inputs["attention_mask"].bool()
    return visual.sum(1).tolist()


def _selection_flops(method, images: list[tuple[int, int]], per_layer: list[list[int]], t: TextDims) -> int:
    """The strategy's own products where they are modelled: greedy diversity (DivPrune, ToDRE) builds
    an N x N Gram matrix of d-wide rows per pruned image or video frame, or clip (2 N^2 d; `images` holds each
    one's (N, budget)); FastV scores the n tokens at its layer from every real query row (2 n^2 d_q for
    q k^T, 2 n^2 for the row average), and so does ToDRE's stage 2 at its layer; TransPrune, at each
    drop layer p, projects the n tokens leaving it with layer p+1's q and k (2 n d (d_q + d_kv)) and
    scores them the same way (these two read the question's rows only: every row is what the CPU
    reference computes up to its 256-row block, an upper bound beyond). The vision-side scoring of
    HiPrune, VFlowOpt and ToDRE (attention recomputed in a ViT layer, about 4 N^2 d_v each; per layer
    ~0.02 % of a LLaVA-1.5/NeXT-7B prefill, ~0.2 % of Qwen2-VL-7B's at 672 px) is not modelled (0)."""
    name = getattr(method, "name", None)  # (`method`: the built strategy, or None)
    gram = sum(2 * n * n * t.d for n, k in images if k < n)  # one N x N Gram matrix of d-wide rows per pruned image

    def scores(layers) -> int:  # the n tokens at each of `layers` scored from every row: q k^T, then row sums
        return sum(2 * n * n * t.d_q + 2 * n * n for p in layers for n in per_layer[p])

    if name == "divprune":
        return gram
    if name == "todre":  # the greedy Gram, then stage 2 scoring at its layer (where stage 1 pruned, or alone)
        return gram + scores(method.drop_layers(len(per_layer))) if gram or method.llm_phase_always and images else 0
    if name == "transprune" and per_layer[0] != per_layer[-1]:  # + the next layer's q, k projections
        drops = method.drop_layers(len(per_layer))
        q = 2 * t.d_q if t.gate else t.d_q  # (a gated q projection also makes the output gate)
        return sum(2 * n * t.d * (q + t.d_kv) for p in drops for n in per_layer[p]) + scores(drops)
    if name == "fastv":
        layer = method.config.layer - 1
        if 0 <= layer < len(per_layer) and per_layer[layer] != per_layer[-1]:
            return scores([layer])
    return 0


@torch.no_grad()
def count(model, inputs: dict, method: str | None = None, *, arch=None, kv_dtype=None, **options) -> FlopsReport:
    """FLOPs of one prefill of `inputs` (batch) through `model`, pruned by `method` with `options`
    (patch()'s keyword arguments: keep= or ratio=, the method's options, config= a saved preset)
    when given (the model is patched for the call and unpatched after). Runs the forward once to
    learn how many tokens enter each decoder layer. `arch`: a transformers config to count for
    instead of the model's own (the model is then a narrow stand-in with the same geometry:
    configs.surrogate); `kv_dtype`: the KV cache's element type (default: the model's parameters')."""
    import vtprune

    from ..patching import _state

    st = built = None
    if method is not None:
        with vtprune.pruned(model, method, **options):
            model(**inputs, logits_to_keep=1)
            st, built = vtprune.stats(model), _state(model).method
    return report(model, inputs, st, built, arch=arch, kv_dtype=kv_dtype)


def report(model, inputs: dict, stats=None, method: str | None = None, options: dict | None = None, *,
           arch=None, kv_dtype=None) -> FlopsReport:
    """The FlopsReport of a prefill of `inputs` that already ran: `stats` is `vtprune.stats(model)` after
    it (its per-layer token counts), None for an unpatched forward; `method` and `options` as given to
    patch() (or `method` the built strategy). No forward is run. `arch`, `kv_dtype`: as for count."""
    if isinstance(method, str):
        from ..methods.registry import build_method
        from ..patching import _resolve

        options = dict(options or {})
        method = build_method(*_resolve(method, options.pop("config", None), options))
    config = arch or model.config
    t = TextDims.from_config(config)
    mask = inputs.get("attention_mask")
    ids = inputs["input_ids"]
    real = (mask.bool().sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])).tolist()
    visual_before = visual_token_counts(config, inputs)
    per_layer = [list(real) for _ in range(t.layers)]
    visual_after = visual_before
    if stats is not None and stats.layer_tokens:
        per_layer = [list(x) for x in stats.layer_tokens]
        visual_after = visual_left(stats, visual_before)
    layer_flops = [sum(layer_prefill(n, t, layer=i) for n in ns) for i, ns in enumerate(per_layer)]
    kv_dtype_bytes = (kv_dtype or next(model.parameters()).dtype).itemsize
    kv = sum(2 * kv_positions(n, t, i) * t.d_kv * kv_dtype_bytes for i, ns in enumerate(per_layer) if i not in t.linear
             for n in ns)
    vis = vision_flops(model, inputs, config)
    if stats is not None and stats.images:
        images = [(n, k) for _, n, k in stats.images]
    else:  # no record of the images: each sample's visual tokens as one image, pruned if fewer entered the LLM
        images = [(v, v - (r - f)) for v, r, f in zip(visual_before, real, per_layer[0])]
    return FlopsReport(
        vision_encoder=vis["vision_encoder"], projector=vis["projector"],
        selection=_selection_flops(method, images, per_layer, t),
        llm_prefill=sum(layer_flops),
        llm_prefill_causal=sum(layer_prefill(n, t, causal=True, layer=i) for i, ns in enumerate(per_layer) for n in ns),
        llm_prefill_per_layer=layer_flops,
        lm_head=len(real) * 2 * t.d * t.vocab,
        decode_per_token=(sum(layer_decode(n, t, i) for i, ns in enumerate(per_layer) for n in ns)
                          + len(real) * 2 * t.d * t.vocab),
        kv_bytes=kv,
        fastv_macs=sum(fastv_layer_macs(n, t, i) for i, ns in enumerate(per_layer) for n in ns),
        tokens_per_layer=per_layer,
        visual_tokens=list(visual_after),
    )


ROWS = (("vision encoder", "vision_encoder"), ("projector", "projector"), ("selection", "selection"),
        ("LLM prefill (dense attention)", "llm_prefill"), ("LLM prefill (causal-exact)", "llm_prefill_causal"),
        ("LM head (last position)", "lm_head"), ("total prefill", "total_prefill"),
        ("decode, per new token", "decode_per_token"), ("FastV-style prefill (MACs)", "fastv_macs"))


def _g(x: int) -> str:
    return f"{x / 1e12:.4g} T" if x >= 1e12 else f"{x / 1e9:.4g} G" if x >= 1e9 else f"{x / 1e6:.4g} M"


def format_table(base: FlopsReport, pruned: FlopsReport, title: str = "") -> str:
    """Unpatched vs pruned, per stage (FLOPs; KV in MiB), with the pruned/unpatched ratio."""
    a, b = base.to_dict(), pruned.to_dict()
    rows = [(label, _g(a[key]), _g(b[key]), f"{b[key] / a[key]:.3f}" if a[key] else "-") for label, key in ROWS]
    rows.append(("KV cache (MiB)", f"{base.kv_bytes / 2**20:.4g}", f"{pruned.kv_bytes / 2**20:.4g}",
                 f"{pruned.kv_bytes / base.kv_bytes:.3f}" if base.kv_bytes else "-"))
    if base.visual_tokens and pruned.visual_tokens:
        v0, v1 = base.visual_tokens[0], pruned.visual_tokens[0]
        rows.append(("visual tokens, last layer (sample 0)", str(v0), str(v1), f"{v1 / v0:.3f}" if v0 else "-"))
    rows.append(("tokens per layer (sample 0)", _runs([ns[0] for ns in base.tokens_per_layer]),
                 _runs([ns[0] for ns in pruned.tokens_per_layer]), ""))
    head = ("stage", "unpatched", "pruned", "ratio")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    lines = [title] if title else []
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + rows]
    return "\n".join(lines)


def _runs(xs: list[int]) -> str:
    """[5, 5, 5, 3, 3] -> '5 x3, 3 x2'."""
    out, i = [], 0
    while i < len(xs):
        j = i
        while j < len(xs) and xs[j] == xs[i]:
            j += 1
        out.append(f"{xs[i]} x{j - i}")
        i = j
    return ", ".join(out)

