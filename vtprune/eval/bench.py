"""Latency, memory and KV-cache figures: the unpatched model and each strategy side by side, in one run.

Per configuration (model, batch, strategy) and repetition, one `generate` of exactly `new_tokens`
tokens is timed end to end; hooks on the vision tower and the language model time the vision
encoder, the prefill (the language model's first call with vtprune's work around it, in-LLM selection
included) and each decode step. A strategy that selects before the language model (vision or projector
stage) does so outside the prefill: the table's "with selection" speed-up adds its selection time back,
so that the two kinds compare.
On CUDA the stage times are CUDA events and the peak memory is `max_memory_allocated` above the weights; on
the CPU, perf_counter and no memory figure. Selection time is `vtprune.stats`' `selection_ms` (CUDA
events too: the library adds no host sync to time it). KV bytes: on the eager path, those of the
(dynamic) cache a prefill returns; on the compiled path, those of the static cache `generate`
allocated, which is sized for the unpruned prompt plus the new tokens whether or not the prompt was
pruned.
Reported figures are medians over the repetitions after `warmup` untimed runs. `measure` times one row's
runs back to back; `measure_side_by_side` (what `vtprune bench` runs on the plain path) interleaves the
rows' runs, a round at a time, so that a stall or a drift in the machine's speed is shared by every row.

`compiled={...}` measures the opt-in small-batch path (`vtprune.compile_llm`: the language model under
`torch.compile`, a static KV cache); its rows are compared with the unpatched row of the same path.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..hooks.runtime import kv_cache
from .flops import visual_left, visual_token_counts


class _Timer:
    """Start/stop marks around every call of a module (CUDA events or perf_counter), outside every hook on
    it: made after `patch`, it starts before vtprune's pre-hooks (prepended) and stops after its hooks."""

    def __init__(self, module: torch.nn.Module, cuda: bool):
        self.cuda, self.calls, self._open = cuda, [], []
        self.handles = [module.register_forward_pre_hook(self._start, prepend=True),
                        module.register_forward_hook(self._stop)]

    def _mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def _start(self, *_):
        self._open.append(self._mark())

    def _stop(self, *_):
        self.calls.append((self._open.pop(), self._mark()))

    def times_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.calls]
        return [(b - a) * 1e3 for a, b in self.calls]

    def reset(self):
        self.calls, self._open = [], []

    def remove(self):
        for h in self.handles:
            h.remove()


def save_text(path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file, then a rename): a figures file saved
    after every row must not be left cut short when a deadline kills the run mid-write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_script_record(path, script: str, argv, **record) -> None:
    """A benchmarks/ script's JSON record at `path`: the command that made it (`script` with `argv`, or the
    process's own arguments where `argv` is None), then `record`'s fields."""
    args = argv if argv is not None else sys.argv[1:]
    save_text(path, json.dumps({"command": f"python benchmarks/{script} " + " ".join(args), **record}, indent=1) + "\n")


def vision_module(model) -> torch.nn.Module:
    inner = model.model
    mod = getattr(inner, "vision_tower", None) or getattr(inner, "visual", None)
    if mod is None:
        raise ValueError(f"{type(model).__name__}: no vision tower found (vision_tower / visual)")
    return mod


def kv_bytes(cache) -> int:
    """Bytes of the key/value tensors held by a transformers cache."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _suppressed(model) -> list[int]:
    cfg = model.config
    ids = {getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                            "vision_end_token_id", "image_token_index")}
    return sorted(i for i in ids if isinstance(i, int))


@dataclass
class BenchRow:
    method: str  # "unpatched" or the strategy
    options: dict
    batch: int
    visual_tokens: float  # per sample left at the last decoder layer (mean)
    vision_ms: float
    selection_ms: float
    prefill_ms: float  # language model's first call and vtprune's work around it (in-LLM selection included,
    # the selection made before the decoder not: that is prefill_with_selection_ms)
    decode_ms_per_token: float | None  # None: --new-tokens 1 (no decode step)
    generate_ms: float  # end to end, `new_tokens` tokens
    peak_mib: float | None  # CUDA: peak allocated above the weights during generate
    kv_bytes: int  # eager: the cache after the prefill; compiled: the static cache generate() allocated
    path: str = "eager"  # "compiled": vtprune.compile_llm (torch.compile + static cache)
    selection_in_prefill_ms: float = 0.0  # the part of selection_ms inside prefill_ms (selection in the decoder)
    # [fastest, slowest] of the timed runs, per column: "prefill", "generate" (the columns above are medians)
    spread: dict = field(default_factory=dict)
    runs: int = 0  # timed runs behind the medians (fewer than --reps in a run cut short)

    @property
    def prefill_with_selection_ms(self) -> float:
        """The prefill plus the selection that ran before the language model (each millisecond counted once)."""
        return self.prefill_ms + self.selection_ms - self.selection_in_prefill_ms

    def to_dict(self) -> dict:
        return {**asdict(self), "prefill_with_selection_ms": self.prefill_with_selection_ms}


class _Config:
    """One row's configuration (the unpatched model, or a strategy with its options; eager or compiled) and
    its runs: `open()` sets it up on the model and takes it down again, `once()` times one `generate`."""

    def __init__(self, model, inputs: dict, method: str | None, options: dict | None, new_tokens: int,
                 compiled: dict | None):
        from ..patching import compiled_options

        self.model, self.inputs, self.method, self.options = model, inputs, method, dict(options or {})
        self.compiled = compiled
        self.cuda = next(model.parameters()).is_cuda
        self.gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                        suppress_tokens=_suppressed(model))
        self.callers = compiled_options(model)  # a model the caller compiled runs compiled: its rows are "compiled"
        self.static = compiled is not None or self.callers is not None
        # compiled path: the bytes of the static cache generate() hands the language model, read after the
        # forward that allocates it. No reference is kept: each generate() makes a new cache, and one freed at
        # the end of the previous run can take the same address, which CUDA graphs (recorded on those
        # static addresses) need in order to replay instead of recording again.
        self.static_kv = None

    @contextlib.contextmanager
    def open(self):
        import vtprune

        from ..patching import cache_length, set_cache_length, unpatched

        model = self.model
        with vtprune.pruned(model, self.method, **self.options) if self.method is not None else unpatched(model):
            self.vision_t = _Timer(vision_module(model), self.cuda)
            self.lm_t = _Timer(model.model.language_model, self.cuda)

            def grab_cache(module, args, kwargs, output):
                cache = kv_cache(kwargs)
                if cache is not None:
                    self.static_kv = kv_bytes(cache)

            grab = model.model.language_model.register_forward_hook(grab_cache, with_kwargs=True) if self.static else None
            # else the static cache of an earlier, longer prompt (generate() keeps the longest on the model) would
            # be this row's KV figure; put back after
            length = cache_length(model)
            try:
                if self.compiled is not None:
                    vtprune.compile_llm(model, **self.compiled)
                set_cache_length(model, (False, None))  # after compile_llm: uncompiling a caller's compile puts one back
                yield self
            finally:
                self.vision_t.remove()
                self.lm_t.remove()
                if grab is not None:
                    grab.remove()
                if self.compiled is not None:  # a model the caller compiled is compiled again with its options
                    vtprune.uncompile_llm(model)
                    if self.callers is not None:
                        vtprune.compile_llm(model, **self.callers)
                set_cache_length(model, length)

    def once(self) -> dict:
        """One `generate`, timed (inside `open()`)."""
        import vtprune

        model = self.model
        self.vision_t.reset()
        self.lm_t.reset()
        if self.cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model.generate(**self.inputs, **self.gen)
        if self.cuda:
            torch.cuda.synchronize()
        total = (time.perf_counter() - t0) * 1e3
        lm = self.lm_t.times_ms()
        st = vtprune.stats(model) if self.method is not None else None
        # the language model's first call, vtprune's work around it included (compacting the sequence, masks,
        # positions) but not the selection made before the decoder: that is the selection column
        before_llm = st.selection_ms - st.selection_in_llm_ms if st is not None else 0.0
        return dict(
            vision=sum(self.vision_t.times_ms()), prefill=lm[0] - before_llm,
            decode=statistics.mean(lm[1:]) if len(lm) > 1 else None,  # (one new token: no decode step)
            generate=total, selection=st.selection_ms if st is not None else 0.0,
            in_llm=st.selection_in_llm_ms if st is not None else 0.0,
            peak=(torch.cuda.max_memory_allocated() - base) / 2**20 if self.cuda else None,
            visual=statistics.mean(visual_left(st, visual_token_counts(model.config, self.inputs)))
            if st is not None and st.visual_after else None)

    def kv(self) -> int:
        """The row's KV bytes (inside `open()`, after a run): the static cache, allocated in full, or the dynamic
        cache a prefill returns, what it holds."""
        if self.static:
            return self.static_kv
        return kv_bytes(kv_cache(self.model(**self.inputs, use_cache=True, logits_to_keep=1)))

    def row(self, timed: list[dict], kv: int) -> BenchRow:
        """The row from its timed runs: medians, and the prefill's and generate's spread."""
        def med(key):
            vals = [r[key] for r in timed if r[key] is not None]
            return statistics.median(vals) if vals else None

        spread = {k: [min(r[k] for r in timed), max(r[k] for r in timed)] for k in ("prefill", "generate")}
        visual = med("visual")
        if visual is None:  # unpatched (or nothing pruned): the placeholders in the input
            visual = statistics.mean(visual_token_counts(self.model.config, self.inputs))
        return BenchRow(self.method or "unpatched", self.options, self.inputs["input_ids"].shape[0], visual,
                        med("vision"), med("selection"), med("prefill"), med("decode"), med("generate"), med("peak"),
                        kv, "compiled" if self.static else "eager", med("in_llm"), spread, len(timed))


@torch.no_grad()
def measure(model, inputs: dict, method: str | None = None, options: dict | None = None, new_tokens: int = 8,
            reps: int = 5, warmup: int = 1, compiled: dict | None = None) -> BenchRow:
    """One row: `generate` timed `reps` times after `warmup` runs, back to back. `compiled`: measure the
    compiled path, with these `vtprune.compile_llm` options ({} = its defaults); its first runs at a new shape
    compile, so give it a few warm-up runs."""
    config = _Config(model, inputs, method, options, new_tokens, compiled)
    with config.open():
        runs = [config.once() for _ in range(warmup + reps)]
        kv = config.kv()
    return config.row(runs[warmup:], kv)


@torch.no_grad()
def measure_side_by_side(model, inputs: dict, configs: list[tuple[str | None, dict | None]], new_tokens: int = 8,
                         reps: int = 5, warmup: int = 1, done=None) -> list[BenchRow]:
    """Rows of `configs` ((method, options); method None: the unpatched model) on the plain path, their timed
    runs interleaved: after each configuration's `warmup` runs, round r runs each configuration once, in turn,
    so that a stall or a drift in the machine's speed (clocks, another process) falls on every row alike
    instead of on one. `done(rows)`, if given, is called after each round with the rows so far (medians
    over the rounds finished). A model the caller compiled (`vtprune.compile_llm`) has its rows measured one
    after the other, as `measure` does: switching configuration between runs would recompile it."""
    from ..patching import compiled_options

    if reps < 1:
        raise ValueError(f"reps must be at least 1 (the rows are medians of timed runs), got {reps}")
    if compiled_options(model) is not None:
        rows = []
        for method, options in configs:
            rows.append(measure(model, inputs, method, options, new_tokens, reps, warmup))
            if done is not None:
                done(list(rows))
        return rows
    setups = [_Config(model, inputs, method, options, new_tokens, None) for method, options in configs]
    kvs, timed = [], [[] for _ in setups]
    for config in setups:
        with config.open():
            for _ in range(warmup):
                config.once()
            kvs.append(config.kv())  # (before the rounds: a strategy the model refuses fails before any is timed)
    rows = []
    for _ in range(reps):
        for config, times in zip(setups, timed):
            with config.open():
                times.append(config.once())
        rows = [config.row(times, kv) for config, times, kv in zip(setups, timed, kvs)]
        if done is not None:
            done(rows)
    return rows


NOISY = 1.5  # markdown() lists the rows whose slowest timed run took over this many times their fastest


def markdown(rows: list[BenchRow]) -> str:
    """One table; the speed-up columns compare each row with the unpatched row of its batch size and path. The
    prefill's is the language model's first call (and vtprune's bookkeeping around it); "with selection" adds
    the selection time of a strategy that selects before the language model (an llm-stage strategy's is
    already in its prefill)."""
    base = {(r.batch, r.path): r for r in rows if r.method == "unpatched"}
    head = ("| batch | path | method | options | visual tokens | vision ms | selection ms | prefill ms | prefill speed-up "
            "| with selection | decode ms/token | generate ms | generate speed-up | peak MiB | KV MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        b = base.get((r.batch, r.path))
        sp = f"{b.prefill_ms / r.prefill_ms:.2f}x" if b else "-"
        sps = f"{b.prefill_ms / r.prefill_with_selection_ms:.2f}x" if b else "-"
        sg = f"{b.generate_ms / r.generate_ms:.2f}x" if b else "-"
        opts = ", ".join(f"{k}={v}" for k, v in r.options.items()) or "-"
        peak = f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-"
        decode = f"{r.decode_ms_per_token:.2f}" if r.decode_ms_per_token is not None else "-"
        lines.append(f"| {r.batch} | {r.path} | {r.method} | {opts} | {r.visual_tokens:.0f} | {r.vision_ms:.2f} | "
                     f"{r.selection_ms:.2f} | {r.prefill_ms:.2f} | {sp} | {sps} | {decode} | "
                     f"{r.generate_ms:.1f} | {sg} | {peak} | {r.kv_bytes / 2**20:.3f} |")
    noisy = [f"batch {r.batch} {r.path} {r.method}: {k} {lo:.2f}-{hi:.2f} ms" for r in rows
             for k, (lo, hi) in r.spread.items() if hi > NOISY * lo]
    if noisy:
        lines.append(f"\nNoisy rows (the slowest timed run over {NOISY}x the fastest; the table shows medians): "
                     + "; ".join(noisy) + ".")
    return "\n".join(lines)
