"""The hooks `patch` installs, and the one state object it attaches to the model (`model._vtprune`).

Flow of one pruned `generate()`:
- a pre-hook on the multimodal `*Model` records the token ids and image grids of the call;
- a pre-hook on the language model rewrites the prefill (pre-LLM strategies: embeddings, 2-D mask and
  position ids, compacted and right-aligned), or, on decode steps, splices the pruned prefill mask in
  front of the new columns and shifts positions;
- for `llm`-stage strategies, a forward hook on decoder layer p drops visual hidden states, and
  pre-hooks on the later layers substitute the mask and rotary embeddings sized for them;
- a forward hook on the language model attaches the pruning record (`Run`) to the KV cache object,
  which `generate()` hands back on every decode step;
- a forward with images on a cache that holds tokens already (a chat's next turn, a prompt after a cached
  prefix) has them pruned as a prefill's and the record extended through it (`_continue`).
"""
from __future__ import annotations

import copy
import inspect
import operator
import sys
import time
import uuid
import weakref
from dataclasses import dataclass, field, fields, is_dataclass, replace
from functools import lru_cache, partial

import torch

from ..kernels import attention_scores
from ..methods.base import ImageTokens, LayerTokens, Method, PruneConfig, Selection
from . import anyres
from .checks import check_indices_all, checked, checked_all, checked_batch
from .base import LeafHook, PerThread, SignalStore, call_arguments, wrap_method
from .sequence import compact_index, compact_text_positions, dropped_before, row_slots, take

_CACHE_ATTR = "_vtprune_run"


@dataclass
class Unit:
    """One image (or video frame) in the current forward: its sequence slots in one sample."""

    sample: int
    slots: torch.Tensor  # LongTensor[N], ascending sequence positions
    grid: tuple[int, int, int] | None
    block: int  # id of the contiguous visual block (image or video) it belongs to
    layout: object = None  # anyres.Layout of a multi-grid image (LLaVA-NeXT / OneVision), else None
    video: int | None = -1  # a video frame: its video's id (unique within its sample); -1: an image; None: unknown


@dataclass
class Stats:
    """Figures of the last pruning forward (see `vtprune.stats`)."""

    method: str = ""
    visual_before: list[int] = field(default_factory=list)  # visual tokens per sample entering the model
    visual_after: list[int] = field(default_factory=list)  # visual tokens per sample left at the last layer
    selection_ms: float = 0.0  # wall time in the strategy's selection code (vision-encoder scores: the encoder's run)
    selection_in_llm_ms: float = 0.0  # the part of selection_ms spent inside the decoder (drop layers: fastv, ToDRE's stage 2)
    layout: torch.Tensor | None = None  # [B, L_out]: input slot of each output position, -1 = added padding
    layer_tokens: list[list[int]] = field(default_factory=list)  # [layer][sample]: real tokens entering each decoder layer
    images: list[tuple[int, int, int]] = field(default_factory=list)  # (sample, tokens, budget) per image / video frame (clip)
    # selection spans timed by CUDA events, not yet read (`settle`): (start, stop, inside the decoder)
    pending: list = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def kept_fraction(self) -> float:
        before = sum(self.visual_before)
        return sum(self.visual_after) / before if before else 1.0

    def add_selection(self, start, stop, in_llm: bool = False):
        """Count the selection span between two `mark`s: perf_counter values at once; CUDA events when read."""
        if isinstance(start, float):
            self._add_ms((stop - start) * 1e3, in_llm)
        else:
            self.pending.append((start, stop, in_llm))

    def settle(self) -> Stats:
        """Read the CUDA events of the selection spans into selection_ms (waits on each span's stop event, not
        on the whole device)."""
        for start, stop, in_llm in self.pending:
            stop.synchronize()
            self._add_ms(start.elapsed_time(stop), in_llm)
        self.pending = []
        return self

    def _add_ms(self, ms: float, in_llm: bool):
        self.selection_ms += ms
        if in_llm:
            self.selection_in_llm_ms += ms


@dataclass
class Group:
    """Decoder layers from `start_layer` on see this layout (until the next group starts)."""

    start_layer: int
    mask: torch.Tensor  # [B, Lg] 2-D attention mask of the prefill in this layout
    index0: torch.Tensor | None = None  # [B, Lg] slots into the language-model input layout


@dataclass
class Run:
    """The pruning record of one prefill; kept on the KV cache for the decode steps that follow."""

    orig_len: int  # sequence length the caller sees (generate's mask grows from here)
    groups: list[Group]
    visual: torch.Tensor  # [B, Lcur] visual slots in the current layout
    layout: torch.Tensor  # [B, Lcur] caller-side slot of each current slot (-1 = padding we added)
    keep_total: torch.Tensor  # [B] visual tokens an llm-stage method keeps per sample
    pos_shift: torch.Tensor  # [B] added to decode positions
    shifted: bool = False  # any pos_shift non-zero (read once at the prefill: no host sync per decode step)
    unit: torch.Tensor | None = None  # [B, Lcur] the image/frame (index into images) of each visual slot, else -1
    structural: torch.Tensor | None = None  # [B, Lcur] placeholders in no image (a video's closing newline)
    images: tuple = ()  # (sample, tokens, budget) per image / video frame (clip) of this forward (= Stats.images)
    before: torch.Tensor | None = None  # [B] visual tokens per sample on entering the model
    orig_mask: torch.Tensor | None = None  # [B, orig_len] the caller's 2-D mask of the prefill
    default_positions: bool = False  # the prefill had no position_ids (the model's default, arange over slots)
    # positions decoded onto the cache since this prefill: a static cache's length is a device tensor, whose
    # read is a host sync per decode step; its reset() and crop() keep this (see _Follow)
    decoded: int = 0
    step: int = 0  # tokens the decode forward now running feeds (added to `decoded` when it returns)
    # per group, its mask is all ones (no padding): read once, for every group in one read, at the first decode
    # step asking
    no_pads: list | None = None
    changed: bool = False
    owner: str = ""  # PatchState.token of the configuration that pruned this prefill
    method: str = ""  # its strategy's name (for errors)
    home: object = None  # weakref to that configuration's set of caches (PatchState.caches), where ...
    cache: object = None  # ... this weakref's cache is tracked; a deep copy of the cache is tracked beside it
    state: dict = field(default_factory=dict)  # the method's per-prefill scratch (LayerTokens.state)
    # Qwen3-VL deepstack: per decoder layer i < len, [B, Lcur, D] features added at the visual slots
    # after layer i (dense over the current layout, so they are compacted with everything else)
    deepstack: list = field(default_factory=list)
    # per-forward scratch, cleared when the language model returns
    prefill: bool = True
    fed: torch.Tensor | None = None  # a forward continuing the cache with images: [B, q] mask of what it feeds
    incoming_mask: torch.Tensor | None = None
    maskless: bool = False  # a decode step of one token passed with no mask (nothing padded): see _layer_pre
    bare: bool = False  # ... where no layer after a drop needs one either (all attend in full, no group padded)
    masks: dict = field(default_factory=dict)
    pos_emb: dict = field(default_factory=dict)
    pos_ids: dict = field(default_factory=dict)  # per group, its layers' text position ids (made once, not per layer)
    captured: dict = field(default_factory=dict)

    def __deepcopy__(self, memo):
        """copy.deepcopy of the cache holding this record (as transformers' docs reuse a prompt's cache): the copy
        is tracked where the original is, so that it too refuses once its configuration is removed."""
        new = copy.copy(self)
        memo[id(self)] = new
        for f in fields(self):
            if f.name not in ("home", "cache"):
                setattr(new, f.name, copy.deepcopy(getattr(self, f.name), memo))
        cache, home = (ref() if ref is not None else None for ref in (self.cache, self.home))
        twin = memo.get(id(cache)) if cache is not None else None  # (made before its attributes are copied)
        new.home, new.cache = self.home, weakref.ref(twin) if twin is not None else None
        if twin is not None and home is not None:
            home.add(twin)
        return new

    def __getstate__(self):  # pickled: weak references do not pickle (an unpickled cache is not tracked)
        return {**self.__dict__, "home": None, "cache": None}

    def group_for(self, layer: int) -> tuple[int, Group]:
        for gi in range(len(self.groups) - 1, -1, -1):
            if self.groups[gi].start_layer <= layer:
                return gi, self.groups[gi]
        return 0, self.groups[0]

    @property
    def short(self) -> int:
        """Prompt slots the cache lacks: what pruning before the decoder removed (the unpruned prompt's length
        less group 0's). M-RoPE: the model's rope_deltas are raised by this during a decode step."""
        return self.orig_len - self.groups[0].mask.shape[1]

    def unpadded(self, group: int = 0) -> bool:
        """The pruned prompt holds no padding in `group`'s layers (one host read for every group, the first
        time)."""
        if self.no_pads is None:
            self.no_pads = torch.stack([g.mask.bool().all() for g in self.groups]).tolist()
        return self.no_pads[group]

    def end_forward(self):
        self.prefill = False
        self.incoming_mask, self.fed = None, None
        self.masks, self.pos_emb, self.pos_ids, self.captured, self.state, self.deepstack = {}, {}, {}, {}, {}, []


def mark(t: torch.Tensor):
    """A time mark for the selection spans of `Stats`, with no host-device sync (a sync per decoder layer
    that selects or observes stalled the launch queue, most at batch 1): on CUDA an event recorded on the
    current stream of t's device, read by `Stats.settle` when the figures are asked for; else perf_counter."""
    if t.is_cuda:
        e = torch.cuda.Event(enable_timing=True)
        e.record(torch.cuda.current_stream(t.device))
        return e
    return time.perf_counter()


def _keeps_everything(method: Method) -> bool:
    """ratio 1.0 under the default budget rule: no image is ever over budget, so the vision-encoder scores
    a method reads would be computed in every forward and never read (hiprune, vflowopt and todre cost
    12-28 % more per forward on the bundled tiny-llava for nothing)."""
    cfg = method.config
    return (type(method).budget is Method.budget and type(cfg).budget is PruneConfig.budget
            and cfg.keep is None and cfg.ratio == 1.0)


class _Call(PerThread):
    """A PatchState's per-call state, each thread's own: threads running one patched model at once (a web
    server's workers) each prune their own forward. They read each other's runs and scores before: outputs
    silently wrong, or shape errors."""

    def __init__(self):
        self.scratch: dict | None = None  # what the adapter read off the multimodal forward's call
        self.current: Run | None = None  # the language-model forward in progress
        self.labels = False  # the current top-level forward was given labels (a loss is asked for)
        self.encoder_outputs = None  # mm_encoder_outputs as the caller handed them to the top model
        self.prefill_outputs = None  # generate()'s own mm_encoder_outputs during its prefill (chunks get copies)
        self.rope_lent = None  # (the model's rope_deltas, what a decode forward reads instead) while it runs
        self.turn = None  # tokens generate()'s prefill feeds a pruned cache it continues, the whole conversation given
        self.last_stats: Stats | None = None  # this thread's last forward's figures
        self.stats_before: tuple = (None, None)  # (its, any thread's) before the forward in progress


class ThreadStats:
    """`last_stats`: the figures of the calling thread's last forward (`self.call`, a PerThread), or where it
    ran none, the latest of any thread's (`self.latest`: generate() run in a worker thread, as for
    streaming, read from the main one)."""

    @property
    def last_stats(self) -> Stats:
        own = self.call.last_stats
        return own if own is not None else self.latest

    @last_stats.setter
    def last_stats(self, stats: Stats):
        self.call.last_stats = self.latest = stats


class PatchState(ThreadStats):
    """Everything `patch` attaches to a model: the method, the adapter, hook handles, last stats."""

    def __init__(self, adapter, method: Method, method_name: str, options: dict):
        self.adapter = adapter
        self.method = method
        self.method_name = method_name
        self.options = options
        self.handles: list = []
        self.leaves: list[LeafHook] = []  # the hooks among handles on q/k projections and other leaf modules
        self.call = _Call()  # the forward in progress: each thread's own
        self.vision_scores = SignalStore()  # (each thread's own)
        self.latest = Stats(method=method_name)  # the last figures of any thread's forward
        self.lm = adapter.language_model()
        self.layers = self.lm.layers
        # names of the multimodal model's forward parameters, for calls that pass some positionally
        self.inner_params = list(inspect.signature(adapter.inner().forward).parameters)
        self.top_params = list(inspect.signature(adapter.model.forward).parameters)
        # the KV caches this configuration pruned a prefill into; `remove` makes the live ones refuse to be
        # continued without it (an unpatched model would continue them silently wrong), `install` takes that back.
        # The token survives a deep copy of a cache's Run (a copied cache stays continuable here).
        self.token = uuid.uuid4().hex
        self.caches: weakref.WeakSet = weakref.WeakSet()
        n_layers = len(self.layers)
        self.pre_llm = method.stage != "llm"
        self.signal_names: list[str] = []  # the vision-encoder signals the strategy reads (set by install)
        self.drop_layers, self.attn_layers, self.observe_layers = (
            _layer_list(method, method_name, name, n_layers) for name in ("drop_layers", "attention_layers",
                                                                        "observe_layers"))
        if method.stage == "llm" and not self.drop_layers:
            raise ValueError(f"{method_name}: an llm-stage strategy must name the decoder layers after which it drops "
                             f"tokens (drop_layers({n_layers}) returned none), else it prunes nothing")
        for p in self.drop_layers:
            if not 0 <= p < n_layers - 1:
                raise ValueError(f"{method_name}: cannot drop tokens after layer {p} of a {n_layers}-layer decoder")
        for p in self.attn_layers + self.observe_layers:
            if not 0 <= p < n_layers:
                raise ValueError(f"{method_name}: layer {p} does not exist in a {n_layers}-layer decoder")
        # decoder layers with attention (a hybrid model's others are linear attention: no attention map, and in
        # some transformers no position count in the cache, so the cache length is read at the first of these)
        self.attention_ids = [i for i, layer in enumerate(self.layers) if hasattr(layer, "self_attn")]
        self.kinds = [layer_kind(self.lm.config, i) for i in range(n_layers)]  # (read per layer per decode step)
        # every layer after the first drop attends in full: at a one-token decode step with nothing padded none
        # needs a mask (see _decode)
        self.full_after_drop = all(k == "full_attention" for k in self.kinds[self.drop_layers[0] + 1:]) \
            if self.drop_layers else False
        self.length_layer = self.attention_ids[0] if self.attention_ids else 0
        for p in self.attn_layers + ([p + 1 for p in self.drop_layers] if method.reads_next_attention else []):
            self._attention_module(p)

    def _attention_module(self, p: int):
        """Decoder layer p's self-attention; a ValueError for a hybrid model's linear-attention layer (Qwen3.5's
        Gated DeltaNet), which has no attention map to score tokens by."""
        attn = getattr(self.layers[p], "self_attn", None)
        if attn is None:
            mixer = type(getattr(self.layers[p], _mixer(self.layers[p]))).__name__
            raise ValueError(
                f"{self.method_name}: decoder layer {p} is a linear-attention layer ({mixer}), with no attention map to "
                f"score tokens by; this model's attention layers are {self.attention_ids}. Choose the strategy's layers among them "
                "(fastv: layer=K reads layer K-1; todre: stage2_layer=L reads layer L, or stage2=False; transprune: "
                "a schedule whose drop layers p read layer p+1)")
        return attn

    def _held(self, cache, run: Run, length: int | None = None) -> int:
        """Positions a pruned cache holds in the layout the prefill entered the decoder with (group 0), the tokens
        generated since included: read at `length_layer`, with what in-LLM drops before it removed added back.
        `length`: the cache's length (layer 0's) where the caller has read it already."""
        if compileable(cache):  # (no in-LLM drops on a static cache: one layout)
            return run.groups[0].mask.shape[1] + run.decoded
        if length is not None and self.length_layer == 0:  # (layer 0 is in group 0: no second read)
            return length
        _, group = run.group_for(self.length_layer)
        return int(cache.get_seq_length(self.length_layer)) - group.mask.shape[1] + run.groups[0].mask.shape[1]

    def __getstate__(self):  # a pickled or deep-copied model: its copy holds no caches yet (a WeakSet pickles not)
        return {**self.__dict__, "caches": None}

    def __setstate__(self, state):  # (a token of its own: another model's caches are not the copy's)
        self.__dict__.update(state, caches=weakref.WeakSet(), token=uuid.uuid4().hex)

    def _own_run(self, cache) -> Run | None:
        """The pruning record `cache` holds where this configuration made it, else None."""
        run = getattr(cache, _CACHE_ATTR, None)
        return run if run is not None and run.owner == self.token else None

    def _track(self, cache, run: Run) -> None:
        """`cache` holds `run`, a prefill this configuration pruned: refused once it is removed (see remove)."""
        run.home, run.cache = weakref.ref(self.caches), weakref.ref(cache)
        self.caches.add(cache)
        if compileable(cache):
            for name in FOLLOWED:
                if not isinstance(vars(cache).get(name), _Follow):
                    setattr(cache, name, _Follow(cache, vars(cache).get(name), name))

    # installation ---------------------------------------------------------------------------
    def install(self):
        try:
            inner = self.adapter.inner()
            top = self.adapter.model
            self.handles.append(top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
            self.handles.append(top.register_forward_hook(self._top_post, always_call=True))
            self.handles.append(inner.register_forward_pre_hook(self._inner_pre, with_kwargs=True))
            # an encode's scores belong to the forward that follows it, even one that raised before reading them
            self.handles.append(inner.register_forward_hook(self._inner_post, always_call=True))
            self.handles.append(self.lm.register_forward_pre_hook(self._lm_pre, with_kwargs=True))
            self.handles.append(self.lm.register_forward_hook(self._lm_post, with_kwargs=True))
            for i in range(self.adapter.deepstack_layers()):  # before _layer_post: add, then drop
                self.handles.append(self.layers[i].register_forward_hook(partial(self._deepstack, i)))
            if self.drop_layers:
                for i in range(self.drop_layers[0] + 1, len(self.layers)):
                    self.handles.append(
                        self.layers[i].register_forward_pre_hook(partial(self._layer_pre, i), with_kwargs=True)
                    )
            for p in sorted(set(self.drop_layers + self.observe_layers)):
                self.handles.append(self.layers[p].register_forward_hook(partial(self._layer_post, p), with_kwargs=True))
            for p in sorted(set(self.attn_layers + self.drop_layers)):  # (a linear-attention layer: its layer's)
                where = getattr(self.layers[p], "self_attn", self.layers[p])  # rotary table, for the next layer
                self.handles.append(where.register_forward_pre_hook(partial(self._attn_pre, p), with_kwargs=True))
            self.leaves = []  # (their modules may be replaced after patching: each prefill follows them)
            for p in self.attn_layers:
                attn = self._attention_module(p)
                self.leaves += [LeafHook(attn, "q_proj", partial(self._capture, p, "q")),
                                LeafHook(attn, "k_proj", partial(self._capture, p, "k"))]
            for p in self.observe_layers:
                layer = self.layers[p]
                for name, attr in (("attn_in", "input_layernorm"), ("attn_out", _mixer(layer)),
                                   ("mlp_in", "post_attention_layernorm"), ("mlp_out", "mlp")):
                    self.leaves.append(LeafHook(layer, attr, partial(self._capture, p, name)))
            self.handles.extend(self.leaves)
            self.handles.extend(self.adapter.install_hooks())
            if hasattr(top, "_prefill"):
                self.handles.append(wrap_method(top, "_prefill", self._generate_prefill))
            if hasattr(top, "_get_candidate_generator"):
                self.handles.append(wrap_method(top, "_get_candidate_generator", _no_first_guesses))
            if self.adapter.mrope and hasattr(top, "_prepare_position_ids_for_generation"):
                self.handles.append(wrap_method(top, "_prepare_position_ids_for_generation", self._generate_positions))
            signals = self.method.vision_signals() if self.pre_llm and not _keeps_everything(self.method) else {}
            self.signal_names = sorted(signals)
            if signals:
                self.handles.extend(self.adapter.install_vision_signals(signals, self.vision_scores))
                self.handles.extend(wrap_method(inner, fn, self._encoder_run)
                                    for fn in ("get_image_features", "get_video_features") if hasattr(inner, fn))
        except BaseException:
            self.remove()
            raise
        for cache in list(self.caches):  # back on the model (after `unpatched`): its caches continue again
            if _owner(cache) == self.token:
                _stop_refusing(cache)

    def remove(self):
        for h in reversed(self.handles):  # two wraps of one method: the last first
            h.remove()
        self.handles, self.leaves = [], []
        for cache in list(self.caches):
            if _owner(cache) == self.token and not _refusing(cache):
                for name in REFUSED:  # (keeps a wrapper the caller set there)
                    if hasattr(cache, name):
                        setattr(cache, name, _Refusal(cache, vars(cache).get(name), name))
        self.call.current = None
        self.call.scratch = None

    # hooks ------------------------------------------------------------------------------------
    def _top_pre(self, module, args, kwargs):
        i = self.top_params.index("labels") if "labels" in self.top_params else len(args)
        self.call.labels = kwargs.get("labels") is not None or (i < len(args) and args[i] is not None)
        self.call.encoder_outputs = kwargs.get("mm_encoder_outputs")
        return None

    def _top_post(self, module, args, output):
        self.call.labels, self.call.encoder_outputs = False, None

    def _inner_pre(self, module, args, kwargs):
        if args:  # e.g. LlavaNextForConditionalGeneration passes input_ids positionally
            kwargs = {**dict(zip(self.inner_params, args)), **kwargs}
        if kwargs.get("mm_encoder_outputs"):  # encoded before this forward: the objects the encoder returned,
            # which carry what their runs recorded (scores, anyres layouts): generate()'s own during its prefill
            # (a chunked prefill hands its one chunk a sliced copy), else as the caller handed them to the top
            # model (accelerate's device hooks rebuild the mappings on the way in)
            kwargs = {**kwargs, "mm_encoder_outputs": self.call.prefill_outputs or self.call.encoder_outputs
                      or kwargs["mm_encoder_outputs"]}
        # put back if this forward raises (half-filled figures otherwise)
        self.call.stats_before = (self.call.last_stats, self.latest)
        cache = kv_cache(kwargs)
        turn = self._new_turn(cache, kwargs)
        kwargs = turn if turn is not None else kwargs
        scratch = self.adapter.read_call(kwargs)
        if scratch.get("visual_input") and cache is not None and int(cache.get_seq_length(self.length_layer)) > 0:
            self._check_continuable(cache)  # (here, before transformers' placeholder check fails unclearly)
        self.call.scratch = scratch
        run = self._own_run(cache)
        if (self.adapter.mrope and run is not None and run.short
                and getattr(module, "rope_deltas", None) is not None
                and (compileable(cache) or cache.get_seq_length() > 0)):  # (a static one: no length read, a sync)
            # a decode step without position_ids is placed at cache length + rope_deltas by the model, and this
            # cache is shorter than its prompt: for this forward only (generate() passes positions, unaffected;
            # the model keeps its own value, which a later inputs_embeds-only forward reads)
            self.call.rope_lent = (module.rope_deltas, module.rope_deltas + run.short)
            module.rope_deltas = self.call.rope_lent[1]
        if any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos")):
            self.vision_scores.reset()  # this forward encodes its own images
        elif kwargs.get("mm_encoder_outputs"):  # the runs that made these
            self.vision_scores.use(kwargs["mm_encoder_outputs"])
        self.call.encoder_outputs = None
        return ((), kwargs) if turn is not None else None

    def _new_turn(self, cache, kwargs) -> dict | None:
        """generate() handed the whole conversation and a pruned cache (a new turn) cuts the ids at the cache's
        length, shorter than the unpruned sequence by `short`: its first `short` tokens are in the cache already.
        The call's per-token inputs without them; None for any other call."""
        ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        run = self._own_run(cache)
        # (a decode step returns first: a static cache's length is a read of a device tensor)
        if ids is None or ids.shape[1] <= 1 or run is None:
            return None
        short = run.short
        if not short or int(cache.get_seq_length()) == 0:
            return None
        q, am = ids.shape[1], kwargs.get("attention_mask")
        held = self._held(cache, run)
        mask2d = isinstance(am, torch.Tensor) and am.dim() == 2
        # the whole conversation's mask tells; (generate() may drop an all-ones one) else what generate() said it feeds
        whole = am.shape[1] - held == q if mask2d else self.call.turn == q
        if not whole:
            return None
        if q <= short:
            raise ValueError(_mask_message(q, held + short, am.shape[1]) if mask2d else
                             f"vtprune: this call continues a pruned KV cache with no new token: its {q} tokens "
                             "are all in the cache already")
        out = dict(kwargs)
        for k in ("input_ids", "inputs_embeds", "position_ids", "mm_token_type_ids", "token_type_ids"):
            v = out.get(k)
            if isinstance(v, torch.Tensor) and v.shape[-1 if k != "inputs_embeds" else 1] == q:
                out[k] = v[:, short:] if k in ("input_ids", "inputs_embeds") else v[..., short:]
        return out

    def _generate_positions(self, original, inputs_tensor, model_kwargs):
        """Around generate()'s M-RoPE positions (Qwen-VL): continuing a pruned cache, it looks for new images
        from the cache's length on, which is shorter than the unpruned sequence, and took the prompt's own image
        tokens there for new ones (text positions without the rope delta, the model's rope_deltas zeroed). The
        token types of what the cache holds are hidden from it."""
        cache = kv_cache(model_kwargs)
        run = self._own_run(cache)
        types = model_kwargs.get("mm_token_type_ids")
        if run is not None and isinstance(types, torch.Tensor) and int(cache.get_seq_length()):
            held = self._held(cache, run) + run.short  # unpruned positions held
            types = types.clone()
            types[..., :held] = 0
            model_kwargs = {**model_kwargs, "mm_token_type_ids": types}
        return original(inputs_tensor, model_kwargs)

    def _generate_prefill(self, original, *args, **kwargs):
        """Around generate()'s prefill: its mm_encoder_outputs (which carry their runs' scores) for the
        forward, and a clear refusal where chunking would split a prompt's images over several forwards."""
        call = call_arguments(original, args, kwargs)
        model_kwargs, config, ids = call.get("model_kwargs") or {}, call.get("generation_config"), call.get("input_ids")
        chunk = getattr(config, "prefill_chunk_size", None)
        encoded = model_kwargs.get("mm_encoder_outputs") or {}  # generate() hands {} for a text-only prompt
        images = any(v is not None for v in encoded.values()) or any(
            model_kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos"))
        if chunk is not None and images and ids is not None and ids.shape[-1] > chunk:
            raise NotImplementedError(
                f"vtprune: generate(prefill_chunk_size={chunk}) splits this {ids.shape[-1]}-token prompt over several "
                "forwards, and pruning needs each prompt's images in one; pass prefill_chunk_size=None or one of at "
                "least the prompt's length")
        self.call.prefill_outputs = encoded
        # a new turn on a pruned cache given the whole conversation: generate() feeds it from the cache's (shorter)
        # length on, `short` tokens it holds already; the forward is told, as its mask may not come with it
        cache = kv_cache(model_kwargs)
        am = model_kwargs.get("attention_mask")
        run = self._own_run(cache)
        if run is not None and ids is not None and ids.dim() == 2 and model_kwargs.get("inputs_embeds") is None:
            length = int(cache.get_seq_length())
            # generate() cuts the whole conversation at the cache's length (else it feeds all the ids given)
            whole = (am.shape[-1] if am is not None else getattr(config, "_mask_length", -1)) == ids.shape[-1]
            fed = ids.shape[-1] - length if whole else ids.shape[-1]
            # chunked, it cuts each chunk's mask and positions at the (pruned) cache's length plus the chunk's,
            # `short` columns short of the whole sequence's (a chunk was read as a whole new turn, or placed
            # `short` positions early), except for one chunk of the whole conversation, which ends where it does
            if chunk is not None and run.short and length > 0 and (fed > chunk or not whole):
                raise NotImplementedError(
                    f"vtprune: generate(prefill_chunk_size={chunk}) on a KV cache pruned before the decoder cuts the "
                    f"mask and positions of the {fed} tokens it feeds at the cache's length, {run.short} columns short "
                    "of the whole sequence's; pass prefill_chunk_size=None" + (
                        f" or one of at least {fed} tokens" if whole else
                        ", or the whole conversation as input_ids with a prefill_chunk_size of at least the tokens it "
                        "then feeds (those the cache lacks and the pruned ones)"))
            if length > 0 and (am is None or whole):
                self.call.turn = ids.shape[-1] - length
        try:
            return original(*args, **kwargs)
        finally:
            self.call.prefill_outputs, self.call.turn = None, None

    def _encoder_run(self, original, *args, **kwargs):
        """Around the model's get_{image,video}_features: tag the scores of this encoder run with its output."""
        start = self.vision_scores.counts()
        out = original(*args, **kwargs)
        self.vision_scores.tag(out, start)
        return out

    def _inner_post(self, module, args, output):
        if self.call.rope_lent is not None:
            own, lent = self.call.rope_lent
            self.call.rope_lent = None
            if module.rope_deltas is lent:  # (not if the forward computed a new one)
                module.rope_deltas = own
        self.vision_scores.read()  # the next encode starts afresh (they stay for a use_cache=False rerun)
        if output is None:  # the forward raised (an always_call hook gets no output): the last finished one's figures
            own, latest = self.call.stats_before
            if self.latest is self.call.last_stats:  # (not if another thread's forward has finished since)
                self.latest = latest
            self.call.last_stats = own

    def _lm_pre(self, module, args, kwargs):
        self.call.current = None
        scratch, self.call.scratch = self.call.scratch, None
        if args:
            raise TypeError("vtprune expects the language model to be called with keyword arguments")
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:  # text-only call with input_ids straight to the LM: nothing to prune
            return None
        cache = kv_cache(kwargs)
        run = getattr(cache, _CACHE_ATTR, None)
        # a static cache reset for reuse: the record is from its last prompt (its reset() says so at once; a decode
        # step does not read its length, a host sync)
        length = (int(cache.get_seq_length()) if run is not None and (embeds.shape[1] > 1 or not compileable(cache))
                  else None)
        if length == 0:
            _release(cache)
            run = None
        if run is not None and run.owner != self.token:
            raise RuntimeError(_orphan_message(run.method))
        if run is not None:
            _stop_refusing(cache)  # ours (e.g. a copy made while this configuration was off the model)
            if run.cache is None or run.cache() is not cache:  # an untracked copy of one of ours (unpickled)
                self._track(cache, run)
            if compileable(cache) and length is not None:  # (its length was read above: the count from it)
                run.decoded = length - run.groups[0].mask.shape[1]
            held = self._held(cache, run, length)
            if held < run.groups[0].mask.shape[1]:  # crop(-k) past the positions decoded since (a default cache:
                raise NotImplementedError(_crop_message(  # a static one refuses that crop itself, see _Follow)
                    f"this KV cache was cropped into its pruned prompt: it holds {held} of the "
                    f"{run.groups[0].mask.shape[1]} positions the prompt kept"))
            am = kwargs.get("attention_mask")
            if isinstance(am, torch.Tensor) and am.dim() == 2 and embeds.shape[1] > 1:
                if am.shape[1] - held - run.short != embeds.shape[1]:
                    raise ValueError(_mask_message(embeds.shape[1], held + run.short, am.shape[1]))
            # (a decode step of one token brings no image: no call added to it)
            visual = self._visual(scratch, embeds) if embeds.shape[1] > 1 else None
            return self._decode(run, kwargs) if visual is None else self._continue(run, kwargs, scratch, visual, held)
        visual = self._visual(scratch, embeds)
        if visual is None:
            return None
        length = int(cache.get_seq_length(self.length_layer)) if cache is not None else 0
        if length > 0:  # a prefix the cache holds as the unpatched model would (a text prefix cached ahead)
            return self._continue(None, kwargs, scratch, visual, length)
        return self._prefill(kwargs, scratch, visual)

    def _visual(self, scratch, embeds) -> torch.Tensor | None:
        """The visual placeholder slots [B, L] of a forward with images, else None."""
        if scratch is None or not scratch.get("visual_input"):
            return None
        visual = self.adapter.visual_mask(scratch, embeds)
        return visual if visual is not None and bool(visual.any()) else None

    def _lm_post(self, module, args, kwargs, output):
        run, self.call.current = self.call.current, None
        if run is None:
            return None
        if run.prefill:
            self.last_stats.visual_after = run.visual.sum(1).tolist()
            self.last_stats.layout = run.layout
            masks = [run.fed] if run.fed is not None else [g.mask for g in run.groups]
            counts = [m.bool().sum(1).tolist() for m in masks]  # one host sync per layout, not per layer
            self.last_stats.layer_tokens = [list(counts[run.group_for(i)[0]]) for i in range(len(self.layers))]
            cache = kv_cache(output)
            if cache is None:
                cache = kv_cache(kwargs)
            if cache is not None and run.changed:
                run.owner, run.method = self.token, self.method_name
                setattr(cache, _CACHE_ATTR, run)
                self._track(cache, run)
        else:
            run.decoded, run.step = run.decoded + run.step, 0
        run.end_forward()
        return None

    # prefill ---------------------------------------------------------------------------------
    def _per_grid(self, u: Unit) -> bool:
        if not self.method.per_grid or u.grid is not None:
            return False
        if u.layout is None:
            raise ValueError(f"{self.method_name} works on each image's token grid(s), which this model's adapter "
                             "could not determine for this input" + self.adapter.layout_hint())
        return True

    def _budget(self, u: Unit) -> int:
        if self._per_grid(u):
            return anyres.budget(self.method, u.layout)
        return self.method.budget(len(u.slots), u.grid)

    def _select_all(self, todo: list[tuple[Unit, ImageTokens]]) -> list[Selection]:
        """Each image's checked selection, in order. Images of one shape (tokens, grid, budget; no anyres
        layout) go to the method's `select_batch` together where it has a batched form (DivPrune, ToDRE:
        one kernel launch and one host sync for a LLaVA batch or a clip's frames); the rest one by one, their
        checks with one host sync."""
        what = f"{self.method_name}.select"
        anyres.check_budgets(self.method, [(image.keep, u.layout, u.sample) for u, image in todo if self._per_grid(u)])
        out: list[Selection | None] = [None] * len(todo)
        groups: dict[tuple, list[int]] = {}
        batched = type(self.method).select_batch is not Method.select_batch
        for j, (u, image) in enumerate(todo):
            if batched and image.base is None and not self._per_grid(u):
                groups.setdefault((len(u.slots), u.grid, image.keep, image.features.device), []).append(j)
        for members in groups.values():
            if len(members) < 2:
                continue
            first, image = todo[members[0]]  # (the group's shape)
            sels = checked_batch(self.method.select_batch([todo[j][1] for j in members]), len(members),
                                 len(first.slots), image.keep, image.features.shape[-1], what)
            for j, s in zip(members, sels):
                out[j] = s
        rest, items = [j for j in range(len(todo)) if out[j] is None], []
        for j in rest:
            u, image = todo[j]
            sel = anyres.select(self.method, image, u.layout) if self._per_grid(u) else self.method.select(image)
            items.append((sel, len(u.slots), image.keep, image.features.shape[-1], what))
        for j, sel in zip(rest, checked_all(items)):  # (one host sync for all their checks)
            out[j] = sel
        return out

    def _units(self, scratch, visual, kwargs):
        """The images / frames at the `visual` slots of this forward, as the budgets count them (a whole clip one
        unit under video_budget="clip"): (units, frames, clip groups or None, budgets, the visual slots in some
        unit, the placeholders in none: a video's closing newline, never pruned)."""
        units = self.adapter.units(scratch, visual, kwargs.get("position_ids"))
        covered = torch.zeros_like(visual)
        for u in units:
            covered[u.sample, u.slots] = True
        budgets = [self._budget(u) for u in units]
        frames, groups = units, None
        if self.method.config.video_budget == "clip":  # each video one unit: its frames' slots, their budgets' sum
            units, budgets, groups = _clips(units, budgets)
        return units, frames, groups, budgets, covered, visual & ~covered

    def _tally(self, units, budgets, visual, device) -> tuple[tuple, torch.Tensor, torch.Tensor]:
        """This forward's figures begun (last_stats: visual tokens in, (sample, tokens, budget) per unit), and
        the unit of each slot [B, L] (-1: none) and each sample's budget total [B]."""
        images = tuple((u.sample, len(u.slots), k) for u, k in zip(units, budgets))
        self.last_stats = Stats(method=self.method_name, visual_before=visual.sum(1).tolist(), images=list(images))
        unit = torch.full(visual.shape, -1, dtype=torch.long, device=device)
        keep_total = torch.zeros(visual.shape[0], dtype=torch.long, device=device)
        for i, (u, k) in enumerate(zip(units, budgets)):
            keep_total[u.sample] += k
            unit[u.sample, u.slots] = i
        return images, unit, keep_total

    def _choose(self, embeds, units, frames, groups, budgets) -> tuple[list, list]:
        """The strategy's selection for each unit over its budget: [(unit, Selection)] and their ImageTokens."""
        t0 = mark(embeds)
        signals = self.adapter.unit_signals(self.vision_scores, frames) if self.vision_scores else [{}] * len(frames)
        if groups is not None:  # a clip's scores: its frames', in order
            signals = [{name: torch.cat([signals[j][name] for j in g]) for name in signals[g[0]]} for g in groups]
        todo: list[tuple[Unit, ImageTokens]] = []
        for i, (u, k) in enumerate(zip(units, budgets)):
            if k >= len(u.slots):
                continue
            base = u.layout.parts[0][0].to(embeds.device) if u.layout is not None and len(u.layout.parts) > 1 else None
            missing = [name for name in self.signal_names if name not in signals[i]]
            if missing:
                raise ValueError(
                    f"vtprune: {self.method_name} reads the vision encoder's {missing} scores, and none came with "
                    "the image features this forward was handed (computed before vtprune.patch, or returned as "
                    "a tuple): pass pixel_values, or hand it the outputs of the patched model's "
                    "get_image_features / get_video_features (return_dict=True)")
            todo.append((u, ImageTokens(embeds[u.sample, u.slots], u.grid, k, signals[i], base)))
        chosen = [(u, sel) for (u, _), sel in zip(todo, self._select_all(todo))]
        self.last_stats.add_selection(t0, mark(embeds))
        return chosen, [image for _, image in todo]

    def _apply(self, embeds, visual, chosen, images, deepstack):
        """The slots kept [B, L] (images under budget whole), the embeddings with merged tokens in place, and the
        selections' importance at their kept slots (None if none gave any)."""
        b, seq_len = visual.shape
        keep = torch.ones_like(visual)
        for u, _ in chosen:
            keep[u.sample, u.slots] = False
        new_embeds = embeds
        importance = None
        for (u, sel), image in zip(chosen, images):
            kept_slots = u.slots[sel.indices.to(u.slots.device)]
            keep[u.sample, kept_slots] = True
            if sel.tokens is not None:
                if new_embeds is embeds:
                    new_embeds = embeds.clone()
                new_embeds[u.sample, kept_slots] = sel.tokens.to(embeds.dtype)
                if deepstack:
                    self._merge_deepstack(deepstack, u, sel, image)
            if sel.importance is not None:
                if importance is None:
                    importance = torch.zeros(b, seq_len, dtype=torch.float32, device=embeds.device)
                importance[u.sample, kept_slots] = sel.importance.float().to(embeds.device)
        return keep, new_embeds, importance

    def _prefill(self, kwargs, scratch, visual):
        embeds = kwargs["inputs_embeds"]
        b, seq_len, _ = embeds.shape
        am = kwargs.get("attention_mask")
        cache = kv_cache(kwargs)
        static = compileable(cache)
        if static:
            am = padding_mask(am, seq_len)  # generate() prepared the full mask from the 2-D one
        if am is not None and (not isinstance(am, torch.Tensor) or am.dim() != 2):
            raise ValueError("vtprune needs a 2-D attention_mask (or none); got a prepared 4-D mask or mapping")
        mask2d = am if am is not None else torch.ones(b, seq_len, dtype=torch.long, device=embeds.device)
        units, frames, groups, budgets, visual, structural = self._units(scratch, visual, kwargs)
        over = any(k < len(u.slots) for u, k in zip(units, budgets))  # some image is over its budget
        # (or the strategy's in-LLM phase runs on every prefill with images: todre's stage 2 alone)
        prunes = over or bool(units and self.drop_layers and self.method.llm_phase_always)
        if self.call.labels and prunes:
            raise NotImplementedError(_labels_message(self.method_name))
        if static and self.drop_layers and prunes:
            raise NotImplementedError(
                f"vtprune: {self.method_name} drops tokens inside the decoder (after layer {self.drop_layers[0]}), "
                "which a static (compileable) KV cache cannot hold (its layers would hold different lengths); use "
                "the default dynamic cache, or a strategy (or option, e.g. todre's stage2=False) that prunes before "
                "the language model only"
            )
        images, unit, keep_total = self._tally(units, budgets, visual, embeds.device)
        run = Run(
            orig_len=seq_len,
            groups=[Group(0, mask2d)],
            visual=visual,
            structural=structural,
            layout=torch.arange(seq_len, device=embeds.device).expand(b, seq_len),
            keep_total=keep_total,
            pos_shift=torch.zeros(b, dtype=torch.long, device=embeds.device),
            unit=unit,
            images=images,
            before=visual.sum(1),
            orig_mask=mask2d,
        )
        self.call.current = run
        for leaf in self.leaves:  # (before any layer runs)
            leaf.follow()
        if not self.pre_llm or (prunes and not over):
            # Nothing happens before the decoder; the drop hooks act if any image is over budget (or always).
            run.changed = prunes
            # (decode steps number a new token as the prefill did: by slot on the model's default positions; left
            # unset here, a left-padded LLaVA row's first decoded token took another position after fastv/transprune)
            run.default_positions = kwargs.get("position_ids") is None
            if not run.changed:
                self.call.current = None
                self.last_stats.visual_after = list(self.last_stats.visual_before)
                return None
            if kwargs.get("deepstack_visual_embeds") is None:
                return None
            run.deepstack = _dense_deepstack(kwargs, visual, embeds)
            return args_kwargs(kwargs)

        chosen, images = self._choose(embeds, units, frames, groups, budgets)
        if not chosen:
            self.call.current = None
            self.last_stats.visual_after = list(self.last_stats.visual_before)
            return None

        deepstack = _dense_deepstack(kwargs, visual, embeds) if kwargs.get("deepstack_visual_embeds") is not None else []
        keep, new_embeds, importance = self._apply(embeds, visual, chosen, images, deepstack)
        positions, shift = self._positions(kwargs.get("position_ids"), keep, mask2d, units, chosen, embeds)
        index = compact_index(keep)
        new_mask = take(mask2d, index, 1, 0)
        new_pos = take(positions, index, positions.dim() - 1, 0)
        if new_pos.dim() == 3 and new_pos.shape[0] == 4:  # Qwen's text row: contiguous, as generate() builds it
            new_pos[0] = compact_text_positions(new_mask)
        run.groups = [Group(0, new_mask)]
        run.deepstack = [take(d, index, 1, 0) for d in deepstack]
        if importance is not None:
            run.state["importance"] = take(importance, index, 1, 0)
        run.visual = take(visual, index, 1, False)
        run.structural = take(structural, index, 1, False)
        run.unit = take(unit, index, 1, -1)
        run.layout = index
        run.pos_shift, run.shifted = shift, bool(shift.any())
        run.changed = True
        kwargs["inputs_embeds"] = take(new_embeds, index, 1, 0)
        kwargs["attention_mask"] = (self._prepared_mask(new_mask, kwargs["inputs_embeds"], cache)
                                    if static else new_mask)
        run.default_positions = kwargs.get("position_ids") is None
        kwargs["position_ids"] = new_pos
        return args_kwargs(kwargs)

    def _continue(self, run: Run | None, kwargs, scratch, visual, held: int):
        """A forward with images that continues a KV cache: the next turn of a chat on the cache a pruned
        generate() returned (`run`), or a prompt after a prefix cached unpruned (run None; `held` positions).
        Its images are pruned as a prefill's, and its tokens join the cache's record as if the prompt had
        held them: a new Run whose group-0 mask and positions run through this forward, for the decode steps."""
        embeds = kwargs["inputs_embeds"]
        b, q, _ = embeds.shape  # (_inner_pre has refused what cannot be continued: _check_continuable)
        am = kwargs.get("attention_mask")
        if am is not None and (not isinstance(am, torch.Tensor) or am.dim() != 2):
            raise ValueError("vtprune needs a 2-D attention_mask (or none); got a prepared 4-D mask or mapping")
        if run is None:
            if am is not None and am.shape[1] != held + q:
                raise ValueError(_mask_message(q, held, am.shape[1]))
            prefix = am[:, :held] if am is not None else torch.ones(b, held, dtype=torch.long, device=embeds.device)
            run = Run(orig_len=held, groups=[Group(0, prefix)], visual=visual.new_zeros(b, held),
                      layout=torch.arange(held, device=embeds.device).expand(b, held),
                      keep_total=torch.zeros(b, dtype=torch.long, device=embeds.device),
                      pos_shift=torch.zeros(b, dtype=torch.long, device=embeds.device), orig_mask=prefix,
                      default_positions=kwargs.get("position_ids") is None)
        if am is None:  # (generate() drops an all-ones mask)
            am = torch.cat([run.orig_mask, run.orig_mask.new_ones(b, held - run.groups[0].mask.shape[1] + q)], 1)
        pos = kwargs.get("position_ids")
        if pos is None and self.adapter.mrope:  # (a guard: Qwen-VL models count them before their language model)
            raise ValueError("vtprune: a Qwen-VL forward with images on a KV cache that holds a prefix needs their "
                             "M-RoPE position_ids (generate() passes them)")
        if pos is None:  # placed as the decode path would place these tokens
            pos = (torch.arange(am.shape[1] - q, am.shape[1], device=am.device).expand(b, q) if run.default_positions
                   else compact_text_positions(am)[:, -q:])
        pos = pos.expand(b, -1) + run.pos_shift[:, None] if pos.dim() == 2 else pos.expand(-1, b, -1)
        units, frames, groups, budgets, visual, structural = self._units(scratch, visual, kwargs)
        images, unit, keep_total = self._tally(units, budgets, visual, embeds.device)
        chosen, tokens = self._choose(embeds, units, frames, groups, budgets)
        if chosen and self.call.labels:
            raise NotImplementedError(_labels_message(self.method_name))
        if not chosen and not run.changed:  # an unpruned prefix and images within budget: nothing to record
            self.last_stats.visual_after = list(self.last_stats.visual_before)
            return None
        deepstack = _dense_deepstack(kwargs, visual, embeds) if kwargs.get("deepstack_visual_embeds") is not None else []
        keep, new_embeds, _ = self._apply(embeds, visual, chosen, tokens, deepstack)
        partial = sorted({k for k in self.kinds if k != "full_attention"})
        if b > 1 and partial and bool((keep.sum(1) != keep.sum(1)[:1]).any()):
            raise NotImplementedError(
                f"vtprune: these images keep different numbers of tokens per sample, so the shorter rows would be "
                f"padded between the KV cache and their new tokens, which this model's {partial} layers would not "
                "skip as they skip the padding a prefill puts first; continue the cache one prompt per call")
        own = am[:, -q:]
        positions, shift = self._positions(pos, keep, own, units, chosen, embeds)
        index = compact_index(keep)
        fed = take(own, index, 1, 0)
        mask = torch.cat([run.groups[0].mask.to(am.dtype), am[:, run.orig_len:am.shape[1] - q], fed], 1)
        new_pos = take(positions, index, positions.dim() - 1, 0)
        if new_pos.dim() == 3 and new_pos.shape[0] == 4:  # Qwen's text row: contiguous through the cache's
            new_pos[0] = compact_text_positions(mask)[:, -fed.shape[1]:]
        pos_shift = run.pos_shift + shift
        self.call.current = replace(
            run, orig_len=am.shape[1], groups=[Group(0, mask)], orig_mask=am, pos_shift=pos_shift,
            shifted=bool(pos_shift.any()), decoded=0, step=0, no_pads=None, changed=True, prefill=True, fed=fed,
            # this forward's slots (its stats)
            visual=take(visual, index, 1, False), structural=take(structural, index, 1, False),
            unit=take(unit, index, 1, -1), layout=index, images=images, before=visual.sum(1), keep_total=keep_total,
            deepstack=[take(d, index, 1, 0) for d in deepstack])
        kwargs["inputs_embeds"] = take(new_embeds, index, 1, 0)
        kwargs["attention_mask"] = mask
        kwargs["position_ids"] = new_pos
        return args_kwargs(kwargs)

    def _check_continuable(self, cache):
        """Images continuing a non-empty KV cache (see _continue): refused by name where they cannot be."""
        pruned = self._own_run(cache) is not None
        where = "a KV cache that already holds a pruned prefill" if pruned else "a KV cache that holds a prefix already"
        if self.adapter.mrope and pruned:  # (transformers' generate() cannot continue one unpatched either)
            raise NotImplementedError(f"vtprune: images continuing {where} are not supported on Qwen-VL (M-RoPE "
                                      "positions); start a new cache per prompt")
        if self.drop_layers or self.attn_layers or self.observe_layers:
            raise NotImplementedError(
                f"vtprune: images continuing {where} are not supported with {self.method_name}, which reads or "
                "drops tokens inside the decoder; the strategies that prune before the language model only take "
                "them, or start a new cache per prompt")
        if compileable(cache):
            raise NotImplementedError(f"vtprune: images continuing {where} are not supported on a static cache; use "
                                      "the default dynamic cache, or a new cache per prompt")

    def _merge_deepstack(self, deepstack, u: Unit, sel: Selection, image: ImageTokens):
        """A merging method (new tokens, not a subset) must merge the deepstack features the same way:
        run its selection again on each level's features and check it chose the same slots (true for
        merges decided by the grid or by vision signals: pool, token_shuffle, vflowopt's recycling)."""
        what = f"{self.method_name}.select"
        for level, dense in enumerate(deepstack):
            again = checked(self.method.select(replace(image, features=dense[u.sample, u.slots])), len(u.slots),
                            image.keep, dense.shape[-1], what)
            idx = again.indices
            if not torch.equal(idx.cpu(), sel.indices.cpu()) or again.tokens is None:
                raise NotImplementedError(
                    f"{self.method_name}: its merge depends on the token features, so it cannot be applied to "
                    "Qwen3-VL's deepstack features consistently")
            dense[u.sample, u.slots[idx.to(u.slots.device)]] = again.tokens.to(dense.dtype)

    def _positions(self, pos, keep, mask2d, units, chosen, embeds):
        """Full-length position ids after pruning (gathered by the caller) and the decode shift [B]."""
        b, seq_len = keep.shape
        if pos is None:
            pos = self.adapter.default_positions(b, seq_len, embeds.device)
        if pos.dim() == 2 and pos.shape[0] != b:
            pos = pos.expand(b, -1)
        if pos.dim() == 3 and pos.shape[1] != b:
            pos = pos.expand(-1, b, -1)
        if not self.adapter.mrope:
            if self.method.config.keep_positions:
                return pos, torch.zeros(b, dtype=torch.long, device=pos.device)
            real = mask2d.bool()
            new = torch.where(real, pos - dropped_before(keep), pos)
            return new, -(~keep).sum(1)
        # M-RoPE: kept tokens keep their (t, h, w); merged tokens with a grid get a coarse grid from the
        # image's first position; everything after a shortened block moves back by the lost extent.
        rows = pos[-3:].clone()
        original = pos[-3:]
        for u, sel in chosen:
            if sel.grid is None:
                continue
            gt, gh, gw = sel.grid  # (checked against the indices by _select_all)
            kept_slots = u.slots[sel.indices.to(u.slots.device)]
            start = original[:, u.sample, u.slots[0]]
            tt, hh, ww = torch.meshgrid(
                torch.arange(gt, device=pos.device), torch.arange(gh, device=pos.device),
                torch.arange(gw, device=pos.device), indexing="ij",
            )
            rows[:, u.sample, kept_slots] = torch.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + start[:, None]
        shift_slots = torch.zeros(b, seq_len, dtype=pos.dtype, device=pos.device)
        total = torch.zeros(b, dtype=torch.long, device=pos.device)
        merged_blocks = {(u.sample, u.block) for u, sel in chosen if sel.grid is not None}
        for sample, block in sorted(merged_blocks):
            slots = torch.cat([u.slots for u in units if u.sample == sample and u.block == block])
            kept = slots[keep[sample, slots]]
            delta = int(rows[1:, sample, kept].max() - original[1:, sample, slots].max())  # h/w extent, as get_rope_index
            shift_slots[sample, int(slots.max()) + 1:] += delta
            total[sample] += delta
        rows = rows + shift_slots[None]
        new = torch.cat([pos[:-3], rows]) if pos.shape[0] > 3 else rows
        return new, total

    def _prepared_mask(self, mask2d, embeds, cache):
        """With a static cache: the mask generate() would have prepared from `mask2d` for these queries
        (4-D, or a mapping by layer type), so that a compiled language model sees the same kinds of
        input, pruned or not, and a decode step keeps one shape (the cache's full length)."""
        from transformers import masking_utils  # imports triton: load only when needed

        model = self.adapter.model
        make = getattr(model, "create_masks_for_generate", masking_utils.create_masks_for_generate)
        out = make(config=model.config, inputs_embeds=embeds.new_empty(*embeds.shape[:2], 0), attention_mask=mask2d,
                   position_ids=None, **{_cache_kwarg(make): cache})
        if isinstance(out, dict):
            return {k: v.contiguous() if v is not None else None for k, v in out.items()}
        return out.contiguous() if out is not None else None

    # decode ----------------------------------------------------------------------------------
    def _decode(self, run: Run, kwargs):
        embeds = kwargs["inputs_embeds"]
        b, q = embeds.shape[:2]
        am = kwargs.get("attention_mask")
        cache = kv_cache(kwargs)
        static = compileable(cache) and not (isinstance(am, torch.Tensor) and am.dim() == 2)
        dropped = am is None  # (generate() drops an all-ones mask: the prompt had no padding)
        if static and torch.compiler.is_compiling():
            raise RuntimeError("vtprune: the pruning hooks cannot run inside a compiled model forward (generate()'s "
                               "auto-compile with a static cache); use vtprune.compile_llm(model), which compiles "
                               "the language model only")
        if static or am is None:
            # the 2-D mask generate() grows (with a static cache it prepared a full mask for the unpruned layout
            # instead): the prompt's, then one real column per token generated so far
            seen = self._held(cache, run) - run.groups[0].mask.shape[1]
            am = torch.cat([run.orig_mask, run.orig_mask.new_ones(b, seen + q)], dim=1)
        if not isinstance(am, torch.Tensor) or am.dim() != 2 or am.shape[1] < run.orig_len + q:
            raise ValueError("vtprune: decode steps need the 2-D attention mask that grows from the prompt's")
        run.prefill = False
        run.incoming_mask = am
        run.step = q
        self.call.current = run
        mask = torch.cat([run.groups[0].mask.to(am.dtype), am[:, run.orig_len:]], dim=1)
        if static:
            kwargs["attention_mask"] = self._prepared_mask(mask, embeds, cache)
        elif dropped and run.unpadded():
            # nor did pruning pad it (kept counts alike): no mask, as unpatched, which the model then need not read
            # back (a host sync per step) to see that SDPA may skip it
            kwargs["attention_mask"] = None
        else:
            kwargs["attention_mask"] = mask
        run.maskless = kwargs["attention_mask"] is None and q == 1
        run.bare = run.maskless and self.full_after_drop and all(run.unpadded(g) for g in range(len(run.groups)))
        if run.shifted or kwargs.get("position_ids") is None:
            pos = kwargs.get("position_ids")
            if pos is None:
                if run.default_positions:  # the prefill counted every slot (arange), as the model does
                    pos = torch.arange(am.shape[1] - q, am.shape[1], device=am.device).expand(b, q)
                else:
                    pos = compact_text_positions(am)[:, -q:]
                if self.adapter.mrope:
                    pos = pos[None].expand(3, -1, -1)
            pos = pos.clone()
            if pos.dim() == 2:
                pos += run.pos_shift[:, None]
            else:
                pos[-3:] += run.pos_shift[None, :, None]
            kwargs["position_ids"] = pos
        return args_kwargs(kwargs)

    # llm stage -------------------------------------------------------------------------------
    def _layer_pre(self, i, module, args, kwargs):
        run = self.call.current
        if run is None:
            return None
        if run.bare:  # (the fast path of the None masks below: this hook runs at every layer of every step)
            kwargs["attention_mask"] = None
            return args, kwargs
        gi, group = run.group_for(i)
        if gi == 0:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        layer_type = self.kinds[i]
        key = (gi, layer_type)
        if key not in run.masks and run.maskless and layer_type == "full_attention" and run.unpadded(gi):
            # one new token, no padding in the group's cache: it attends to every key, as the layers before
            # do, with no mask (building one cost more host time per step than the layer's attention here)
            run.masks[key] = None
        if key not in run.masks:
            mask2d = group.mask if run.prefill else torch.cat(
                [group.mask.to(run.incoming_mask.dtype), run.incoming_mask[:, run.orig_len:]], dim=1
            )
            from transformers import masking_utils  # imports triton: load only when a layer needs it

            make = {"sliding_attention": masking_utils.create_sliding_window_causal_mask,
                    "linear_attention": getattr(masking_utils, "create_recurrent_attention_mask", None)}.get(
                layer_type, masking_utils.create_causal_mask)
            if make is None:
                raise RuntimeError(f"vtprune: this transformers has no mask for decoder layer {i}'s {layer_type!r}")
            # a decode step's mask is made in full: whether SDPA may skip it is a read of the mask (a host sync)
            # per group, and one query row gains nothing from the skip
            full = {} if run.prefill or "allow_is_causal_skip" not in _parameters(make) else {
                "allow_is_causal_skip": False}
            run.masks[key] = make(  # (layer i: the group's layers of one type hold KV caches of one length)
                config=self.lm.config, inputs_embeds=hidden, attention_mask=mask2d, position_ids=None,
                layer_idx=i, **{_cache_kwarg(make): kv_cache(kwargs)}, **full,
            )
        kwargs["attention_mask"] = run.masks[key]
        if run.prefill:
            if gi not in run.pos_emb:
                cos, sin = kwargs["position_embeddings"]
                bsz = group.index0.shape[0]
                run.pos_emb[gi] = tuple(
                    take(t.expand(bsz, *t.shape[1:]), group.index0, 1, 0) for t in (cos, sin)
                )
            kwargs["position_embeddings"] = run.pos_emb[gi]
            pid = kwargs.get("position_ids")
            if isinstance(pid, torch.Tensor) and pid.shape[-1] == run.groups[0].mask.shape[1]:
                if gi not in run.pos_ids:
                    run.pos_ids[gi] = compact_text_positions(group.mask)
                kwargs["position_ids"] = run.pos_ids[gi]
        return args, kwargs

    def _attn_pre(self, p, module, args, kwargs):
        run = self.call.current
        if run is not None and run.prefill:
            run.captured.setdefault(p, {})["pos"] = kwargs.get("position_embeddings")
        return None

    def _capture(self, p, name, module, args, output):
        run = self.call.current
        if run is not None and run.prefill:
            run.captured.setdefault(p, {})[name] = output
        return None

    def _layer_attention(self, p, run: Run, query_rows=None):
        cap = run.captured.get(p, {})
        if "q" not in cap or "k" not in cap:
            raise RuntimeError(f"{self.method_name}: attention at layer {p} was not captured")
        return _key_attention(self._attention_module(p), cap["q"], cap["k"], cap.get("pos"), run, query_rows,
                              self._window(p))

    def _next_attention(self, p, run: Run, hidden, query_rows=None):
        """Attention at layer p+1 of the tokens leaving layer p: its input norm and q/k projections
        applied to `hidden` (layer p+1 sees the same layout, so it shares layer p's rotary table)."""
        layer = self.layers[p + 1]
        attn = self._attention_module(p + 1)
        x = layer.input_layernorm(hidden)
        return _key_attention(attn, attn.q_proj(x), attn.k_proj(x), run.captured.get(p, {}).get("pos"), run, query_rows,
                              self._window(p + 1))

    def _window(self, i: int) -> int | None:
        """Decoder layer i's sliding window, or None for full attention."""
        return self.lm.config.sliding_window if self.kinds[i] == "sliding_attention" else None

    def _deepstack(self, i, module, args, output):
        """Qwen3-VL: add layer i's deepstack features at the visual slots of the current layout, as the
        language model would have done with its own (now stale) visual_pos_masks."""
        run = self.call.current
        if run is None or not run.prefill or i >= len(run.deepstack):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        vis = run.visual
        hidden[vis] = hidden[vis] + run.deepstack[i][vis]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def _layer_post(self, p, module, args, kwargs, output):
        run = self.call.current
        if run is None or not run.prefill:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        group = run.groups[-1]
        tokens = LayerTokens(
            layer=p, hidden=hidden, visual=run.visual, mask=group.mask.bool(), keep=run.keep_total,
            before=run.before, unit=run.unit, images=run.images, structural=run.structural,
            num_layers=len(self.layers), attention=partial(self._layer_attention, p, run),
            attention_next=partial(self._next_attention, p, run, hidden) if p in self.drop_layers else None,
            state=run.state,
        )
        t0 = mark(hidden)
        if p in self.observe_layers:
            cap = run.captured.get(p, {})
            io = {name: (cap[name][0] if isinstance(cap.get(name), tuple) else cap.get(name))
                  for name in ("attn_in", "attn_out", "mlp_in", "mlp_out")}
            self.method.observe(tokens, io)
        picks = None
        if p in self.drop_layers:
            picks = self.method.select_in_llm(tokens)
            if picks is None:  # (it would have pruned nothing, silently)
                raise TypeError(f"{self.method_name}.select_in_llm returned None: return one LongTensor of kept "
                                "indices per sample")
        self.last_stats.add_selection(t0, mark(hidden), in_llm=True)
        run.captured.pop(p, None)
        if picks is None:
            return None
        if len(picks) != hidden.shape[0]:
            raise RuntimeError(f"{self.method_name}.select_in_llm returned {len(picks)} selections for batch {hidden.shape[0]}")
        keep = ~run.visual
        what = f"{self.method_name}.select_in_llm"
        present = [(bi, sel, slots) for bi, (sel, slots) in enumerate(zip(picks, row_slots(run.visual)))
                   if slots.numel()]
        sels = check_indices_all([(sel, len(slots), len(slots), what, 0, False) for _, sel, slots in present])
        for (bi, _, slots), sel in zip(present, sels):  # (one host sync above for every sample's checks)
            keep[bi, slots[sel.to(slots.device)]] = True
        if bool(keep.all()):
            return None
        index = compact_index(keep)
        index0 = index if group.index0 is None else take(group.index0, index, 1, -1)
        run.groups.append(Group(p + 1, take(group.mask, index, 1, 0), index0))
        lcur = run.visual.shape[1]
        for name, value in list(run.state.items()):
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (keep.shape[0], lcur):
                run.state[name] = take(value, index, 1, 0)
        run.deepstack = [take(d, index, 1, 0) for d in run.deepstack]
        run.visual = take(run.visual, index, 1, False)
        run.structural = take(run.structural, index, 1, False)
        run.unit = take(run.unit, index, 1, -1)
        run.layout = take(run.layout, index, 1, -1)
        new_hidden = take(hidden, index, 1, 0)
        return (new_hidden, *output[1:]) if isinstance(output, tuple) else new_hidden


def _no_first_guesses(original, *args, **kwargs):
    """Around generate()'s candidate generator (assisted and prompt-lookup decoding): its first guesses would go
    into the prompt's own forward, where the text-aware strategies read the question's last rows (they would
    select for the guesses) and from which a rejected guess would be cropped (inside the pruned prompt's
    record). That forward gets no guesses (they are made, so that an assistant model's cache stays in step, and
    dropped); the next ones do."""
    generator = original(*args, **kwargs)
    real, first = generator.get_candidates, [True]

    def get_candidates(input_ids, *a, **kw):
        guesses = real(input_ids, *a, **kw)
        if first[0]:
            first[0] = False
            return input_ids, None
        return guesses

    generator.get_candidates = get_candidates
    return generator


def _labels_message(method: str) -> str:
    return (f"vtprune: labels (a loss) while pruning are not supported: {method} shortens the sequence, so the "
            "logits no longer line up with labels for the full prompt. Unpatch to train, or compute the loss "
            "yourself from the logits and vtprune.stats(model).layout")


def _mask_message(new: int, before: int, width: int) -> str:
    return (f"vtprune: {new} new tokens on a pruned KV cache need the attention_mask of the whole unpruned sequence, "
            f"{before} positions before them; got {width} in all")


def _clips(units: list, budgets: list) -> tuple[list, list, list]:
    """(units, budgets, groups) with each video's frames made one unit (video_budget="clip"): its frames'
    slots in order, no grid, the sum of their budgets; groups[i] = the frame units unit i was made of."""
    out, out_budgets, groups, index = [], [], [], {}
    for j, (u, k) in enumerate(zip(units, budgets)):
        if u.video is None:
            raise ValueError("vtprune: video_budget='clip' needs to know which frames make each video, and this "
                             "call does not say (Qwen3-VL counts them off video_grid_thw, or off the encoded "
                             "videos' pooler_output when generate() hands them)")
        key = (u.sample, u.video)
        if u.video >= 0 and key in index:
            i = index[key]
            groups[i].append(j)
            out_budgets[i] += k
            continue
        if u.video >= 0:
            index[key] = len(out)
        out.append(u)
        out_budgets.append(k)
        groups.append([j])
    out = [u if len(g) == 1 else Unit(u.sample, torch.cat([units[j].slots for j in g]), None, u.block, video=u.video)
           for u, g in zip(out, groups)]
    return out, out_budgets, groups


def _mixer(layer) -> str:
    """The attribute holding a decoder layer's token mixer: its self-attention, or a hybrid model's linear
    attention."""
    return "self_attn" if getattr(layer, "self_attn", None) is not None else "linear_attn"


def _layer_list(method, method_name: str, name: str, n_layers: int) -> list[int]:
    """A strategy's `name`(n_layers) (drop_layers, attention_layers, observe_layers): sorted distinct ints."""
    fn = getattr(method, name)
    got = fn(n_layers) if callable(fn) else None
    try:
        if not callable(fn) or isinstance(got, (str, bytes)):
            raise TypeError
        items = list(got)
        if any(isinstance(p, bool) for p in items):
            raise TypeError
        layers = [operator.index(p) for p in items]
    except TypeError:
        raise TypeError(f"{method_name}.{name} must be a method returning decoder layer indices (ints), "
                        f"def {name}(self, num_layers) -> list[int]; "
                        + (f"{name}({n_layers}) returned {got!r}" if callable(fn) else f"it is {fn!r}")) from None
    return sorted(set(layers))


def layer_kind(config, i: int) -> str:
    """Decoder layer i's attention as its model masks it: the config's `layer_types` entry, else sliding
    everywhere where the config sets a model-wide `sliding_window` (Mistral, Mixtral, Phi-3), else full."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def _key_attention(attn, q_raw, k_raw, pos, run: Run, query_rows=None, window=None) -> torch.Tensor:
    """Causal attention each key receives from the chosen real query rows (at a sliding-window layer: from
    rows less than `window` slots after it), averaged over heads, from a decoder attention module's raw q/k
    projection outputs [B, L, H*d]: per-head norms where the module has them (Qwen3), then its own RoPE,
    then `attention_scores` (float32 [B, L]). A gated attention's q projection (Qwen3.5: [B, L, H*2d], each
    head's query then its output gate) gives its queries."""
    b, seq_len = q_raw.shape[:2]
    heads = getattr(getattr(attn, "config", None), "num_attention_heads", None)
    if heads is not None and q_raw.shape[-1] == 2 * heads * attn.head_dim:
        q_raw = q_raw.view(b, seq_len, heads, 2 * attn.head_dim)[..., :attn.head_dim]
    q = q_raw.reshape(b, seq_len, -1, attn.head_dim)
    k = k_raw.view(b, seq_len, -1, attn.head_dim)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if pos is not None:
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        q, k = rope(q, k, *pos)
    mask = run.groups[-1].mask.bool()
    rows = mask if query_rows is None else (query_rows.bool() & mask)
    return attention_scores(q, k, attn.scaling, rows, causal=True, key_mask=mask, window=window)


def _dense_deepstack(kwargs, visual, embeds) -> list[torch.Tensor]:
    """Take Qwen3-VL's deepstack inputs off the language model's kwargs (the runtime adds them itself,
    in the pruned layout): one [B, L, D] tensor per layer, zero outside the visual slots."""
    masks, rows = kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"]
    kwargs["visual_pos_masks"] = kwargs["deepstack_visual_embeds"] = None
    if masks is None or not torch.equal(masks.to(visual.device), visual):
        raise RuntimeError("vtprune: Qwen3-VL's visual_pos_masks differ from the image/video placeholder slots")
    out = []
    for r in rows:
        dense = embeds.new_zeros(*visual.shape, r.shape[-1])
        dense[visual] = r.to(embeds.device, embeds.dtype)
        out.append(dense)
    return out


def _owner(cache) -> str | None:
    run = getattr(cache, _CACHE_ATTR, None)
    return run.owner if isinstance(run, Run) else None


def _refusing(cache) -> bool:
    return isinstance(vars(cache).get("update"), _Refusal)


def _stop_refusing(cache) -> None:
    """The cache's own `update` (and `get_conv_state`) again, or the ones the caller had set on it."""
    for name in REFUSED:
        refusal = vars(cache).get(name)
        if isinstance(refusal, _Refusal):
            if refusal.previous is None:
                delattr(cache, name)
            else:
                setattr(cache, name, refusal.previous)


def _release(cache) -> None:
    """Forget the pruned prefill `cache` held (it was reset for another prompt)."""
    vars(cache).pop(_CACHE_ATTR, None)
    _stop_refusing(cache)


def _orphan_message(method: str) -> str:
    return (f"vtprune: this KV cache holds a prefill pruned by {method or 'a strategy'} under another vtprune "
            "configuration: one since removed from the model (unpatch, the end of a `pruned` block, or patch "
            "again), or another model's. Its positions and layout are that configuration's, so this model would "
            "continue it wrongly: continue it under the configuration that filled it, or start a fresh cache "
            "(pass the whole conversation)")


# the cache methods a step calls before it changes anything: attention layers' `update`, and a hybrid model's
# linear-attention layers' `get_conv_state` (read first, then advanced in place; those layers can run first)
REFUSED = ("update", "get_conv_state")
FOLLOWED = ("reset", "crop")  # a static cache's methods whose effect the pruning record follows (see _Follow)


class _CacheMethod:
    """A method set on a KV cache instance, by `name`, that holds the cache weakly (a bound method would make a
    reference cycle, and the cache's tensors would then wait for a garbage collection after the caller drops
    it); a deep copy or pickle of the cache gets one of its own. `previous`: a method the caller had set on
    the instance."""

    def __init__(self, cache, previous=None, name: str = "update"):
        self.cache, self.previous = (weakref.ref(cache) if cache is not None else lambda: None), previous
        self.name = name

    def _cache(self):
        cache = self.cache()
        if cache is None:  # (on a copy.copy of a cache since freed, which shares this object)
            raise RuntimeError(_orphan_message(""))
        return cache

    def __deepcopy__(self, memo):
        cache = self.cache()  # (the cache's copy is in memo, made before its attributes are copied)
        return type(self)(memo.get(id(cache), cache), copy.deepcopy(self.previous, memo), self.name)

    def __reduce__(self):
        return type(self), (self.cache(), self.previous, self.name)


def _crop_message(what: str) -> str:
    return (f"vtprune: {what}. A pruned prompt is in the pruned layout, so only the positions decoded since can be "
            "cropped (by a negative count); to go back into the prompt, start from a fresh cache or a copy taken "
            "before")


class _Follow(_CacheMethod):
    """A static cache's `reset` or `crop` (by `name`) while it holds a pruned prefill: the record follows it
    without reading the cache's length (a device tensor, a host sync per decode step): reset() forgets it (the
    cache is for a new prompt), crop(-k) takes k decoded positions off its count (one that would cut into the
    pruned prompt is refused). `previous` is called in the cache's own method's place."""

    def __call__(self, *args, **kwargs):
        cache = self._cache()
        method = self.previous if self.previous is not None else getattr(type(cache), self.name).__get__(cache)
        run = getattr(cache, _CACHE_ATTR, None)
        if run is None:
            return method(*args, **kwargs)
        if self.name == "reset":
            out = method(*args, **kwargs)
            _release(cache)
            return out
        k = args[0] if args else next(iter(kwargs.values()))
        if not isinstance(k, int) or k > 0 or -k > run.decoded:
            raise NotImplementedError(_crop_message(
                f"crop({k!r}) of a static cache holding a pruned prefill would cut into the prompt or more: "
                f"{run.decoded} positions were decoded since"))
        out = method(*args, **kwargs)
        run.decoded += k
        return out


class _Refusal(_CacheMethod):
    """A pruned cache's `update` (or `get_conv_state`, by `name`) once its configuration is gone: refuses,
    unless the cache was reset for a new prompt. `previous` is put back after."""

    def __call__(self, *args, **kwargs):
        cache = self._cache()
        if self.name == "update":  # (key_states, value_states, layer_idx, ...)
            fresh = int(cache.get_seq_length(args[2] if len(args) > 2 else kwargs["layer_idx"])) == 0
        else:  # a linear-attention layer (some transformers count no positions there): the cache's length
            fresh = int(cache.get_seq_length()) == 0
        if fresh:
            _release(cache)
            return getattr(cache, self.name)(*args, **kwargs)
        raise RuntimeError(_orphan_message(getattr(cache, _CACHE_ATTR).method))


def kv_cache(call) -> object | None:
    """The KV cache in a transformers call's kwargs (a dict) or in its output: named `cache` from
    transformers 5.24, `past_key_values` before."""
    if is_dataclass(call):  # a ModelOutput: only its declared field (the other name warns)
        names = {f.name for f in fields(call)}
        return next((getattr(call, n) for n in ("cache", "past_key_values") if n in names), None)
    get = call.get if isinstance(call, dict) else lambda name: getattr(call, name, None)
    cache = get("cache")
    return cache if cache is not None else get("past_key_values")


@lru_cache(maxsize=None)
def _parameters(fn) -> frozenset:
    """The parameter names of `fn` (a transformers mask function, or a forward), read once per function: the
    in-LLM masks of every decode step ask. (A bound method's function is what is kept, not its instance.)"""
    return _function_parameters(getattr(fn, "__func__", fn))


@lru_cache(maxsize=None)
def _function_parameters(fn) -> frozenset:
    return frozenset(inspect.signature(fn).parameters)


def _cache_kwarg(fn) -> str:
    """The name `fn` (a transformers mask function) takes the KV cache by: `cache` or `past_key_values`."""
    return "cache" if "cache" in _parameters(fn) else "past_key_values"


def compileable(cache) -> bool:
    """A static-shape KV cache (StaticCache & co.): generate() hands the model prepared 4-D masks."""
    return bool(getattr(cache, "is_compileable", False))


def padding_mask(mask, seq_len: int):
    """The 2-D padding mask [B, seq_len] (1 = real token) behind a causal mask that transformers prepared
    for a static cache's prefill: a 4-D [B, 1, q, kv] mask (bool: True = attend; float: 0 = attend), or a
    mapping of them by layer type, or a 2-D mask already padded to the cache length. A real key is attended
    by its own query row at least (causal, and inside any sliding window), a padding key by none, so over
    the first `seq_len` keys "some row attends it" is the padding mask (the last row alone would see only a
    sliding window's last keys). None stays None (no padding)."""
    if isinstance(mask, dict):
        kinds = [k for k in ("full_attention", "sliding_attention") if k in mask]
        if not kinds:
            raise ValueError(f"vtprune: no full- or sliding-attention mask among the prepared masks {sorted(mask)}")
        mask = mask[kinds[0]]
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 4):
        raise ValueError("vtprune: expected a 2-D or 4-D attention mask from generate() with a static cache")
    if mask.dim() == 4:
        block = mask[:, 0, :, :seq_len]
        mask = (block if block.dtype == torch.bool else block == 0).any(dim=1)
    if mask.shape[1] < seq_len:
        raise ValueError(f"vtprune: the prepared attention mask covers {mask.shape[1]} of {seq_len} tokens, so the "
                         "prompt's padding cannot be recovered from it; size a static cache for the unpruned prompt "
                         "(as generate() does by default)")
    return mask[:, :seq_len].long()


def args_kwargs(kwargs):
    """A forward pre-hook with kwargs returns (args, kwargs); the language model takes kwargs only."""
    return (), kwargs
