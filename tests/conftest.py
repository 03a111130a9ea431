import importlib.util
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # an accidental download fails loudly

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run on the CPU in its interpreter (read at @triton.jit time)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import vtprune
from vtprune.methods.base import Method, Selection, VisionSignal
from vtprune.methods import fastv as fastv_mod
from vtprune import tiny

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _registry_restored():
    """A strategy a test registers is gone after it (the ones registered at import, below, stay), so no test
    sees another's strategies in `vtprune.available()` or the CLI's listing, whatever the order they run in."""
    from vtprune.methods import registry

    before = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(before)


# Test-only strategies that exercise the stages with prompt-determined selections -------------

@vtprune.register("vision_attn_test")
class VisionAttnTest(Method):
    """Keep the tokens receiving the most vision-encoder attention at the feature layer (test only)."""

    stage = "vision"

    def vision_signals(self):
        return {"feat": VisionSignal("feature", "mean")}

    def select(self, image):
        s = image.signals["feat"]
        order = torch.sort(s, descending=True, stable=True).indices[: image.keep]
        return Selection(order.sort().values)


@vtprune.register("hidden_norm_test")
class HiddenNormTest(Method):
    """After decoder layer 1, keep the visual tokens with the largest hidden-state norm (test only).

    Visual hidden states depend only on the tokens before them, so the selection is the same whether
    or not generated tokens follow: generate with and without the cache must agree."""

    stage = "llm"

    def drop_layers(self, n):
        return [1]

    def select_in_llm(self, tokens):
        return fastv_mod.select(tokens.hidden.float().norm(dim=-1), tokens.visual, tokens.keep)


@pytest.fixture
def benchmark_script():
    """benchmarks/<name>.py loaded as a module (its `if __name__ == "__main__":` part not run), to call
    its main() or patch what it uses."""
    def load(name):
        path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def models():
    cache = {}

    def get(family, attn="sdpa"):
        if (family, attn) not in cache:
            cache[(family, attn)] = tiny.build(family, attn=attn)
        return cache[(family, attn)]

    return get


@pytest.fixture
def model_factory(models):
    """A shared tiny model; whatever a test patches is removed afterwards."""
    used = []

    def get(family, attn="sdpa"):
        m = models(family, attn)
        used.append(m)
        return m

    yield get
    for m in used:
        vtprune.unpatch(m)
        vtprune.uncompile_llm(m)


@pytest.fixture
def no_model_cells(monkeypatch):
    """sweep's `shapes` cells made without a model: fixed figures (the ratio as TFLOPs and visual tokens)."""
    from vtprune.eval import sweep

    class Cells:
        def __init__(self, *args, device=None, **kwargs):
            self.device, self.patchable = device, None

        def cell(self, method, ratio, options=None):
            return {"accuracy": 0.5, "metric": "accuracy", "by_kind": {}, "prefill_tflops": ratio, "llm_tflops": ratio,
                    "visual_tokens": ratio, "prefill_ms": 1.0}

    monkeypatch.setattr(sweep, "ShapesCells", Cells)


class _FakeEvent:
    """A CUDA event stand-in: the k-th mark reads 2**k ms, so a span's length names the marks it spans."""

    def __init__(self, k: int, synced: list):
        self.t, self.synced = 2.0 ** k, synced

    def synchronize(self):
        self.synced.append(self)

    def elapsed_time(self, stop):
        return stop.t - self.t


@pytest.fixture
def cuda_marks(monkeypatch):
    """Selection timing as on CUDA, on the CPU: `mark` (patched into the modules a test names with
    `cuda_marks.into(module)`) returns fake events; `synced` lists the events waited on; any
    torch.cuda.synchronize raises."""
    from types import SimpleNamespace

    synced, count = [], iter(range(1000))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: 1 / 0)
    marks = SimpleNamespace(synced=synced, mark=lambda t: _FakeEvent(next(count), synced))
    marks.into = lambda module: monkeypatch.setattr(module, "mark", marks.mark)
    return marks


@pytest.fixture
def host_syncs(benchmark_script):
    """benchmarks/host_syncs.py's counter of host syncs (`with host_syncs() as s: ...; s.n`)."""
    return benchmark_script("host_syncs").HostSyncs


@pytest.fixture
def siglip_normalised(monkeypatch):
    """vtprune.eval.models.load, the processor it returns normalising by 0.5 / 0.5 (LLaVA-OneVision's SigLIP
    checkpoints, Qwen3-VL) where the bundled models normalise as CLIP does. Yields the real load."""
    from vtprune.eval import models

    load = models.load

    def loaded(*args, **kwargs):
        model, processor = load(*args, **kwargs)
        processor.image_processor.image_mean = processor.image_processor.image_std = [0.5, 0.5, 0.5]
        return model, processor

    monkeypatch.setattr(models, "load", loaded)
    yield load


@pytest.fixture
def in_lockstep():
    """run(runs, pre=(), post=()): each of `runs` (callables) in its own thread, the threads held together by a
    barrier before each forward of the modules in `pre` and after each of those in `post`, so that each
    thread's forward is half done while the others run. Returns each run's result; an exception in a thread
    is raised here (its cause before the broken barriers it left the others)."""
    import threading

    def run(runs: list, pre=(), post=()) -> list:
        barrier = threading.Barrier(len(runs), timeout=60)

        def wait(*_):
            barrier.wait()

        hooks = [m.register_forward_pre_hook(wait) for m in pre] + [m.register_forward_hook(wait) for m in post]
        out: list = [None] * len(runs)

        def work(i):
            try:
                out[i] = runs[i]()
            except BaseException as e:  # noqa: BLE001 (raised below, in the test's thread)
                out[i] = e
                barrier.abort()

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(runs))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            for h in hooks:
                h.remove()
        errors = [r for r in out if isinstance(r, BaseException)]
        for e in sorted(errors, key=lambda e: isinstance(e, threading.BrokenBarrierError)):
            raise e
        return out

    return run
