"""lmms-eval plugin: `python -m lmms_eval --model vtprune --model_args pretrained=M,method=divprune,keep=64`.

Registered through lmms-eval's `lmms_eval.models` entry point (pyproject.toml -> `manifests`), so
lmms-eval itself is not edited. `Vtprune` is the simple protocol (prompt text + `doc_to_visual`),
`VtpruneChat` the chat protocol (`doc_to_messages`), which lmms-eval 0.7 picks by default;
`--force_simple` selects the other. Both batch `generate_until` requests (left padding; every
sample is pruned on its own, so answers do not depend on the batch), and the simple class also
answers `loglikelihood` (multiple-choice tasks) with lmms-eval's convention: the mean loss.
Decoding follows lmms-eval's own models: sampling only when the task's temperature is > 0.

--model_args: `pretrained` (a local model directory or a name `vtprune.eval.models.load` knows),
`method` (a registered strategy; omitted or "none": unpatched), `keep` or `ratio`, any option of the
method, and `dtype` ("auto", "float16", "bfloat16", "float32"), `attn` ("sdpa", "eager", ...),
`random_weights` (bundled architectures without trained weights: plumbing only), `max_new_tokens`
(used when the task sets none; default 64), `max_frames_num` (frames read from a video), `fps` (sample that many
frames a second instead, at most max_frames_num), `min_pixels` / `max_pixels` (Qwen-VL: the pixel range each
image is resized into, as lmms-eval's Qwen models take them), `stats_path` (a folder: each rank writes its
pruning figures to `vtprune_stats_rank<R>.json` there, as lmms-eval's own throughput log is per process).

The pruning figures (visual tokens before/after, selection time, analytic prefill TFLOPs from the
real per-layer token counts) go to lmms-eval's `results["throughput"]` as `avg_vtprune_*` (each
request call's per-sample means; lmms-eval's padding copies that even out the ranks are left out),
and each answer's prompt length after pruning to its token counts. Beam search prunes every beam
alike; its figures count each prompt once.

lmms-eval's task index has no entry point, so the bundled offline tasks (`vtprune_shapes`,
`vtprune_shapes_dynres`, `vtprune_shapes_mc`, `vtprune_shapes_video`) are found with `--include_path "$(vtprune lmms-tasks)"` (TASKS).

Videos (a path that is not an image, or a dict with a `video_start` / `video_end` segment) are read with
PyAV by `clips.read`: `max_frames_num` frames (default 32; or `fps` frames a second) evenly spaced from the
first to the last, passed to the processor with their metadata (Qwen2.5-VL's time steps and Qwen3-VL's
timestamps come from it).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms

# Nothing from lmms_eval.models at import time: importing that package loads the entry points, this
# module among them, which must then be complete (imports of lmms_eval.models are inside functions).

TASKS = Path(__file__).resolve().parent / "lmms_tasks"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "auto": "auto"}
UNPATCHED = (None, "", "none")
PLACEHOLDER = "<image>"  # where an lmms-eval task's simple prompt puts an image (LLaVA's convention)


def manifests() -> list:
    """The lmms-eval model manifest (entry point `lmms_eval.models: vtprune`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="vtprune", simple_class_path=f"{__name__}.Vtprune",
                          chat_class_path=f"{__name__}.VtpruneChat")]


def _value(v):
    """lmms-eval keeps quotes around values (`x="a"` -> '"a"') and brackets as text (`schedule=[[1,0.5]]`
    -> '[[1,0.5]]'); numbers and booleans arrive parsed. Bracketed literals become lists / tuples, and
    none / None / null becomes None."""
    if isinstance(v, str) and v in ("none", "None", "null"):
        return None
    if isinstance(v, str) and len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        return v[1:-1]
    if isinstance(v, str) and len(v) >= 2 and (v[0], v[-1]) in (("[", "]"), ("(", ")")):
        import ast

        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


def _flag(name: str, v) -> bool:
    """A boolean model argument: true / false as lmms-eval passes them (parsed, quoted or spelled out)."""
    v = _value(v)
    if v is None or isinstance(v, bool):
        return bool(v)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1", "false", "no", "0"):
        return v.strip().lower() in ("true", "yes", "1")
    raise ValueError(f"{name} must be true or false, got {v!r}")


def _number(v) -> float | None:
    """A numeric model argument as lmms-eval passes it (parsed, or a string), else None (booleans too)."""
    try:
        return float(v) if not isinstance(v, bool) else None
    except (TypeError, ValueError, OverflowError):  # (an int too large for a float)
        return None


def _count(name: str, v) -> int:
    """A positive whole-number model argument."""
    v = _value(v)
    f = _number(v)
    n = int(f) if f is not None and f.is_integer() else None  # (inf and nan are not whole)
    if n is None or n < 1:
        raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    return n


def _rate(v) -> float | None:
    """The `fps` model argument: frames sampled per second of video (None: max_frames_num frames a video)."""
    v = _value(v)
    if v is None:
        return None
    f = _number(v)
    if f is None or not f > 0 or f == float("inf"):
        raise ValueError(f"fps must be a number > 0 (frames sampled per second of video), got {v!r}")
    return f


def _image_pixels(processor, least: int | None, most: int | None) -> None:
    """`min_pixels` / `max_pixels`: the pixel range a Qwen-VL image processor resizes each image into
    (lmms-eval's Qwen models take the same two arguments; their defaults differ per model, e.g. Qwen2-VL
    max_pixels=602112, Qwen2.5-VL 1605632). None keeps the checkpoint's. Videos keep their own processor's
    (a per-frame range on Qwen2-VL, a per-clip one on Qwen3-VL)."""
    if least is None and most is None:
        return
    image = getattr(processor, "image_processor", None)
    size = getattr(image, "size", None)
    if getattr(image, "merge_size", None) is None or getattr(size, "longest_edge", None) is None:
        raise ValueError(f"min_pixels / max_pixels set the pixel range of Qwen-VL's dynamic-resolution images; "
                         f"{type(image).__name__} resizes to its own fixed size")
    from transformers.image_processing_utils import SizeDict

    ours = ", the checkpoint's"
    shown = [f"{size.shortest_edge}{ours}" if least is None else str(least),
             f"{size.longest_edge}{ours}" if most is None else str(most)]
    least = size.shortest_edge if least is None else least
    most = size.longest_edge if most is None else most
    if least > most:
        raise ValueError(f"min_pixels ({shown[0]}) must not exceed max_pixels ({shown[1]}); set both")
    image.size = SizeDict(**{**dict(size), "shortest_edge": least, "longest_edge": most})


def _typed(method, options: dict) -> dict:
    """lmms-eval parses every number with a sign or exponent as a float (`deep_layer=-2` -> -2.0,
    `keep=1e2` -> 100.0): a whole float given to an option declared int (and not float) becomes an int."""
    if method in UNPATCHED:
        return options
    import dataclasses

    from ..methods.registry import get_method

    try:
        types = {f.name: str(f.type) for f in dataclasses.fields(get_method(method).Config)}
    except (TypeError, ValueError):
        return options  # an unknown method: patch() says so
    out = {}
    for k, v in options.items():
        declared = types.get(k, "")
        if isinstance(v, float) and v.is_integer() and "int" in declared and "float" not in declared:
            v = int(v)
        out[k] = v
    return out


def _device(device) -> torch.device:
    """One process per GPU under `accelerate launch` / torchrun (LOCAL_RANK); else `device` or the default."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Vtprune(lmms):
    """A Hugging Face LLaVA / Qwen-VL model patched with a vtprune strategy (simple protocol)."""

    is_simple = True

    def __init__(self, pretrained: str, method: str | None = None, batch_size=1, device: str | None = None,
                 max_batch_size=None, dtype: str = "auto", attn: str = "sdpa", random_weights: bool = False,
                 max_new_tokens: int = 64, stats_path: str | None = None, max_frames_num=32, fps=None,
                 min_pixels=None, max_pixels=None, **options) -> None:
        super().__init__()
        from . import models

        self.batch_size = _count("batch_size", batch_size) if str(batch_size) != "auto" else 1
        dtype = _value(dtype)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self._device = _device(_value(device))
        model, processor = models.load(str(_value(pretrained)), random_weights=_flag("random_weights", random_weights),
                                       attn=_value(attn), dtype=DTYPES[dtype])
        if processor is None:
            raise ValueError(f"{pretrained!r} has no processor: lmms-eval needs a model that reads images "
                             "(a bundled model or a local checkpoint directory)")
        if getattr(processor, "tokenizer", None) is not None:
            processor.tokenizer.padding_side = "left"  # batched generation continues every row at the end
        self.model = model.to(self._device).eval()
        self.processor = processor
        _image_pixels(processor, *(None if _value(v) is None else _count(name, v)
                                   for name, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels))))
        self.tokenizer = processor.tokenizer
        self.max_new_tokens = _count("max_new_tokens", max_new_tokens)
        self.max_frames = _count("max_frames_num", max_frames_num)
        self.fps = _rate(fps)
        self.stats_path = _value(stats_path)
        self.method = _value(method)
        options = {k: _value(v) for k, v in options.items()}
        filed = {}  # a config file's options
        if options.get("config") is not None:
            from ..patching import load_config

            file_method, filed = load_config(options["config"])
            if method is None:  # the method the file names (as patch() takes it)
                self.method = file_method
        self.options = _typed(self.method, options)
        if self.method in UNPATCHED:
            if self.options:
                raise ValueError(f"options {sorted(self.options)} given without a method")
            self.method = None
        else:
            import vtprune

            norm = models.pixel_norm(self.method, processor, given={*self.options, *filed})
            vtprune.patch(self.model, self.method, **self.options, **norm)  # validates the method and its options
        self.records: list[dict] = []  # one per generated batch: pruning figures (see summary())
        self.first_inputs: dict | None = None  # the first batch's model inputs (sweeps time a prefill on it)
        self.reuse = False  # True: keep the model across evaluations (see clean)

    def clean(self):
        """lmms-eval calls this after every evaluation and it deletes the model (to free memory for judge
        models); a sweep evaluates one model many times, so with `reuse` set only caches are emptied."""
        if not self.reuse:
            return super().clean()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @property
    def device(self):
        return self._device

    # prompts -----------------------------------------------------------------------------------

    def _prompt(self, text: str, n_images: int, messages: list | None = None, n_videos: int = 0) -> str:
        """The model's prompt: its chat template when the processor has one (`messages`, or one user
        turn of the videos, images and `text`, see `_content`); else the bundled tiny models' format."""
        if getattr(self.processor, "chat_template", None):
            if messages is None:
                messages = [{"role": "user", "content": _content(text, n_images, n_videos)}]
            return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        from . import tinyvlm

        if n_images + n_videos != 1:
            raise ValueError("a model without a chat template takes one image or video per prompt, got "
                             f"{n_images} image(s) and {n_videos} video(s)")
        return tinyvlm.prompt(tinyvlm.family_of(self.model), " ".join(text.replace(PLACEHOLDER, " ").split()),
                              video=bool(n_videos))

    def _inputs(self, prompts: list[str], images: list, videos: list = ()) -> dict:
        """The processor's tensors; `videos` are (frames, metadata) pairs already sampled (see `_video`)."""
        from .models import to_model

        kw = {}
        if videos:
            kw = dict(videos=[f for f, _ in videos], video_metadata=[m for _, m in videos], do_sample_frames=False)
        inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt", **kw)
        inputs.pop("token_type_ids", None)
        return to_model(dict(inputs), self.model)

    def _video(self, source):
        """(frames, metadata) of a video a task gives: a path, or a dict with its path under url / path /
        video and a `video_start` / `video_end` segment in seconds. `max_frames_num` frames (or `fps` a
        second) evenly spaced, a multiple of the model's temporal patch (see `clips.read`)."""
        from . import clips

        start = end = None
        if isinstance(source, dict):
            start, end = source.get("video_start"), source.get("video_end")
            given = source
            source = source.get("url") or source.get("path") or source.get("video")
            if source is None:
                raise ValueError(f"a video given as a dict needs its file under 'url', 'path' or 'video': {given!r}")
        if not isinstance(source, (str, os.PathLike)):
            raise NotImplementedError(f"vtprune's lmms-eval model reads videos from files, got {type(source).__name__}")
        if getattr(self.model.config, "video_token_id", None) is None or getattr(self.processor, "video_processor", None) is None:
            raise NotImplementedError(
                f"{type(self.model).__name__} takes no video; video tasks need a model with video input "
                "(LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2/2.5/3-VL, Qwen3.5, or the bundled tiny-qwen2vl)")
        multiple = getattr(self.processor.video_processor, "temporal_patch_size", None) or 1
        return clips.read(source, self.max_frames, multiple, start, end, rate=self.fps)

    GEN_KWARGS = 1  # where a generate_until request's arguments hold its gen_kwargs

    def _request(self, args) -> tuple[str, list, list]:
        """(prompt, images, videos) of a simple-protocol request."""
        ctx, _, doc_to_visual, doc_id, task, split = args
        images, sources = _media(doc_to_visual(self.task_dict[task][split][doc_id]))
        videos = [self._video(v) for v in sources]
        return self._prompt(ctx, len(images), n_videos=len(videos)), images, videos

    # generation --------------------------------------------------------------------------------

    def generate_until(self, requests) -> list:
        """Batches of `batch_size` requests with the same gen_kwargs, in request order within each; a
        batch's images are loaded when it runs. lmms-eval's padding requests (the copies that even out
        the ranks) are answered in batches of their own and left out of the pruning figures."""
        from tqdm.auto import tqdm

        out: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # one generation config per batch
            kw = r.args[self.GEN_KWARGS]
            groups.setdefault((json.dumps(kw, sort_keys=True, default=str), _padding(r)), []).append(i)
        elapsed, new_tokens, first = 0.0, 0, len(self.records)
        with tqdm(total=len(requests), desc="vtprune", unit="q", disable=self.rank != 0) as bar:
            for (_, padding), idx in groups.items():
                for s in range(0, len(idx), self.batch_size):
                    chunk = idx[s:s + self.batch_size]
                    prepared = [self._request(requests[i].args) for i in chunk]
                    for part in self._stackable(prepared):  # (videos of one frame count, where the processor stacks them)
                        texts, counts, seconds = self._generate(
                            [prepared[j][0] for j in part], [im for j in part for im in prepared[j][1]],
                            requests[chunk[0]].args[self.GEN_KWARGS], record=not padding,
                            videos=[v for j in part for v in prepared[j][2]])
                        for j, text, c in zip(part, texts, counts):
                            out[chunk[j]] = GenerationResult(text=text, token_counts=c)
                        if not padding:
                            elapsed += seconds
                            new_tokens += sum(c.output_tokens for c in counts)
                    bar.update(len(chunk))
        self._log(elapsed, new_tokens, self.records[first:])
        return out

    def _stackable(self, prepared: list) -> list[list[int]]:
        """A batch's requests (prompt, images, videos) in groups the processor can take together: all of
        them, except that LLaVA-NeXT-Video's and OneVision's processors stack a batch's videos into one
        tensor, so there the videos of a group have one frame count (a short clip or segment reads fewer
        frames than max_frames_num); Qwen's flatten theirs."""
        if getattr(getattr(self.processor, "video_processor", None), "temporal_patch_size", None):
            return [list(range(len(prepared)))]
        groups: dict[tuple, list[int]] = {}
        for j, (_, _, videos) in enumerate(prepared):
            frames = {len(f) for f, _ in videos}
            groups.setdefault(next(iter(frames)) if len(frames) == 1 else tuple(sorted(frames)), []).append(j)
        return list(groups.values())

    @torch.no_grad()
    def _generate(self, prompts: list[str], images: list, gen_kwargs: dict, record: bool = True, videos: list = ()):
        inputs = self._inputs(prompts, images, videos)
        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(kw.pop("temperature", 0) or 0)
        sample = temperature > 0  # as lmms-eval's own models: do_sample without a temperature is greedy
        gen = {"max_new_tokens": int(kw.pop("max_new_tokens", None) or self.max_new_tokens), "do_sample": sample,
               "num_beams": int(kw.pop("num_beams", 1) or 1)}
        if sample:
            gen["temperature"] = temperature
            if kw.get("top_p") is not None:
                gen["top_p"] = float(kw["top_p"])
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        ids, seconds = self._timed(self.model.generate, **inputs, **gen, pad_token_id=pad)
        new = ids[:, inputs["input_ids"].shape[1]:]
        prompt_tokens = self._record(inputs, seconds, record)
        texts, counts = [], []
        for row, n_in in zip(new, prompt_tokens):
            eos = (row == self.tokenizer.eos_token_id).nonzero()
            n_out = int(eos[0, 0]) + 1 if len(eos) else int((row != pad).sum())
            text = self.tokenizer.decode(row, skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            texts.append(text)
            counts.append(TokenCounts(input_tokens=n_in, output_tokens=n_out))
        return texts, counts, seconds

    # figures -----------------------------------------------------------------------------------

    def _timed(self, fn, **kwargs):
        """(fn(**kwargs), wall seconds), the device synchronised around it on CUDA."""
        sync = self._device.type == "cuda"
        if sync:
            torch.cuda.synchronize(self._device)
        t0 = time.perf_counter()
        result = fn(**kwargs)
        if sync:
            torch.cuda.synchronize(self._device)
        return result, time.perf_counter() - t0

    def _record(self, inputs: dict, seconds: float, keep: bool = True) -> list[int]:
        """Keep this batch's pruning figures and, the first time, its inputs (unless not `keep`);
        returns each sample's prompt length after pruning (for strategies that drop inside the LLM,
        the mean over decoder layers)."""
        import vtprune

        from . import flops

        before = flops.visual_token_counts(self.model.config, inputs)
        # a batch without images prunes nothing and leaves the record of the last batch that did
        st = vtprune.stats(self.model) if self.method is not None and sum(before) else None
        if st is not None:
            st = _per_prompt(st, len(before))
        rep = flops.report(self.model, inputs, st, self.method, self.options)
        per_layer = rep.tokens_per_layer
        lengths = [round(sum(ns[b] for ns in per_layer) / len(per_layer)) for b in range(len(before))]
        if keep:
            if self.first_inputs is None:
                self.first_inputs = inputs
            self.records.append({
                "samples": len(before), "visual_before": sum(before), "visual_after": sum(rep.visual_tokens),
                "selection_ms": st.selection_ms if st is not None else 0.0, "generate_s": seconds,
                "prefill_tflops": rep.total_prefill / 1e12, "llm_prefill_tflops": rep.llm_prefill / 1e12,
                "vision_tflops": (rep.vision_encoder + rep.projector) / 1e12})
        return lengths

    def summary(self, records: list[dict] | None = None) -> dict:
        """Figures of `records` (default: all of this process's so far): per-sample means of visual
        tokens and TFLOPs, kept fraction, mean selection ms per batch, generate seconds in all."""
        records = self.records if records is None else records
        n = sum(r["samples"] for r in records)
        if not n:
            return {"method": self.method, "options": self.options, "samples": 0}
        before = sum(r["visual_before"] for r in records)
        after = sum(r["visual_after"] for r in records)
        return {"method": self.method, "options": self.options, "samples": n, "batches": len(records),
                "visual_before": before / n, "visual_after": after / n, "kept_fraction": after / before if before else 1.0,
                "selection_ms": sum(r["selection_ms"] for r in records) / len(records),
                "prefill_tflops": sum(r["prefill_tflops"] for r in records) / n,
                "llm_prefill_tflops": sum(r["llm_prefill_tflops"] for r in records) / n,
                "vision_tflops": sum(r["vision_tflops"] for r in records) / n,
                "generate_s": sum(r["generate_s"] for r in records)}

    def _log(self, elapsed: float, new_tokens: int, records: list[dict]) -> None:
        """lmms-eval's throughput log gets this call's figures (it averages its calls); the stats file
        all of this process's. (Loglikelihood calls log no time: lmms-eval divides all generated tokens
        by all logged time.)"""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        s = self.summary(records)
        extra = {f"vtprune_{k}": v for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and s["samples"]}  # a call of padding requests only: nothing of ours to average in
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=new_tokens,
                    avg_speed=new_tokens / elapsed if elapsed > 0 else 0.0, additional_metrics={**extra, "rank": self.rank})
        if self.stats_path:
            path = Path(self.stats_path)
            path.mkdir(parents=True, exist_ok=True)
            (path / f"vtprune_stats_rank{self.rank}.json").write_text(
                json.dumps({**self.summary(), "rank": self.rank, "world_size": self.world_size, "records": self.records}, indent=1) + "\n")

    # likelihood --------------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood(self, requests) -> list[GenerationResult]:
        """Per request, `GenerationResult(text=(loss, greedy))`: loss = the mean negative log-likelihood
        of the continuation's tokens given the image(s) and context (lmms-eval's convention: its own
        models return the loss and multiple-choice tasks pick the smallest), greedy = whether greedy
        decoding gives the continuation. The pair is wrapped because lmms-eval 0.7 turns any other
        model output into a string. The continuation's tokens (`continuation_ids`) are appended to the
        prompt's (never pruned: they are text), so their logits are the last positions of the pruned
        sequence."""
        from tqdm.auto import tqdm

        out, first = [], len(self.records)
        for r in tqdm(requests, desc="vtprune loglikelihood", unit="q", disable=self.rank != 0):
            ctx, continuation, doc_to_visual, doc_id, task, split = r.args
            doc = self.task_dict[task][split][doc_id]
            if callable(continuation):
                continuation = continuation(doc)
            images, sources = _media(doc_to_visual(doc))
            videos = [self._video(v) for v in sources]
            prompt = self._prompt(ctx, len(images), n_videos=len(videos))
            inputs = self._inputs([prompt], images, videos)
            cont = continuation_ids(self.tokenizer, prompt, continuation)
            if not cont:
                raise ValueError(f"continuation {continuation!r} has no tokens")
            cont = torch.tensor([cont], dtype=inputs["input_ids"].dtype, device=inputs["input_ids"].device)
            inputs["input_ids"] = torch.cat([inputs["input_ids"], cont], 1)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(cont)], 1)
            if "mm_token_type_ids" in inputs:  # Qwen-VL: the continuation is text (type 0)
                inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(cont)], 1)
            output, seconds = self._timed(self.model, **inputs)
            self._record(inputs, seconds, not _padding(r))
            logits = output.logits[0, -cont.shape[1] - 1:-1].float()
            logp = torch.log_softmax(logits, -1)
            loss = -float(logp.gather(1, cont[0][:, None]).mean())
            out.append(GenerationResult(text=(loss, bool((logits.argmax(-1) == cont[0]).all())), token_counts=None))
        self._log(0.0, 0, self.records[first:])  # (the forwards' time is in the records' generate_s)
        return out

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vtprune's lmms-eval model does not run multi-round tasks yet")


class VtpruneChat(Vtprune):
    """The chat protocol: messages (`doc_to_messages`) through the processor's chat template."""

    is_simple = False
    GEN_KWARGS = 2

    def _request(self, args):
        from lmms_eval.protocol import ChatMessages

        ctx, doc_to_messages, _, doc_id, task, split = args
        chat = _webm_as_video(ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id])))
        images, _, audios = chat.extract_media()
        if audios:
            raise NotImplementedError(f"vtprune's lmms-eval model takes images and videos, not audio ({audios[0]})")
        images = _media(images)[0]
        videos = [self._video({"url": c.url, "video_start": c.start_time, "video_end": c.end_time}
                              if c.start_time is not None or c.end_time is not None else c.url)
                  for m in chat.messages for c in m.content if c.type == "video"]
        if getattr(self.processor, "chat_template", None):
            return self._prompt("", len(images), chat.to_hf_messages()), images, videos
        roles = [m.role for m in chat.messages]
        if roles != ["user"]:
            raise NotImplementedError(
                f"this model has no chat template, so its prompt holds one user turn; the task sends {roles} "
                "turns, which would be dropped: run with --force_simple (the task's plain prompt) or use a "
                "checkpoint with a chat template")
        text = " ".join(c.text for c in chat.messages[0].content if c.type == "text")
        return self._prompt(text, len(images), n_videos=len(videos)), images, videos

    def loglikelihood(self, requests):
        raise NotImplementedError("lmms-eval's chat protocol has no loglikelihood; run with --force_simple")


def _webm_as_video(chat):
    """lmms-eval's automatic messages file a .webm path under audio (its audio extensions include it);
    video tasks ship .webm clips, so here a .webm is a video, as in the simple protocol."""
    from lmms_eval.protocol import ChatVideoContent

    for m in chat.messages:
        for i, c in enumerate(m.content):
            if c.type == "audio" and isinstance(c.url, (str, os.PathLike)) and str(c.url).lower().endswith(".webm"):
                m.content[i] = ChatVideoContent(url=c.url)
    return chat


def continuation_ids(tokenizer, prompt: str, continuation: str) -> list[int]:
    """The continuation's token ids as they read after `prompt`: the tokens of prompt + continuation
    past the prompt's own (lm-eval's split), where the prompt's tokens begin that text's. A multiple-choice
    continuation comes as " " + choice, and a SentencePiece tokenizer that prepends "▁" to every text
    encodes " A" alone as "▁▁A" or "▁" "▁A", not as the "▁A" it is after the prompt. Where the two texts
    part inside the prompt's last token (a continuation that glues onto it, "red" after "?" for a
    whitespace tokenizer), the continuation's own tokens."""
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    whole = tokenizer(prompt + continuation, add_special_tokens=False)["input_ids"]
    if whole[:len(head)] == head:
        return whole[len(head):]
    return tokenizer(continuation, add_special_tokens=False)["input_ids"]


def _padding(request) -> bool:
    """Whether lmms-eval added this request only to even out the ranks (its answer is discarded)."""
    return bool((getattr(request, "metadata", None) or {}).get("__padding_only__"))


def _content(text: str, n_images: int, n_videos: int = 0) -> list[dict]:
    """One user turn's content: videos first, then the images where the text has `<image>` placeholders
    when it has one per image (interleaved tasks), else the placeholders removed and the images first."""
    parts = text.split(PLACEHOLDER)
    videos = [{"type": "video"}] * n_videos
    if len(parts) == 1:
        return videos + [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    if n_images and len(parts) == n_images + 1:
        content = list(videos)
        for i, part in enumerate(parts):
            if i:
                content.append({"type": "image"})
            if part.strip():
                content.append({"type": "text", "text": part.strip()})
        return content
    return videos + [{"type": "image"}] * n_images + [{"type": "text", "text": " ".join(p.strip() for p in parts if p.strip())}]


def _per_prompt(st, prompts: int):
    """`vtprune.stats` of a generate() that repeated each of `prompts` prompts k times (beam search:
    copies are adjacent rows and prune alike) reduced to one row per prompt."""
    import dataclasses

    k = len(st.visual_before) // prompts if prompts else 1
    if k <= 1:
        return st
    return dataclasses.replace(
        st, visual_before=st.visual_before[::k], visual_after=st.visual_after[::k],
        layer_tokens=[ns[::k] for ns in st.layer_tokens], layout=None if st.layout is None else st.layout[::k],
        images=[(b // k, n, budget) for b, n, budget in st.images if b % k == 0])


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".webp")  # lmms-eval's own split of media paths
AUDIO_EXTS = (".wav", ".mp3", ".m4a", ".aac", ".flac", ".ogg", ".opus")


def _media(visuals) -> tuple[list, list]:
    """(PIL RGB images, video sources) from what a task gives: images, image paths, and (as lmms-eval
    reads them) any other path, or a dict unless its "type" says image, is a video (a .webm too, which
    lmms-eval's chat messages file under audio); audio raises."""
    from PIL import Image

    images, videos = [], []
    for v in visuals or []:
        if isinstance(v, (str, os.PathLike)):
            ext = os.path.splitext(str(v))[1].lower()
            if ext in AUDIO_EXTS:
                raise NotImplementedError(f"vtprune's lmms-eval model takes images and videos, not audio ({v})")
            if ext not in IMAGE_EXTS:
                videos.append(v)
                continue
            v = Image.open(v)
        if isinstance(v, dict):  # typed as lmms-eval types them
            kind = v.get("type", "video")
            if kind == "audio":
                raise NotImplementedError(f"vtprune's lmms-eval model takes images and videos, not audio ({v})")
            if kind != "image":
                videos.append(v)
                continue
            v = Image.open(v.get("url") or v.get("path"))
        images.append(v.convert("RGB"))
    return images, videos
