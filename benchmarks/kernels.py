"""Kernel benchmark: the plain-torch references and the Triton kernels side by side, in one run.

  python benchmarks/kernels.py --out results/kernels_gpu.json           # on a CUDA machine
  python benchmarks/kernels.py --quick --out /tmp/kernels_quick.json    # tiny shapes (CPU: interpreter)

Sections
  greedy     the whole DivPrune selection (normalise + similarity + all greedy steps) from bf16
             features [B, N, D]: reference vs Triton, indices compared, for N in {576, 2304, 2880, 5000},
             keep in {64, 128, 192, 320}, D in {1024, 4096}, batch in {1, 8} (the issue's three targets
             first); plus the Triton path's split into Gram and greedy launches.
  attention  attention received per key (HiPrune / ToDRE / VFlowOpt signals on CLIP-L/336 shapes, FastV's
             last-row scores on a 7B LLM layer): time, peak extra memory and max relative difference.
  tower      a LLaVA-1.5 vision tower (CLIP-L/336, random weights, SDPA, batch 8) alone vs with HiPrune's
             two attention signals captured by vtprune: the tower's own time and peak memory inside the
             forward (hooks around it), and the whole prefill of a 1-layer LM beside them.
  e2e        LLaVA-1.5-7B-shaped model (random weights, bf16, batch 1): prefill unpatched vs DivPrune
             keep=64; the selection's time (vtprune.stats) as a share of the prefill time it saves.
Each row is written to --out as soon as it is measured (a run cut short keeps what it finished).
Times are medians over --reps runs after warm-up, with CUDA events on the GPU (perf_counter on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent  # off the path: this file would shadow the `kernels` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # that transformers imports
sys.path.insert(0, str(HERE.parent))
from vtprune.eval.bench import save_text  # noqa: E402
from vtprune.eval.configs import CLIP_L336, LLAMA2_7B  # noqa: E402
from vtprune.kernels import attention_scores_torch, greedy_select, greedy_select_torch, triton_available  # noqa: E402


def timed(fn, reps: int, warmup: int = 2, device: str = "cuda") -> tuple[float, object]:
    """Median milliseconds of fn() and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def peak_extra_mib(fn, device: str) -> float | None:
    """Peak memory fn() allocates beyond what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench_greedy(cases, reps, device, log):
    from vtprune.kernels.greedy_triton import cosine_gram_triton, greedy_from_gram_triton, greedy_select_triton

    rows = []
    for n, keep, d, b in cases:
        g = torch.Generator(device=device).manual_seed(n * 7 + d + b)
        x = torch.randn(b, n, d, device=device, generator=g).to(torch.bfloat16)
        ref_ms, ref = timed(lambda: greedy_select_torch(x, keep), reps, device=device)
        tri_ms, tri = timed(lambda: greedy_select_triton(x, keep), reps, device=device)
        sim = cosine_gram_triton(x)
        first = torch.zeros(b, dtype=torch.long, device=device)
        gram_ms, _ = timed(lambda: cosine_gram_triton(x), reps, device=device)
        steps_ms, _ = timed(lambda: greedy_from_gram_triton(sim, keep, first), reps, device=device)
        row = dict(n=n, keep=keep, d=d, batch=b, torch_ms=ref_ms, triton_ms=tri_ms, speedup=ref_ms / tri_ms,
                   triton_gram_ms=gram_ms, triton_steps_ms=steps_ms, same_indices=bool(torch.equal(ref, tri)),
                   differing_picks=int((ref != tri).sum()))
        rows.append(row)
        log(f"greedy N={n:5d} keep={keep:4d} D={d:5d} B={b}: torch {ref_ms:8.3f} ms  triton {tri_ms:7.3f} ms "
            f"(gram {gram_ms:.3f} + steps {steps_ms:.3f})  x{ref_ms / tri_ms:6.1f}  same={row['same_indices']}")
    return rows


def bench_attention(cases, reps, device, log):
    from vtprune.kernels.attention_triton import attention_scores_triton

    rows = []
    for name, b, hq, hk, nq, nk, d, index, causal in cases:
        g = torch.Generator(device=device).manual_seed(nq + nk + b)
        q = torch.randn(b, hq, nq, d, device=device, generator=g).to(torch.bfloat16)
        k = torch.randn(b, hk, nk, d, device=device, generator=g).to(torch.bfloat16)
        qi = None if index is None else torch.tensor(index, device=device)
        ref_ms, ref = timed(lambda: attention_scores_torch(q, k, d ** -0.5, qi, causal=causal), reps, device=device)
        tri_ms, tri = timed(lambda: attention_scores_triton(q, k, d ** -0.5, qi, causal=causal), reps, device=device)
        rel = ((tri - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        row = dict(case=name, batch=b, heads=hq, kv_heads=hk, nq=nq, nk=nk, d=d, rows=index, causal=causal,
                   torch_ms=ref_ms, triton_ms=tri_ms, speedup=ref_ms / tri_ms, max_rel_diff=rel,
                   torch_peak_mib=peak_extra_mib(lambda: attention_scores_torch(q, k, d ** -0.5, qi, causal=causal), device),
                   triton_peak_mib=peak_extra_mib(lambda: attention_scores_triton(q, k, d ** -0.5, qi, causal=causal), device))
        rows.append(row)
        log(f"attention {name:<26}: torch {ref_ms:7.3f} ms  triton {tri_ms:7.3f} ms  x{ref_ms / tri_ms:5.1f}  "
            f"max rel diff {rel:.1e}  peak MiB {row['torch_peak_mib']} -> {row['triton_peak_mib']}")
    return rows


def llava(vision: dict, text: dict, image_tokens: int, device, dtype):
    import transformers as tf

    cfg = tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=text["vocab_size"] - 1,
                         image_seq_length=image_tokens, vision_feature_layer=-2, vision_feature_select_strategy="default")
    with torch.device(device):
        model = tf.LlavaForConditionalGeneration(cfg).to(dtype).eval()
    model.set_attn_implementation("sdpa")
    return model


def llava_inputs(model, batch: int, image_tokens: int, text: int, device, dtype):
    vc, tc = model.config.vision_config, model.config.text_config
    ids = torch.randint(3, tc.vocab_size - 2, (batch, 1 + image_tokens + text), device=device)
    ids[:, 0] = 1
    ids[:, 1:1 + image_tokens] = model.config.image_token_id
    pix = torch.randn(batch, 3, vc.image_size, vc.image_size, device=device, dtype=dtype)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pix)


def tower_span(model, fn, reps: int, device: str) -> tuple[float, float | None]:
    """(median ms, median peak MiB above its start) of the vision tower's own forward inside fn(), a whole
    model forward: the tower alone, so that what pruning saves in the language model does not hide what
    capturing signals costs in the tower."""
    from vtprune.eval.bench import _Timer, vision_module

    tower, cuda = vision_module(model), device == "cuda"
    timer, peaks, start = _Timer(tower, cuda), [], []

    def pre(*_):
        if cuda:
            start.append(torch.cuda.memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    def post(*_):
        if cuda:
            peaks.append((torch.cuda.max_memory_allocated() - start.pop()) / 2**20)

    hooks = [tower.register_forward_pre_hook(pre), tower.register_forward_hook(post)]
    try:
        for _ in range(2):  # warm-up
            fn()
        timer.reset()
        peaks.clear()
        for _ in range(reps):
            fn()
        times = timer.times_ms()
    finally:
        timer.remove()
        for h in hooks:
            h.remove()
    return statistics.median(times), (statistics.median(peaks) if peaks else None)


def bench_model(name, model, inputs, method, options, reps, device, log, tower: bool = False):
    """Prefill (one forward, logits of the last token) unpatched vs patched; tower=True: also the vision
    tower's own time and peak memory inside that forward, unpatched vs patched."""
    import vtprune

    @torch.no_grad()
    def prefill():
        return model(**inputs, logits_to_keep=1).logits

    base_ms, _ = timed(prefill, reps, device=device)
    base_mib = peak_extra_mib(prefill, device)
    base_tower = tower_span(model, prefill, reps, device) if tower else None
    with vtprune.pruned(model, method, **options):
        ms, _ = timed(prefill, reps, device=device)
        mib = peak_extra_mib(prefill, device)
        patched_tower = tower_span(model, prefill, reps, device) if tower else None
        st = vtprune.stats(model)
    row = dict(case=name, method=method, options=options, batch=inputs["input_ids"].shape[0],
               unpatched_ms=base_ms, patched_ms=ms, time_ratio=ms / base_ms, unpatched_peak_mib=base_mib,
               patched_peak_mib=mib, peak_ratio=(mib / base_mib) if base_mib else None,
               visual_before=st.visual_before, visual_after=st.visual_after, selection_ms=st.selection_ms)
    log(f"{name:<18} {method:<9} {options}: unpatched {base_ms:8.2f} ms  patched {ms:8.2f} ms  "
        f"(x{ms / base_ms:.3f})  peak MiB {base_mib} -> {mib}")
    if tower:
        (t0, m0), (t1, m1) = base_tower, patched_tower
        row.update(unpatched_tower_ms=t0, patched_tower_ms=t1, tower_time_ratio=t1 / t0, unpatched_tower_peak_mib=m0,
                   patched_tower_peak_mib=m1, tower_peak_ratio=(m1 / m0) if m0 else None)
        log(f"{'':<18} vision tower alone: {t0:8.2f} ms -> {t1:8.2f} ms (x{t1 / t0:.3f})  peak MiB {m0} -> {m1}"
            + (f" (x{m1 / m0:.3f})" if m0 else ""))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a smoke run; the CPU uses Triton's interpreter)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--sections", default="greedy,attention,tower,e2e")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # Triton's interpreter, read when the kernels are defined (imported below, lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not triton_available():
        raise SystemExit("Triton is not installed: nothing to compare")
    if device == "cpu" and not args.quick:
        raise SystemExit("no CUDA device: run with --quick (tiny shapes, Triton's interpreter) or on a GPU")
    sections = set(args.sections.split(","))
    reps = 2 if args.quick else args.reps
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    import transformers as tf
    import triton

    result = {"command": " ".join(["python", "benchmarks/kernels.py"] + (argv if argv is not None else sys.argv[1:])),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)",
              "torch": torch.__version__, "triton": triton.__version__, "transformers": tf.__version__,
              "complete": False, "log": lines}

    def save():  # after every row: a run cut short keeps the rows it finished
        save_text(args.out, json.dumps(result, indent=1) + "\n")

    if "greedy" in sections:
        if args.quick:
            cases = [(40, 8, 16, 1), (70, 16, 24, 2)]
        else:  # the three targets first (a run cut short has them), then the rest of the grid
            cases = list(dict.fromkeys([(576, 64, 4096, 1), (2880, 320, 4096, 1), (2880, 320, 4096, 8)] + [
                (n, k, d, b) for n in (576, 2304, 2880, 5000) for k in (64, 128, 192, 320)
                for d in (1024, 4096) for b in (1, 8)]))
        result["greedy"] = []
        for case in cases:
            result["greedy"] += bench_greedy([case], reps, device, log)
            save()
    if "attention" in sections:
        if args.quick:
            cases = [("vit all rows", 2, 4, 4, 20, 20, 16, None, False), ("llm last row", 1, 4, 2, 30, 30, 16, [29], True)]
        else:
            cases = [("clip-l336 all rows b8", 8, 16, 16, 577, 577, 64, None, False),
                     ("clip-l336 cls row b8", 8, 16, 16, 577, 577, 64, [0], False),
                     ("llama7b last row b1", 1, 32, 32, 640, 640, 128, [639], True),
                     ("llama7b all rows b1", 1, 32, 32, 640, 640, 128, None, True),
                     ("llava-next last row b4", 4, 32, 32, 2944, 2944, 128, [2943], True),
                     ("qwen2-vl-7b gqa last row b1", 1, 28, 4, 1300, 1300, 128, [1299], True)]
        result["attention"] = []
        for case in cases:
            result["attention"] += bench_attention([case], reps, device, log)
            save()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if "tower" in sections:
        if args.quick:
            vision = dict(CLIP_L336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, projection_dim=32)
            text, n_img, batch = dict(LLAMA2_7B, vocab_size=256, pad_token_id=0, hidden_size=32, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1), 16, 2
        else:
            vision, n_img, batch = CLIP_L336, 576, 8
            text = dict(LLAMA2_7B, num_hidden_layers=1)
        model = llava(vision, text, n_img, device, dtype)
        inputs = llava_inputs(model, batch, n_img, 16, device, dtype)
        result["tower"] = [bench_model("tower+1-layer LM", model, inputs, "hiprune", {"keep": max(1, n_img // 9)},
                                       reps, device, log, tower=True)]
        del model
        save()
    if "e2e" in sections:
        if args.quick:
            vision = dict(CLIP_L336, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          image_size=56, projection_dim=32)
            text, n_img = dict(LLAMA2_7B, vocab_size=256, pad_token_id=0, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                               num_key_value_heads=4, num_hidden_layers=2), 16
        else:
            vision, text, n_img = CLIP_L336, LLAMA2_7B, 576
        model = llava(vision, text, n_img, device, dtype)
        inputs = llava_inputs(model, 1, n_img, 48, device, dtype)
        keep = max(1, n_img // 9)
        row = bench_model("llava-1.5-7b shape", model, inputs, "divprune", {"keep": keep}, reps, device, log)
        feats = torch.randn(1, n_img, text["hidden_size"], device=device, dtype=dtype)
        greedy_ms, _ = timed(lambda: greedy_select(feats, keep), reps, device=device)
        # the strategy's own selection as vtprune measured it in the forward (synchronised), and the kernel alone
        selection, saved = row["selection_ms"], row["unpatched_ms"] - row["patched_ms"]
        row.update(greedy_kernel_ms=greedy_ms, prefill_saved_ms=saved,
                   selection_share_of_saved=selection / saved if saved > 0 else None)
        share = row["selection_share_of_saved"]
        log(f"divprune selection {selection:.3f} ms (greedy_select alone {greedy_ms:.3f} ms) = "
            + (f"{share:.1%} of the {saved:.2f} ms saved (eager prefill; the compiled path: bench_llava15_7b_compiled)"
               if share is not None else f"(pruning saved nothing here: {saved:+.2f} ms; eager batch 1 is host-bound)"))
        result["e2e"] = [row]
        save()
    result["complete"] = True
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
